"""experiments/trajectory/run.py end to end on its quick setting, with the attacks' non-members
drawn from a block of training images (``--nonmembers block``), run as a program."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # end-to-end: the quick tier (-m "not slow") leaves it out

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "trajectory" / "run.py"
MODELS = ("original", "retrain", "trajectory", "traj-no-cal", "traj-from-init", "from-init", "finetune",
          "scrub", "salun")


@pytest.mark.slow  # trains the quick recipe, its shadows and every baseline: well over 20 s on 2 cores
def test_quick_block_run_writes_its_table(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--nonmembers", "block", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["args"]["nonmembers"] == "block" and res["args"]["n_train"] == 400
    assert list(res["seeds"]) == ["0"]
    block = res["seeds"]["0"]["ratios"]["0.1"]
    assert block["n_forget"] == 40
    rows = block["rows"]
    assert set(rows) == set(MODELS)
    assert rows["retrain"]["loss_gap"] == 0.0 and rows["retrain"]["lira_gap"] == 0.0
    for name, row in rows.items():
        assert 0.0 <= row["loss_auc"] <= 1.0 and 0.0 <= row["lira_auc"] <= 1.0, (name, row)
        assert 0.0 <= row["test_acc"] <= 1.0, (name, row)
    # every baseline was given a step count and a time (the trajectory method's budget)
    for name in ("from-init", "finetune", "scrub", "salun"):
        assert rows[name]["steps"] >= 1 and rows[name]["time_s"] > 0, (name, rows[name])
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("# Trajectory unlearning on the leaky MLP")
    assert f"Command: `{res['command']}`" in table and "--nonmembers block" in res["command"]
    assert "MIA (--nonmembers block)" in table
    assert table.count("\n| 0 | ") == len(MODELS)  # one per-seed row per model
