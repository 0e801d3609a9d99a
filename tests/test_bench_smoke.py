"""The benchmark's code paths run (on tiny sizes, so its figures mean nothing here): `make bench` cannot
silently break. The targets themselves are checked by `make bench`, not by timed tests."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_quick_benchmark_produces_every_figure(tmp_path):
    # All but figure 10 (Ray against in-process): starting a Ray instance costs most of its time, and
    # tests/integration/test_ray.py measures it on the instance that test already has.
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path),
                           "--skip", "ray_simulation"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted({f["number"] for f in results["figures"]}) == [*range(1, 10), 11, 12]
    assert all(f["value"] > 0 for f in results["figures"])
    assert "| 9 |" in (tmp_path / "results.md").read_text()


@pytest.mark.integration
def test_upload_cpu_probe_times_all_three_paths():
    done = subprocess.run([sys.executable, "-m", "bench.upload_cpu", "--model-name", "mlp", "--repeats", "1",
                           "--idle", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["SubmitUpdate", "bare", "raw"]
    assert all(" ms " in line and "cores" in line for line in lines)
