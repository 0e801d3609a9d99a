"""`fl-server`: the long-running aggregation server."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from common import codecs
from common import config as config_module
from common import logs
from common.config import Config, ConfigError
from common.datasets import DataError, load_dataset, model_spec_for
from common.messages import ModelSpec, TrainConfig
from common.models import build_model
from common.training import select_device
from fl_server.aggregation import ServerOptimizer
from fl_server.checkpoint import CheckpointError, RunFolder, config_hash
from fl_server.coordinator import Coordinator
from fl_server.rounds import RoundState
from fl_server.servicer import FederationServicer, PortInUseError, create_server

log = logging.getLogger("fl_server")


def train_config_of(cfg: Config, spec: ModelSpec) -> TrainConfig:
    return TrainConfig(model=spec, dataset=cfg.dataset, num_clients=cfg.num_clients, seed=cfg.seed,
                       local_epochs=cfg.local_epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, optimizer=cfg.optimizer,
                       compression=str(codecs.parse(cfg.compression)), partition=cfg.partition, mu=cfg.mu,
                       clip_norm=cfg.clip_norm)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-server", description="Federated-learning aggregation server.")
    config_module.add_arguments(parser)
    parser.add_argument("--device", default="cpu", help="where the server evaluates: auto, cpu, cuda, cuda:N")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume from a checkpoint in --out even if it was made with other settings")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-file", help="also write the log to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_file)
        cfg = config_module.from_arguments(args)
        device = select_device(args.device)
        train_data, test_data = load_dataset(cfg.dataset, cfg.data_root)
        spec = model_spec_for(cfg.model_name, train_data)
        run = RunFolder(cfg.out)
        checkpoint = run.load_checkpoint()
    except (ConfigError, DataError, CheckpointError, ValueError) as e:
        return logs.fail("fl-server", str(e))
    except OSError as e:
        return logs.fail("fl-server", f"cannot use {e.filename or 'a file'}: {e.strerror}; check --out and --log-file")
    extra = {"config_hash": config_hash(cfg), "model_spec": [spec.name, list(spec.input_shape), spec.num_classes]}

    state_kwargs = dict(train_config=train_config_of(cfg, spec), clients_per_round=cfg.clients_per_round,
                        min_clients=cfg.effective_min_clients, min_fit=cfg.effective_min_fit,
                        round_timeout=cfg.round_timeout, server_lr=cfg.server_lr, seed=cfg.seed,
                        heartbeat_seconds=cfg.heartbeat_seconds, max_concurrent_uploads=cfg.max_uploads,
                        server_optimizer=ServerOptimizer(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum,
                                                         cfg.server_beta1, cfg.server_beta2, cfg.server_tau))
    if checkpoint is None:
        state = RoundState(global_state=build_model(spec, seed=cfg.seed).state_dict(), **state_kwargs)
        metrics: list = []
    else:
        if checkpoint.get("model_spec") != extra["model_spec"]:
            return logs.fail("fl-server", f"the checkpoint in {cfg.out} holds a {checkpoint.get('model_spec')} "
                             f"model, not {extra['model_spec']}; use another --out or the original settings")
        if checkpoint.get("config_hash") != extra["config_hash"] and not args.allow_config_change:
            return logs.fail("fl-server", f"the checkpoint in {cfg.out} was made with other training settings; "
                             "use another --out, the original settings, or --allow-config-change")
        state = RoundState(global_state=checkpoint["model"], model_version=checkpoint["model_version"],
                           **state_kwargs)
        state.rng.bit_generator.state = checkpoint["rng_state"]
        state.server_optimizer.load_state_dict(checkpoint.get("server_optimizer", {}))
        metrics = checkpoint["metrics"]
        try:
            run.write_metrics(metrics)  # a crash may have come between the checkpoint and the metrics log
        except OSError as e:
            return logs.fail("fl-server", f"cannot write to {cfg.out}: {e.strerror}")
        log.info("resumed from %s at model version %d", run.path, checkpoint["model_version"])

    try:
        server, port = create_server(FederationServicer(state), cfg.host, cfg.port)
    except PortInUseError as e:
        return logs.fail("fl-server", str(e))
    server.start()
    print(f"listening on {cfg.host}:{port}", flush=True)

    coordinator = Coordinator(state, rounds=cfg.rounds, model_spec=spec, test_data=test_data, run=run,
                              checkpoint_extra=extra, metrics=metrics, device=device,
                              report=lambda line: print(line, flush=True))
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
    state.stop()
    loop.join(timeout=30)
    server.stop(grace=2).wait()
    log.info("stopped")
    return logs.fail("fl-server", failure[0], code=1) if failure else 0


if __name__ == "__main__":
    sys.exit(main())
