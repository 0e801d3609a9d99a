"""Monitoring over HTTP (`--metrics-port`): Prometheus metrics at /metrics, the server's state as JSON at
/status (what `fl-server status` prints). Values are read from the round state and the metrics log at
scrape time, so nothing in the round loop has to remember to update them."""
from __future__ import annotations

import hmac
import json
import logging
import ssl
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from fl_server.records import RoundRecord
from fl_server.rounds import RoundState

log = logging.getLogger("fl_server.monitoring")


class FederationCollector(Collector):
    def __init__(self, state: RoundState, records: Callable[[], list[RoundRecord]]):
        self.state = state
        self.records = records  # the rounds of metrics.jsonl so far

    def collect(self) -> Iterator[Any]:
        status = self.state.status()
        records = self.records()
        done = [r for r in records if r.aggregated]
        # The newest result of each kind: a server without a data set has no test result of its own, and
        # an autoencoder's has a loss only.
        latest = next((r for r in reversed(done) if r.evaluated), None)
        federated = next((r.federated_evaluation for r in reversed(done) if r.federated_evaluation), None)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("fl_round", "Round in progress (or next to start)", status["round"])
        yield gauge("fl_model_version", "Global model version (aggregations so far)", status["model_version"])
        yield CounterMetricFamily("fl_rounds_completed", "Rounds aggregated", value=len(done))
        if latest is not None and latest.accuracy is not None:
            yield gauge("fl_accuracy", "Test accuracy of the newest evaluated global model", latest.accuracy)
        if latest is not None and latest.loss is not None:
            yield gauge("fl_loss", "Test loss of the newest evaluated global model", latest.loss)
        if latest is not None and latest.server_metrics:
            family = GaugeMetricFamily("fl_server_metric", "What server_evaluation returned for the newest "
                                       "evaluated global model", labels=["name"])
            for name, value in latest.server_metrics.items():
                family.add_metric([name], value)
            yield family
        if federated is not None:
            yield gauge("fl_federated_loss", "Clients' loss of the newest model they evaluated (eval_fraction)",
                        federated["loss"])
            if "accuracy" in federated:
                yield gauge("fl_federated_accuracy", "Clients' accuracy of the newest model they evaluated "
                            "(eval_fraction)", federated["accuracy"])
        yield gauge("fl_clients_known", "Clients the server knows (joined, not yet forgotten)", len(status["clients"]))
        yield gauge("fl_clients_connected", "Clients heard from recently", status["live_clients"])
        yield gauge("fl_clients_selected", "Clients selected for the round in progress", len(status["selected"]))
        yield CounterMetricFamily("fl_clients_dropped", "Selected clients that did not contribute, over all rounds",
                                  value=sum(len(r.dropped) for r in records))
        yield CounterMetricFamily("fl_bytes_received", "Payload bytes of counted updates",
                                  value=status["bytes_received"])
        yield CounterMetricFamily("fl_bytes_sent", "Bytes of global-model streams served", value=status["bytes_sent"])
        yield SummaryMetricFamily("fl_round_seconds", "Duration of aggregated rounds", count_value=len(done),
                                  sum_value=sum(r.seconds for r in done))
        yield SummaryMetricFamily("fl_aggregation_seconds", "Time to apply an aggregate and publish the new model",
                                  count_value=len(done), sum_value=sum(r.aggregate_seconds for r in done))


REQUEST_TIMEOUT = 10.0  # seconds a monitoring request may take (config: metrics_request_timeout)


class _Handler(WSGIRequestHandler):
    # `timeout`, the socket timeout of each request (StreamRequestHandler sets it in setup), is given per
    # server: MonitoringServer makes a subclass with its request timeout.

    def setup(self) -> None:
        super().setup()  # sets the socket timeout
        if isinstance(self.connection, ssl.SSLSocket):
            # The TLS handshake, on this request's own thread and under its timeout, not in accept() on
            # the thread that serves everyone.
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("%s " + format, self.client_address[0], *args)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a client that sends half a request holds only its own thread, until
    its socket timeout."""

    daemon_threads = True
    block_on_close = False

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("monitoring request from %s failed", client_address, exc_info=True)


class MonitoringServer:
    def __init__(self, state: RoundState, records: Callable[[], list[RoundRecord]], host: str, port: int,
                 token: str | None = None, tls: tuple[str, str] | None = None,
                 request_timeout: float = REQUEST_TIMEOUT):
        """`token`: a secret every request must present as `Authorization: Bearer TOKEN` (401 otherwise).
        `tls`: (certificate, key) PEM files; the endpoint is then HTTPS."""
        self.state = state
        self.records = records
        self._token = token.encode() if token else None
        registry = CollectorRegistry()
        registry.register(FederationCollector(state, records))
        self._metrics_app = make_wsgi_app(registry)
        handler = type("Handler", (_Handler,), {"timeout": request_timeout})
        self._server: WSGIServer = make_server(host, port, self._app, server_class=_ThreadingServer,
                                               handler_class=handler)
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*tls)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="monitoring", daemon=True)

    def status(self) -> dict[str, Any]:
        records = self.records()
        return {**self.state.status(), "latest": records[-1].to_dict() if records else None}

    def _authorized(self, environ: dict) -> bool:
        if self._token is None:
            return True
        presented = environ.get("HTTP_AUTHORIZATION", "").encode()
        return hmac.compare_digest(presented, b"Bearer " + self._token)

    def _app(self, environ: dict, start_response: Callable) -> list[bytes]:
        if not self._authorized(environ):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="fl-server"')])
            return [b"a bearer token is needed (the server's metrics_token_file)\n"]
        path = environ.get("PATH_INFO", "/")
        if path == "/status":
            body = json.dumps(self.status()).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"try /metrics or /status\n"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
