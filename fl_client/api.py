"""The client library: an existing PyTorch training script becomes a federation client.

    import fl_client

    with fl_client.connect("server:50051", client_id="3", tls_ca="ca.pem") as federation:
        for task in federation.rounds():            # blocks until a round needs this client
            model.load_state_dict(task.global_state)
            ... train as before ...
            task.submit(model, num_samples=len(dataset), metrics={"loss": loss})

or, with a function per round (what `fl-client --app` runs, and how errors in it are survived):

    federation.run(train, evaluate)                 # train(task) -> Result; evaluate(task) -> Evaluation

Everything the daemon does comes with it: heartbeats while the user's code trains, retries with
backoff, resynchronizing after a round that moved on, compression, TLS and tokens. docs/client-api.md
describes the round's lifecycle as the user's code sees it.
"""
from __future__ import annotations

import functools
import logging
import time
import traceback
from collections.abc import Callable, Iterator

import grpc
import torch

from common import convert, timeline, tls, tokens
from common import messages as m
from common.datasets import DataError
from common.secagg import SecAggError
from common.training import TrainingStopped, seed_torch, select_device
from fl_client.connection import RequestRefusedError, ServerConnection
from fl_client.heartbeat import Heartbeat, Heartbeats
from fl_client.round import ClientRound, seed_for
from fl_client.secure import SecureRound
from fl_client.task import EvaluateFn, Result, State, Task, TaskError, TrainFn, run_app

log = logging.getLogger("fl_client")

# Refusals after which joining again resynchronizes: the round closed or moved on while the client
# trained (or the server restarted and does not know it yet), or an earlier attempt of the same upload
# is still being wound up there.
RESYNC = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED)


def connect(server: str, client_id: str, *, tls_ca: str | None = None, tls_cert: str | None = None,
            tls_key: str | None = None, token: str | None = None, token_file: str | None = None,
            insecure: bool = False, device: str | torch.device = "auto", give_up_after: float | None = None,
            num_samples: int = 0, data_dir: str | None = None) -> Federation:
    """A connection to fl-server at `server` (HOST:PORT) as client `client_id`.

    TLS: `tls_ca` (the CA that signed the server's certificate), plus `tls_cert`/`tls_key` for servers that
    require client certificates; `insecure=True` for plaintext on a network you trust. `token` or
    `token_file`: this client's secret, for servers started with --client-tokens. `device` is what tasks
    name as the place to train (auto: CUDA when present). `give_up_after`: seconds of the server being
    unreachable before ServerUnreachableError (None: keep trying). `num_samples`: how many samples this
    client trains on, if known before the first round (the server shows it; each update says it again).
    ValueError, in one sentence, for options that do not fit together or files that cannot be read."""
    plaintext = tls.wants_plaintext(insecure, any((tls_ca, tls_cert, tls_key)), tls_ca is not None,
                                    "no TLS: pass the federation's ca.pem from fl-certs (--tls-ca, or tls_ca=)")
    credentials = None if plaintext or tls_ca is None else tls.channel_credentials(tls_ca, tls_cert, tls_key)
    if token_file is not None:
        token = tokens.read_secret(token_file)
    chosen = device if isinstance(device, torch.device) else select_device(device)
    connection = ServerConnection(server, give_up_after=give_up_after, credentials=credentials, token=token,
                                  client_certificate=tls_cert is not None)
    return Federation(connection, client_id, chosen, num_samples=num_samples, data_dir=data_dir)


class Federation:
    """This client's membership of a federation: rounds in, updates out. Made by `connect`."""

    def __init__(self, connection: ServerConnection, client_id: str, device: torch.device, *,
                 num_samples: int = 0, data_dir: str | None = None):
        self.connection = connection
        self.client_id = client_id
        self.device = device
        self.data_dir = data_dir
        # fl-client without --data: no data of its own, it trains on its share of the federation's data
        # set, which the server checks it has when it joins.
        self.trains_on_share = False
        self.client = ClientRound(client_id)
        self.num_samples = num_samples  # what this client trains on, once known (the server shows it)
        self.rounds_trained = 0
        self._rounds: Iterator[Task] | None = None
        self._heartbeats = Heartbeats()
        # Given each new training config as soon as a join brings it, before any round: what an app needs
        # to get ready while the client waits (the built-in one loads and checks its data).
        self.on_config: Callable[[m.TrainConfig], None] | None = None
        self._config: m.TrainConfig | None = None
        self._next_decision: m.JoinDecision | None = None  # brought by the last update's answer

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Leave: a round in progress is reported as not delivered, and the connection closed."""
        try:
            if self._rounds is not None:
                self._rounds.close()  # type: ignore[attr-defined]  # a generator
        finally:
            self._heartbeats.close()
            self.connection.close()

    def rounds(self) -> Iterator[Task]:
        """The rounds this client is given, one Task each, until the server says training is finished.
        Blocks (long-polls) between them. Submit each task before asking for the next one; a task left
        unsubmitted is reported to the server as not delivered, and the round goes on without it.

        `task.submit` returns once the server has taken the update and answered this client's next join
        too (the next round's task, or wait): one call a round instead of two, which is most of a small
        model's round. Its answer can take as long as a long-poll (25 s by default)."""
        if self._rounds is not None:
            self._rounds.close()  # type: ignore[attr-defined]  # the last one's open round reported, as by close()
        self._rounds = self._serve()
        return self._rounds

    def _join_request(self, training_round: int = 0, failure: str = "") -> m.JoinRequest:
        # 0 samples tells the server that the client trains on a share of its data set, which it checks
        # the client has; a client with data of its own says 1 until it knows better.
        num_samples = self.num_samples or (0 if self.trains_on_share else 1)
        return m.JoinRequest(client_id=self.client_id, num_samples=num_samples, device=str(self.device),
                             training_round=training_round, failure=failure)

    def _serve(self) -> Iterator[Task]:
        try:
            yield from self._serve_rounds()
        finally:
            # Selected already by the last update's answer for a round that no one will now train: the
            # server hears it at once, instead of waiting for the client to fall silent.
            pending, self._next_decision = self._next_decision, None
            if pending is not None and pending.action is m.Action.TRAIN:
                self._send_failure(pending.round, "the client stopped before this round")

    def _serve_rounds(self) -> Iterator[Task]:
        while True:
            # The last update's answer may have brought the next join's (SubmitResult.next).
            decision, self._next_decision = self._next_decision, None
            if decision is None:
                decision = self.connection.join(self._join_request())
            if decision.action is m.Action.FINISHED:
                log.info("server says training is finished after %d round(s) here", self.rounds_trained)
                return
            if self.on_config is not None and decision.config != self._config:
                try:
                    self.on_config(decision.config)
                except DataError as e:
                    if decision.action is m.Action.TRAIN:  # selected already: the round is not waited for
                        self._send_failure(decision.round, str(e))
                    raise
                self._config = decision.config
            if decision.action is m.Action.WAIT:
                if decision.retry_after:
                    time.sleep(decision.retry_after)
                continue
            try:
                if decision.model_stream:  # a small model comes with the answer
                    header, fetched = self.connection.model_of(iter(decision.model_stream))
                    if header.model_version != decision.model_version:
                        raise convert.MalformedMessage(f"the TRAIN answer for model version {decision.model_version} "
                                                       f"carries version {header.model_version}")
                else:
                    header, fetched = self.connection.fetch_model(
                        m.ModelRequest(client_id=self.client_id, model_version=decision.model_version))
            except RequestRefusedError as e:
                if e.code not in RESYNC:
                    raise
                log.warning("round %d: model not fetched (%s); joining again", decision.round, e.details)
                continue
            # The tensors fetched share a buffer that only the next fetch overwrites, after this task's submit:
            # they serve as the reference the update is computed against. The task gets a copy, which the
            # user's code may change.
            global_state = fetched
            heartbeat = Heartbeat(self.connection, self._join_request(decision.round), decision.heartbeat_seconds,
                                  self._heartbeats)
            heartbeat.start()
            secure = None
            if decision.config.secure_aggregation:
                try:
                    secure = SecureRound(self.client_id, decision.config, decision.round, global_state,
                                         self.connection.secure_step)
                    secure.exchange_keys()
                except RequestRefusedError as e:
                    heartbeat.stop()
                    if e.code not in RESYNC:
                        raise
                    log.warning("round %d: secure key exchange ended (%s); joining again", decision.round, e.details)
                    continue
                except SecAggError as e:  # this client cannot take part (a roster it does not fit): next round
                    heartbeat.stop()
                    log.warning("round %d: secure key exchange failed (%s); joining again", decision.round, e)
                    self._send_failure(decision.round, f"secure key exchange failed: {e}")
                    continue
                except BaseException:
                    heartbeat.stop()
                    raise
            # Seeded here for every way of running the task (run_app seeds again, to the same seed).
            seed_torch(seed_for(decision.config, self.client_id, decision.round))
            task = Task(client_id=self.client_id, round=decision.round, config=decision.config,
                        global_state={name: t.clone() for name, t in global_state.items()}, device=self.device,
                        seed=seed_for(decision.config, self.client_id, decision.round), data_dir=self.data_dir,
                        _should_stop=heartbeat.round_over.is_set,
                        _submit=functools.partial(self._submit, global_state=global_state,
                                                  model_version=header.model_version, secure=secure,
                                                  heartbeat=heartbeat,
                                                  admitted=decision.upload_admitted,
                                                  inline_limit=decision.inline_upload_bytes))
            timeline.mark("task", task.round)
            try:
                yield task
            finally:
                heartbeat.stop()
                if task.result is None:
                    # The user's code stopped (an exception, a break) or skipped the round: tell the server
                    # now, so that the round does not wait for this client until its deadline.
                    self._report_failure(task, "the client's code did not submit the round")

    def _submit(self, task: Task, result: Result, global_state: State, model_version: int,
                secure: SecureRound | None = None, admitted: bool = False, inline_limit: int = 0,
                heartbeat: Heartbeat | None = None) -> m.SubmitResult:
        timeline.mark("submit", task.round)
        if task.should_stop():
            log.info("round %d: over before the update was sent; not sending it", task.round)
            return m.SubmitResult(accepted=False, message="the round was over before the update was sent")
        update = (secure.prepare(global_state, task, result) if secure is not None else
                  self.client.prepare(global_state, task, result))
        # The server holds the answer until this client's next join is answered too, which saves a call
        # a round; not in a secure round, whose unmasking follows the upload. The round's heartbeats stop
        # as the update goes: an upload under way counts as hearing from the client, and after it there is
        # no work of this round left to report on.
        join_after = secure is None
        if join_after and heartbeat is not None:
            heartbeat.stop()
        timeline.mark("send", task.round)
        try:
            reply = self.connection.submit(update.header(model_version, join_after), update.payload, admitted,
                                           inline_limit)
            timeline.mark("answer", task.round)
            self._next_decision = reply.next
            if secure is not None and reply.accepted:
                self._reveal(secure)
        except RequestRefusedError as e:
            if e.code in RESYNC:
                log.warning("round %d: update not taken (%s); joining again", task.round, e.details)
                if e.code is grpc.StatusCode.ABORTED:
                    time.sleep(1.0)
                return m.SubmitResult(accepted=False, message=e.details)
            if e.code is grpc.StatusCode.INVALID_ARGUMENT:
                # The server refused what was sent (a NaN in the weights, a metric out of range): this round
                # cannot be delivered, but the next one may be.
                log.error("round %d: the server refused the update: %s", task.round, e.details)
                return m.SubmitResult(accepted=False, message=e.details)
            raise
        if reply.accepted:
            self.client.commit(update)
        if secure is None:  # a secure round's sample count is inside the mask: joins do not tell it either
            self.num_samples = result.num_samples
        self.rounds_trained += 1
        log.info("round %d: sent an update of %d samples (%s); server: %s", task.round, result.num_samples,
                 ", ".join(f"{k} {v:.4g}" for k, v in sorted(update.metrics.items())) or "no metrics",
                 reply.message)
        return reply

    def _reveal(self, secure: SecureRound) -> None:
        """A secure round's unmasking, once the update is taken; a failure here loses the round, not the
        update's acceptance (the round is re-run without it if too few reveal)."""
        try:
            secure.reveal()
        except (RequestRefusedError, SecAggError) as e:
            log.warning("round %d: secure unmasking not completed here (%s)", secure.round, e)

    def _report_failure(self, task: Task, why: str) -> None:
        """Tell the server that `task`'s round will not be delivered. One attempt after a failed one:
        should it not arrive, the round gives up on this client once its heartbeats stop anyway."""
        if task.should_stop():
            return  # the round is over for this client: nothing to report
        self._send_failure(task.round, why)

    def _send_failure(self, round_: int, why: str) -> None:
        request = self._join_request(round_, why)
        for _ in range(2):  # short: the client may be on its way out (SIGTERM)
            if self.connection.heartbeat(request, timeout=3.0) is not None:
                return
        log.warning("round %d: could not tell the server that this round failed", round_)

    def run(self, train: TrainFn, evaluate: EvaluateFn | None = None,
            prepare: Callable[[m.TrainConfig], None] | None = None) -> None:
        """Serve every round with `train(task)` (returning a Result, or None after task.submit), after
        `evaluate(task)` when the server asks for federated evaluation. An exception in them fails that
        round only: it is logged and reported to the server, and the client carries on with the next.
        `prepare(config)` is called with each new training config as soon as it is known, before any
        round; a DataError there ends the client, as one in training does."""
        self.on_config = prepare
        for task in self.rounds():
            try:
                result = run_app(task, train, evaluate)
                if result is not None and task.result is None:
                    task.submit(*result)
                elif task.result is None and not task.should_stop():
                    raise TaskError("the training function returned None without calling task.submit")
            except TrainingStopped:
                log.info("round %d: abandoned; joining again", task.round)
                task.result = m.SubmitResult(accepted=False, message="abandoned")  # nothing to report
            except (RequestRefusedError, DataError) as e:
                # The server refused this client (a token, an id), or its data does not fit the federation:
                # the next round would fail the same way, so the client stops, saying why.
                if isinstance(e, DataError):
                    self._report_failure(task, str(e))
                    task.result = m.SubmitResult(accepted=False, message=str(e))
                raise
            except Exception as e:  # noqa: BLE001 - the user's code: one bad round must not end the client
                why = f"{type(e).__name__}: {e}"
                log.error("round %d failed here (%s); reported to the server, carrying on with the next round",
                          task.round, why)
                log.debug("where it failed:\n%s", "".join(traceback.format_exception(e)))
                self._report_failure(task, why)
                task.result = m.SubmitResult(accepted=False, message=why)
            except BaseException as e:  # Ctrl-C, or SIGTERM (fl-client's Terminated): the client is leaving
                self._report_failure(task, f"the client stopped ({type(e).__name__})")
                task.result = m.SubmitResult(accepted=False, message="the client stopped")
                raise
