"""The client's heartbeat thread (fl_client.heartbeat.Heartbeats): when it beats, and that a round's end stops it."""
import threading
import time

from common import messages as m
from fl_client.heartbeat import Heartbeat, Heartbeats


class Connection:
    def __init__(self) -> None:
        self.beats: list[tuple[int, float]] = []
        self.lock = threading.Lock()
        self.reply_round: int | None = None  # the round the server says is going on (None: the request's)

    def heartbeat(self, request: m.JoinRequest, timeout: float) -> m.JoinDecision:
        with self.lock:
            self.beats.append((request.training_round, time.monotonic()))
        cfg = m.TrainConfig(model=m.ModelSpec("mlp", (1, 8, 8), 10))
        return m.JoinDecision(m.Action.TRAIN, cfg, round=self.reply_round or request.training_round)


def heartbeat(connection: Connection, beats: Heartbeats, round_: int, interval: float) -> Heartbeat:
    return Heartbeat(connection, m.JoinRequest("1", 10, training_round=round_), interval, beats)  # type: ignore[arg-type]


def test_a_round_beats_every_interval_from_its_start_and_not_after_its_end():
    connection, beats = Connection(), Heartbeats()
    try:
        started = time.monotonic()
        first = heartbeat(connection, beats, 1, 0.1)
        first.start()
        time.sleep(0.35)
        first.stop()
        ended = len(connection.beats)
        assert 2 <= ended <= 4
        assert connection.beats[0][1] - started >= 0.1  # the first an interval after the round began
        time.sleep(0.25)
        assert len(connection.beats) == ended  # nothing once the round is over
    finally:
        beats.close()


def test_short_rounds_do_not_beat_and_a_later_round_beats_on_its_own_schedule():
    connection, beats = Connection(), Heartbeats()
    try:
        for round_ in range(1, 6):  # rounds far shorter than the interval
            h = heartbeat(connection, beats, round_, 0.3)
            h.start()
            time.sleep(0.02)
            h.stop()
        assert connection.beats == []
        started = time.monotonic()
        long = heartbeat(connection, beats, 6, 0.3)
        long.start()
        time.sleep(0.45)
        long.stop()
        assert [r for r, _ in connection.beats] == [6]
        assert connection.beats[0][1] - started >= 0.3
        # A round with a shorter interval than the one the thread sleeps for is not beaten late.
        started = time.monotonic()
        quick = heartbeat(connection, beats, 7, 0.05)
        quick.start()
        time.sleep(0.2)
        quick.stop()
        sevens = [t for r, t in connection.beats if r == 7]
        assert sevens and sevens[0] - started < 0.2
    finally:
        beats.close()


def test_the_server_saying_the_round_is_over_stops_the_beats():
    connection, beats = Connection(), Heartbeats()
    connection.reply_round = 99  # another round is going on: this one is over for the client
    try:
        h = heartbeat(connection, beats, 1, 0.05)
        h.start()
        assert h.round_over.wait(2.0)
        time.sleep(0.2)
        assert len(connection.beats) == 1
        h.stop()
    finally:
        beats.close()
