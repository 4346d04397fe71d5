import json

import pytest

from mini_unlearn_jax.app.harness import GridConfig, load_rows, run_grid, write_reports

TOML = """
out = "{out}"
seeds = [0]
ratios = [0.1, 0.3, "class1", "seq2x0.1"]
methods = ["mini", "finetune"]
mia = true
[[models]]
data = "synthetic:n=200,n_test=80,d=4,classes=3,seed=1"
model = "logreg"
l2 = 1e-2
[[models]]
data = "covtype"
model = "logreg"
"""


def test_grid_runs_resumes_and_reports(tmp_path):
    out = tmp_path / "grid"
    cfg_path = tmp_path / "g.toml"
    cfg_path.write_text(TOML.format(out=out))
    cfg = GridConfig.load(cfg_path)
    logs = []
    rows = run_grid(cfg, log=logs.append)
    assert len(rows) == 8  # covtype is not cached here: skipped with a message
    assert any("skipping covtype" in m for m in logs)
    assert all(r["converged"] for r in rows) and all("mia_auc" in r for r in rows)
    seq = [r for r in rows if r["ratio"] == "seq2x0.1"]
    assert seq and all(r["n_removed"] == 40 for r in seq)
    cls = [r for r in rows if r["ratio"] == "class1"]
    assert cls and cls[0]["forget_acc"] >= 0.0
    # interrupt: drop the last two rows (one cut mid-line) and resume: only those two rerun
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    logs.clear()
    rows2 = run_grid(cfg, log=logs.append)
    assert "6 already done, 10 to run" in logs[0]
    assert sum(1 for m in logs if m.startswith("[")) == 2
    assert len(load_rows(out)) == 8 and len(rows2) == 8
    write_reports(rows2, out, command="test")
    for name in ("results.csv", "results.json", "table.md", "test_acc_vs_ratio.png", "mia_auc_vs_ratio.png",
                 "time_ratio_vs_ratio.png", "fidelity_vs_time.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "| mini |" in table and "±" not in table.split("**KL ratio**")[1].split("**")[0]  # one seed: no std
    assert len(json.loads((out / "results.json").read_text())) == 8


@pytest.mark.parametrize("bad,msg", [
    ('methods = ["bogus"]', "unknown method"), ('ratios = [1.5]', "must lie in"), ('colour = 1', "unknown keys"),
])
def test_grid_config_errors(tmp_path, bad, msg):
    text = TOML.format(out=tmp_path)
    key = bad.split(" = ")[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + " =")]
    p = tmp_path / "bad.toml"
    p.write_text(bad + "\n" + "\n".join(lines))
    with pytest.raises(ValueError, match=msg):
        GridConfig.load(p)
