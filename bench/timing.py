"""Timing, CPU and memory accounting shared by the benchmark tools (bench.run, bench.bare_grpc, bench.upload_cpu,
bench.many_clients, bench.hostile)."""
from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def median_seconds(transfer: Callable[[], object], repeats: int, idle: float, warmups: int = 2,
                   before: Callable[[], object] = lambda: None) -> float:
    """Median seconds of `transfer()` over `repeats` calls, after `warmups` untimed ones (they let HTTP/2
    flow-control windows grow, as in a long-running client). Each call follows `before()` (untimed), then
    `idle` seconds without traffic, as a transfer in a round does: Linux restarts TCP's slow start on a
    connection idle for longer than its retransmission timeout, which cost 3.5 ms of 25 here."""
    times = []
    for i in range(warmups + repeats):
        before()
        time.sleep(idle)
        start = time.perf_counter()
        transfer()
        if i >= warmups:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass(frozen=True)
class ProcessStatus:
    rss: int  # resident set size, bytes
    peak_rss: int  # its peak (VmHWM), bytes
    threads: int


def process_status(pid: int) -> ProcessStatus:
    """A process's resident set, now and at its peak, and its threads, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return ProcessStatus(rss=int(fields["VmRSS"].split()[0]) * 1024, peak_rss=int(fields["VmHWM"].split()[0]) * 1024,
                         threads=int(fields["Threads"]))


def own_cpu() -> float:
    """CPU seconds (user + system) this process has used so far, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
