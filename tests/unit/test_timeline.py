"""The round timeline's marks (common/timeline.py) and their analysis (bench/round_timeline.py)."""
import pytest

from bench import round_timeline
from common import timeline


@pytest.fixture
def fresh_timeline(monkeypatch):
    """The module as in a new process, put back afterwards."""
    monkeypatch.setattr(timeline, "_file", None)
    monkeypatch.setattr(timeline, "_who", "")
    yield
    if timeline._file is not None:
        timeline._file.close()


def test_marks_are_nothing_unless_fl_timeline_names_a_folder(fresh_timeline, monkeypatch, tmp_path):
    monkeypatch.delenv(timeline.ENV, raising=False)
    timeline.start("server")
    timeline.mark("open", 1)  # no file, no error
    assert timeline._file is None
    monkeypatch.setenv(timeline.ENV, str(tmp_path / "marks"))
    timeline.start("client 3")
    timeline.mark("task", 2)
    timeline.mark("update", 2, client="3")
    (task, update) = timeline.read(tmp_path / "marks")
    assert (task["who"], task["event"], task["round"]) == ("client 3", "task", 2) and "client" not in task
    assert update["client"] == "3" and update["t"] >= task["t"]


def test_a_folder_that_cannot_be_written_is_one_sentence(fresh_timeline, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(timeline.ENV, str(tmp_path / "file" / "marks"))
    with pytest.raises(ValueError, match="cannot write the round timeline there"):
        timeline.start("server")


def marks_of_round(n, opened):
    """A round of two clients, at known ms after `opened` (seconds)."""
    ms = lambda x: opened + x / 1e3  # noqa: E731
    marks = [{"t": ms(0), "who": "server", "event": "open", "round": n}]
    for c, delay in (("0", 0.0), ("1", 2.0)):
        who = f"client {c}"
        marks += [{"t": ms(1 + delay), "who": "server", "event": "train", "round": n, "client": c},
                  {"t": ms(2 + delay), "who": who, "event": "task", "round": n},
                  {"t": ms(12 + delay), "who": who, "event": "submit", "round": n},
                  {"t": ms(12.5 + delay), "who": who, "event": "send", "round": n},
                  {"t": ms(13 + delay), "who": "server", "event": "update", "round": n, "client": c},
                  {"t": ms(14 + delay), "who": "server", "event": "counted", "round": n, "client": c},
                  {"t": ms(21), "who": who, "event": "answer", "round": n}]
    return [*marks, {"t": ms(17), "who": "server", "event": "closed", "round": n}]


def test_the_analysis_gives_each_phase_after_the_rounds_opening():
    marks = sorted((m for n in range(1, 5) for m in marks_of_round(n, n * 0.020)), key=lambda m: m["t"])
    text = round_timeline.analyse(marks, skip=0)
    # Rounds 1-3 have a next round to end them; round 4 has not.
    assert text.startswith("rounds 1-3 (3): median ms after a round opens")
    expected = {"last TRAIN answer ready (server)": "3.0", "last client holding its task": "4.0",
                "first client done training": "12.0", "last client done training": "14.0",
                "last update's header in (server)": "15.0", "last update taken (server)": "16.0",
                "round closed: new model published": "17.0", "next round opens": "20.0"}
    for label, value in expected.items():
        (line,) = [line for line in text.splitlines() if line.strip().startswith(label)]
        assert line.split()[-1] == value, line
    assert "a client's training (task to result): median 10.0 ms; its update's encoding (result to send): 0.50 ms" \
        in text
    assert "client 1  task 4.0 | trained until 14.0 | sent 14.5 | answered 21.0" in text


def test_a_round_run_twice_is_left_out_rather_than_mixed():
    marks = [m for n in range(1, 5) for m in marks_of_round(n, n * 0.020)]
    marks += [{**m, "t": m["t"] + 0.005} for m in marks_of_round(2, 2 * 0.020) if m["event"] in ("open", "closed")]
    text = round_timeline.analyse(sorted(marks, key=lambda m: m["t"]), skip=0)
    assert text.startswith("rounds 1-3 (2): median ms after a round opens")
