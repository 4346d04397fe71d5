"""experiments/sequential_requests/run.py end to end on its smoke setting: a stream of requests on
a small MLP with a trajectory buffer, each audited over everything the run stores, run as a program."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: the quick tier (-m "not slow") leaves it out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "sequential_requests" / "run.py"
SMOKE_REQUESTS = 3  # what --smoke serves


@pytest.mark.slow  # ~25 s on 2 idle cores: every request compiles the solve and the refresh anew (fewer rows)
def test_smoke_stream_records_every_request_and_audits_every_slot(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["requests"] == SMOKE_REQUESTS
    recs = res["records"]
    # one record per request, in order, each removing the same number of original images
    assert [r["request"] for r in recs] == list(range(1, SMOKE_REQUESTS + 1))
    size = res["request_size"]
    assert [r["n_removed"] for r in recs] == [size * i for i in range(1, len(recs) + 1)]
    assert [r["n_remaining"] for r in recs] == [res["n_train"] - size * i for i in range(1, len(recs) + 1)]
    for r in recs:
        # no stored trajectory slot after the rewind point is a snapshot of the original run
        assert r["original_slots_after_rewind"] == [], r["original_slots_after_rewind"]
        names = [a["name"] for a in r["audit"]]
        # the audit has a row for the model and for every written trajectory slot
        assert names[0] == "model"
        written = [i for i, s in enumerate(r["trajectory_slot_steps"]) if s >= 0]
        assert len(written) == len(r["trajectory_slot_steps"])  # trajectory unlearning writes every slot
        for i in written:
            assert any(n.startswith(f"trajectory[{i}] step ") for n in names), (i, names)
        assert any(n.startswith("snapshots[") for n in names)
        assert all(0.0 <= a["auc"] <= 1.0 for a in r["audit"])
        for k in ("time_ratio", "solve_time_ratio"):
            assert math.isfinite(r[k]) and r[k] > 0, (k, r[k])
        assert r["time_ratio"] >= r["solve_time_ratio"]
    assert "--smoke" in res["command"]
    table = (tmp_path / "table.md").read_text()
    assert table.startswith(f"Command: `{res['command']}`")
    assert table.count("\n| ") == 1 + len(recs)  # the header row and one row per request
