"""`fl-server`: the long-running aggregation server."""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import ssl
import sys
import threading
import urllib.request

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import HealthServicer

from common import allocator, logs, tensors, timeline, tls, tokens
from common.convert import SERVICE
from common.datasets import NO_DATASET, DataError, load_dataset
from common.training import select_device
from fl_server import config as config_module
from fl_server import model_source
from fl_server.aggregation import ServerOptimizer, make_aggregator
from fl_server.aggregation.secure import SecureSum
from fl_server.checkpoint import CheckpointError, RunFolder
from fl_server.config import ConfigError, config_hash
from fl_server.coordinator import Coordinator
from fl_server.membership import RandomSelector, RegistryLimits
from fl_server.monitoring import MonitoringServer
from fl_server.records import RoundRecord
from fl_server.rounds import RoundRules, RoundState, ServerLimits
from fl_server.servicer import FederationServicer
from fl_server.transport import PortInUseError, create_server
from fl_server.uploads import MetricLimits

log = logging.getLogger("fl_server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-server", description="Federated-learning aggregation server.")
    config_module.add_arguments(parser)
    parser.add_argument("--device", default="cpu", help="where the server evaluates: auto, cpu, cuda, cuda:N")
    parser.add_argument("--download", action="store_true",
                        help="fetch a torchvision data set into --data-root if it is not there (needs the internet)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume from a checkpoint in --out even if it was made with other settings")
    parser.add_argument("--tls-cert", help="the server's certificate (PEM; make one with fl-certs)")
    parser.add_argument("--tls-key", help="the server certificate's private key (PEM)")
    parser.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS); a "
                                                "client may then act only as the id in its certificate")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext, no TLS: only for localhost or a network you trust")
    parser.add_argument("--client-tokens", metavar="FILE",
                        help="admit only clients presenting a secret listed in FILE (`CLIENT_ID SECRET` lines)")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve Prometheus metrics at /metrics and the state at /status on this HTTP port "
                             "(0 picks a free one; printed as `metrics on HOST:PORT`)")
    parser.add_argument("--report", action="store_true",
                        help="after the last round, write PNG plots and report.md into --out (as fl-report does)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-file", help="also write the log to this file")
    return parser.parse_args(argv)


def transport_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """TLS credentials from the flags; None for --insecure."""
    if tls.wants_plaintext(args.insecure, any((args.tls_cert, args.tls_key, args.tls_client_ca)),
                           bool(args.tls_cert and args.tls_key),
                           "no TLS certificate: pass --tls-cert and --tls-key (make them with fl-certs)"):
        return None
    return tls.server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def status_main(argv: list[str]) -> int:
    """`fl-server status --server HOST:PORT`: what a running server is doing (PORT is its --metrics-port)."""
    parser = argparse.ArgumentParser(prog="fl-server status", description=status_main.__doc__)
    parser.add_argument("--server", required=True, help="HOST:PORT of the server's --metrics-port")
    parser.add_argument("--json", action="store_true", help="print the raw JSON")
    parser.add_argument("--token-file", help="the secret of the server's metrics_token_file")
    parser.add_argument("--tls-ca", help="the CA that signed the server's certificate (the endpoint is HTTPS when "
                                         "the server runs with TLS)")
    args = parser.parse_args(argv)
    url = f"{'https' if args.tls_ca else 'http'}://{args.server}/status"
    request = urllib.request.Request(url)
    try:
        if args.token_file:
            request.add_header("Authorization", f"Bearer {tokens.read_secret(args.token_file)}")
        context = ssl.create_default_context(cafile=args.tls_ca) if args.tls_ca else None
        with urllib.request.urlopen(request, timeout=10, context=context) as reply:
            status = json.load(reply)
    except (OSError, ValueError) as e:  # TokenError is a ValueError
        return logs.fail("fl-server status", f"cannot read {url} ({getattr(e, 'reason', e)}); is fl-server running "
                         "there with --metrics-port?")
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"{status['phase']}: round {status['round']}, model version {status['model_version']}, "
          f"{status['live_clients']} of {len(status['clients'])} clients connected, selected {status['selected']}")
    for client, info in status["clients"].items():
        print(f"  {client:<12} {info['state']:<10} {info['num_samples']:>8} samples  {info['device'] or '?':<8} "
              f"seen {info['seconds_since_seen']} s ago")
    if status.get("latest"):
        latest = RoundRecord.from_dict(status["latest"])
        print(f"latest round {latest.round}: {latest.quality()}, clients {latest.clients}, {latest.seconds} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        return status_main(argv[1:])
    args = parse_args(argv)
    # One heap for all threads, kept rather than returned to the kernel: memory a handler thread frees is
    # then reused by the next one (measured with 50 clients: 5.6 models of peak memory above idle with
    # one heap, 8.3 with glibc's default of one per thread).
    allocator.keep_freed_memory(arenas=1)
    # The operator's own code (model_name, aggregator, server_evaluation) is imported from the folder the
    # server runs in too, as `python -m` would.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        logs.configure(args.log_level, args.log_file)
        timeline.start("server")  # with FL_TIMELINE set: bench/round_timeline.py
        cfg = config_module.from_arguments(args)
        device = select_device(args.device)
        train_data = test_data = None
        if cfg.dataset != NO_DATASET:
            train_data, test_data = load_dataset(cfg.dataset, cfg.data_root, args.download, classes=cfg.classes)
        spec = model_source.model_spec(cfg, train_data)
        run = RunFolder(cfg.out)
        checkpoint = run.load_checkpoint()
        # The user's code (model class, evaluation function) is imported and run here, before the server
        # listens: a class that cannot be imported or built is one sentence now, not a failed round later.
        model = model_source.make_model(spec, seed=cfg.seed) if spec.name else None
        evaluation = model_source.load_evaluation(cfg.server_evaluation) if cfg.server_evaluation else None
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        return logs.fail("fl-server", str(e))
    except OSError as e:
        return logs.fail("fl-server", f"cannot use {e.filename or 'a file'}: {e.strerror}; check --out and --log-file")

    def round_state(global_state: dict, model_version: int = 0) -> RoundState:
        optimizer = ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum, cfg.server_beta1,
                                    cfg.server_beta2, cfg.server_tau)
        specs = tensors.specs_of(global_state)
        aggregator = (SecureSum(specs, optimizer) if cfg.secure_aggregation else
                      make_aggregator(specs, cfg.aggregator, cfg.clients_per_round, optimizer,
                                      cfg.dp_noise_multiplier, cfg.dp_clip))
        rules = RoundRules(clients_per_round=cfg.clients_per_round, min_clients=cfg.effective_min_clients,
                           min_fit=cfg.effective_min_fit, round_timeout=cfg.round_timeout,
                           heartbeat_seconds=cfg.heartbeat_seconds)
        # Without client tokens or mutual TLS anyone may join under any id: bound how many the server keeps.
        open_mode = not args.client_tokens and args.tls_client_ca is None
        limits = ServerLimits(
            max_concurrent_uploads=cfg.max_uploads, upload_progress_timeout=cfg.upload_progress_timeout,
            metrics=MetricLimits(cfg.max_metrics, cfg.max_metric_name_length, cfg.max_metric_value),
            registry=RegistryLimits(max_clients=cfg.max_clients if open_mode else 0,
                                    forget_after=cfg.forget_clients_after),
            secagg_stage_timeout=cfg.secagg_stage_timeout)
        return RoundState(global_state=global_state, train_config=cfg.train_config(spec), rules=rules,
                          aggregator=aggregator, selector=RandomSelector(cfg.seed), model_version=model_version,
                          limits=limits)

    try:
        if checkpoint is None:
            # The aggregator (a user's rule among them) is built here, at start-up, too.
            state = round_state(model_source.initial_state(cfg, model))
            metrics: list[RoundRecord] = []
        else:
            problem = checkpoint.resume_error(cfg, spec, allow_config_change=args.allow_config_change)
            if problem is not None:
                return logs.fail("fl-server", problem)
            state = round_state(checkpoint.model, checkpoint.model_version)
            state.selector.load_state_dict(checkpoint.rng_state)
            try:
                state.aggregator.load_state_dict(checkpoint.server_optimizer)
            except Exception as e:  # noqa: BLE001 - a user's rule may raise anything
                return logs.fail("fl-server", f"aggregator {cfg.aggregator!r} cannot load its state from the "
                                 f"checkpoint in {cfg.out} ({type(e).__name__}: {logs.brief(e)}); fix its "
                                 "load_state_dict, or use another --out")
            metrics = checkpoint.metrics
    except (ValueError, TypeError) as e:  # WeightsError; a user's aggregator that cannot be imported or built
        return logs.fail("fl-server", str(e))
    if checkpoint is not None:
        try:
            run.write_metrics(metrics)  # a crash may have come between the checkpoint and the metrics log
        except OSError as e:
            return logs.fail("fl-server", f"cannot write to {cfg.out}: {e.strerror}")
        log.info("resumed from %s at model version %d", run.path, checkpoint.model_version)

    try:
        credentials = transport_credentials(args)
        client_tokens = tokens.read_tokens(args.client_tokens) if args.client_tokens else None
    except (tls.TLSError, tokens.TokenError) as e:
        return logs.fail("fl-server", str(e))
    if credentials is None and not _is_loopback(cfg.host):
        log.warning("listening on %s without TLS: anyone who can reach it can read the model and join; use "
                    "--tls-cert/--tls-key (fl-certs makes them) outside a trusted network", cfg.host)
    health = HealthServicer()
    try:
        servicer = FederationServicer(state, check_identity=args.tls_client_ca is not None,
                                      client_tokens=client_tokens, max_downloads=cfg.max_downloads,
                                      first_message_timeout=cfg.first_message_timeout, max_rpcs=cfg.max_rpcs,
                                      long_poll=cfg.long_poll_seconds,
                                      thread_stack_kib=cfg.rpc_thread_stack_kib)
        server, port = create_server(servicer, cfg.host, cfg.port, health=health, credentials=credentials,
                                     keepalive_seconds=cfg.keepalive_seconds, keepalive_timeout=cfg.keepalive_timeout)
    except PortInUseError as e:
        return logs.fail("fl-server", str(e))
    try:
        coordinator = Coordinator(
            state, rounds=cfg.rounds, model_spec=spec, test_data=test_data, run=run, config_hash=config_hash(cfg),
            metrics=metrics, device=device, report=lambda line: print(line, flush=True), write_report=args.report,
            privacy=(cfg.dp_noise_multiplier, cfg.dp_delta) if cfg.dp_noise_multiplier > 0 else None,
            server_evaluation=evaluation, model=model)
    except ValueError as e:  # its model, when it builds one, fails as fl-server's own would have
        server.stop(None).wait()
        return logs.fail("fl-server", str(e))
    monitoring = None
    if args.metrics_port is not None:
        try:
            metrics_token = tokens.read_secret(cfg.metrics_token_file) if cfg.metrics_token_file else None
        except tokens.TokenError as e:
            server.stop(None).wait()
            return logs.fail("fl-server", f"metrics_token_file: {e}")
        if not _is_loopback(cfg.metrics_host) and metrics_token is None:
            log.warning("the monitoring endpoint listens on %s without a token: anyone who can reach it can read "
                        "client ids and metrics; set metrics_token_file", cfg.metrics_host)
        try:
            monitoring = MonitoringServer(state, coordinator.records, cfg.metrics_host, args.metrics_port,
                                          token=metrics_token, request_timeout=cfg.metrics_request_timeout,
                                          tls=(args.tls_cert, args.tls_key) if credentials is not None else None)
        except OSError as e:
            server.stop(None).wait()
            return logs.fail("fl-server", f"cannot serve metrics on {cfg.metrics_host}:{args.metrics_port} "
                             f"({e.strerror}); pick another --metrics-port (0 picks a free one) or metrics_host")
    allocator.freeze_startup_objects()
    server.start()
    for service in ("", SERVICE):
        health.set(service, health_pb2.HealthCheckResponse.SERVING)
    print(f"listening on {cfg.host}:{port}", flush=True)
    if monitoring is not None:
        monitoring.start()
        print(f"metrics on {cfg.metrics_host}:{monitoring.port}", flush=True)
    stop = threading.Event()
    failure: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    def run_rounds() -> None:
        try:
            coordinator.run()
        except Exception as e:  # noqa: BLE001 - whatever it is, the server must not go on serving WAIT forever
            log.exception("the round loop failed")
            failure.append(f"the round loop failed ({type(e).__name__}: {e}); the last checkpoint in {cfg.out} "
                           "is intact: fix the cause and start fl-server again with the same --out")
            stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loop = threading.Thread(target=run_rounds, name="rounds", daemon=True)
    loop.start()
    # After the last round the server keeps serving the final model (and FINISHED to late clients).
    stop.wait()
    health.enter_graceful_shutdown()
    state.stop()
    loop.join(timeout=30)
    server.stop(grace=2).wait()
    if monitoring is not None:
        monitoring.stop()
    log.info("stopped")
    return logs.fail("fl-server", failure[0], code=1) if failure else 0


if __name__ == "__main__":
    sys.exit(main())
