"""A loopback TCP proxy that can cut one connection after a number of client-to-server bytes:
a link that breaks in the middle of an upload, without needing a real network."""
from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, target_port: int, cut_after_upstream_bytes: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.cut_after = cut_after_upstream_bytes
        self.cuts = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            state = {"up": 0, "cut": False}
            threading.Thread(target=self._pump, args=(client, server, state, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, state, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, state: dict, upstream: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data or state["cut"]:
                    break
                if upstream and self.cut_after is not None and self.cuts == 0:
                    state["up"] += len(data)
                    if state["up"] >= self.cut_after:
                        # Forward part of this piece, then drop the link: the server saw half an upload.
                        dst.sendall(data[: len(data) // 2])
                        self.cuts += 1
                        state["cut"] = True
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
