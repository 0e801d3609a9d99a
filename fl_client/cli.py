"""`fl-client`: the daemon a data owner runs beside its private shard."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

# gRPC's C core logs failures such as a refused TLS handshake on stderr itself, beside the one-line error
# this client prints about them; the user needs the latter only. Read when grpc loads, so set first.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import torch  # noqa: E402

from common import allocator, logs, timeline
from common.datasets import DataError
from common.local_data import data_layout
from common.messages import TrainConfig
from common.parallel import DataParallelError
from common.training import AUTOCAST, check_autocast, select_device
from fl_client.api import connect
from fl_client.builtin import BuiltinTraining
from fl_client.connection import RequestRefusedError, ServerUnreachableError
from fl_client.daemon import AppError, load_app

log = logging.getLogger("fl_client")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-client", description="Federated-learning client daemon.")
    parser.add_argument("--id", required=True, help="this client's id, unique in the federation (e.g. 3)")
    parser.add_argument("--data", help="this client's own data: a folder of images (DIR/CLASS_NAME/*.png|jpg), a "
                                       "folder holding a CSV file (a label column and numeric features), or a shard "
                                       "from fl-partition; without it, client i trains on the i-th share of the "
                                       "federation's data set")
    parser.add_argument("--app", metavar="MODULE:FUNCTION",
                        help="your training code: train(task) -> fl_client.Result, run each round (MODULE "
                             "importable from the current folder or PYTHONPATH, or path/to/file.py); "
                             "default: the built-in training of the federation's model")
    parser.add_argument("--evaluate", metavar="MODULE:FUNCTION",
                        help="your evaluation: evaluate(task) -> fl_client.Evaluation of the global model, run "
                             "before training when the server asks for federated evaluation (eval_fraction)")
    parser.add_argument("--server", default="127.0.0.1:50051", help="the server's HOST:PORT")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N")
    parser.add_argument("--devices", help="train each round data-parallel across these, e.g. cuda:0,cuda:1 (DDP over "
                                          "NCCL; cpu,cpu runs the same path with gloo)")
    parser.add_argument("--autocast", choices=sorted(AUTOCAST), default="off",
                        help="bf16: compute the forward pass in bfloat16 where PyTorch deems it safe (faster on GPUs "
                             "with bfloat16 units, e.g. NVIDIA Ampere and later); weights and updates stay float32")
    parser.add_argument("--data-root", default="data", help="where mnist / cifar10 live, when training without "
                                                             "--data on such a federation")
    parser.add_argument("--give-up-after", type=float, default=None, metavar="SECONDS",
                        help="exit when the server has been unreachable this long (default: keep trying)")
    parser.add_argument("--tls-ca", help="CA certificate that signed the server's certificate (PEM, from fl-certs)")
    parser.add_argument("--tls-cert", help="this client's certificate, for servers that require mutual TLS")
    parser.add_argument("--tls-key", help="this client certificate's private key")
    parser.add_argument("--insecure", action="store_true", help="plaintext, no TLS: only for localhost or a "
                                                                "network you trust")
    parser.add_argument("--token-file", help="file holding this client's secret, for servers started with "
                                              "--client-tokens")
    parser.add_argument("--allow-model", action="append", default=[], metavar="PACKAGE.MODULE:CLASS",
                        help="let the server have this client build your own model class (the server names "
                             "the model, and importing a module runs its code: allow only what you trust)")
    parser.add_argument("--download", action="store_true",
                        help="fetch the federation's torchvision data set into --data-root if missing "
                             "(needs the internet)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (there is none off a terminal anyway)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-file", help="also write the log to this file")
    return parser.parse_args(argv)


class Terminated(BaseException):
    """SIGTERM. A BaseException, like KeyboardInterrupt, so that no library's `except Exception` can
    swallow it (tqdm's did, once, when the signal landed while it started its monitor thread)."""


def _terminate(_signum: int, _frame: object) -> None:
    # SIGTERM ends the client like Ctrl-C, without a traceback; the server carries on without it
    # (an upload cut short never touches the aggregate).
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_file)
    except (ValueError, OSError) as e:
        return logs.fail("fl-client", str(e) if isinstance(e, ValueError) else
                         f"cannot write the log file {args.log_file}: {e.strerror}")
    allocator.keep_freed_memory()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        devices = tuple(d.strip() for d in args.devices.split(",")) if args.devices else ()
        # Each checked up front: a clear error for a device this machine does not have.
        device = [select_device(name) for name in devices][0] if devices else select_device(args.device)
        for name in devices or (str(device),):
            check_autocast(AUTOCAST[args.autocast], torch.device(name))
        if args.data:
            data_layout(args.data)  # a missing or empty folder is said now, not once a server is reached
        prepare = None
        if args.app:
            train, evaluate = load_app(args.app, args.evaluate)
        else:
            if args.evaluate:
                raise AppError("--evaluate goes with --app (the built-in training evaluates by itself)")
            builtin = BuiltinTraining(data_dir=args.data, data_root=args.data_root, download=args.download,
                                      devices=devices, autocast=AUTOCAST[args.autocast], progress=not args.quiet,
                                      allowed_models=tuple(args.allow_model))
            train, evaluate = builtin.train, builtin.evaluate

            def prepare(cfg: TrainConfig) -> None:  # the data loaded and checked while the client waits
                builtin.configure(args.id, cfg, device)
        allocator.freeze_startup_objects()
        timeline.start(f"client {args.id}")  # with FL_TIMELINE set: bench/round_timeline.py
        with connect(args.server, args.id, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                     token_file=args.token_file, insecure=args.insecure, device=device,
                     give_up_after=args.give_up_after, data_dir=args.data) as federation:
            # Without --data the built-in training takes its share of the federation's data set.
            federation.trains_on_share = not args.data and not args.app
            federation.run(train, evaluate, prepare)
    except (DataError, ValueError, DataParallelError) as e:  # TLSError and TokenError are ValueErrors
        return logs.fail("fl-client", str(e))
    except ServerUnreachableError as e:
        return logs.fail("fl-client", str(e), code=3)
    except RequestRefusedError as e:
        return logs.fail("fl-client", f"the server refused this client: {e}")
    except Terminated:
        log.info("terminated; leaving the federation")
        return 0
    except KeyboardInterrupt:
        log.info("interrupted; leaving the federation")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
