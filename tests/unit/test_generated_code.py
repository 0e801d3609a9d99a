"""The committed protobuf code is exactly what scripts/gen_proto.py makes from proto/."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_regenerating_the_protobuf_code_changes_nothing(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is generated but not committed; run `make proto`"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale; run `make proto`"
    committed_files = sorted(p.relative_to(ROOT) for p in (ROOT / "common" / "proto").glob("*_pb2*"))
    assert committed_files == generated, "common/proto has generated files that proto/ no longer makes"
