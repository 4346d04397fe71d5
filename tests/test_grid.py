import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mini_unlearn_jax.app import recipes
from mini_unlearn_jax.app.harness import (
    FIDELITY_COLUMNS,
    GridConfig,
    load_rows,
    parse_method,
    parse_ratio,
    pct_ratio,
    ratio_pct,
    run_grid,
)
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.problem import MethodOutput

pytestmark = pytest.mark.slow  # end-to-end: the quick tier (-m "not slow") leaves it out

ROOT = Path(__file__).resolve().parents[1]
DATA = "synthetic:n=300,n_test=100,d=8,classes=3,seed=1"

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
data = "npz:{out}/not-here.npz"
model = "logreg"
"""


@pytest.fixture
def toy_methods():
    """Methods registered at run time: a no-op, one that raises, one that never applies."""
    calls = []

    def toy(problem, forget, scale=1.0):
        calls.append(scale)
        return MethodOutput(problem.params, True, "converged", 1e-3 * scale, 0.0, {"scale": scale, "call": len(calls)})

    def broken(problem, forget):
        raise RuntimeError("toy failure")

    R.register_method("toy", toy, summary="returns the trained model unchanged (tests)")
    R.register_method("toy-broken", broken, summary="raises (tests)")
    R.register_method("toy-picky", toy, summary="never applies (tests)", needs=lambda pb: "it wants a unicorn")
    try:
        yield calls
    finally:
        for name in ("toy", "toy-broken", "toy-picky"):
            R.unregister_method(name)


def test_grid_runs_resumes_and_reports(tmp_path, toy_methods):
    """One grid: a real method and methods registered at run time (one with options, one that
    raises, one that does not apply), uniform / class / sequential ratios, MIA, a dataset that is
    not here; then an interrupted results.jsonl resumed."""
    out = tmp_path / "grid"
    cfg_path = tmp_path / "g.toml"
    cfg_path.write_text(TOML.format(out=out).replace('0.3, ', '').replace('methods = ["mini", "finetune"]',
                                     'methods = ["mini", "toy", "toy:scale=2", "toy-broken", "toy-picky"]'))
    cfg = GridConfig.load(cfg_path)
    logs = []
    rows = run_grid(cfg, log=logs.append, command="test")
    assert len(rows) == 15  # the npz file is not there: skipped with a message
    assert any("skipping npz:" in m and "not found" in m for m in logs)
    by = {(r["method"], r["ratio"]): r for r in rows}
    assert [by[m, "seq2x0.1"]["n_removed"] for m in ("mini", "toy")] == [40, 40]
    assert by["mini", "class1"]["forget_acc"] >= 0.0 and by["mini", "0.1"]["n_removed"] == 20
    for r in rows:
        if r["method"] in ("toy-broken", "toy-picky"):
            assert not r["converged"] and "kl_ratio" not in r
            assert r["reason"] == ("error: RuntimeError: toy failure" if r["method"] == "toy-broken"
                                   else "not applicable: it wants a unicorn")
            continue
        assert r["converged"] and "mia_auc" in r and r["reference"] == "retrain"
        assert 0.0 <= r["retain_acc"] <= 1.0 and r["kl_forget"] >= 0.0
        assert r["kl_ratio"] == pytest.approx(r["kl_test"] / r["original_kl_test"], rel=1e-9)
    for ratio in ("0.1", "class1"):
        r = by["toy", ratio]  # the unchanged model is exactly as far from retraining as the original one
        assert r["kl_test"] == pytest.approx(r["original_kl_test"], rel=1e-12)
        assert r["kl_ratio"] == pytest.approx(1.0, rel=1e-9)
        assert r["rel_param_error"] == pytest.approx(1.0, rel=1e-6)
        assert r["test_acc"] == pytest.approx(r["original_test_acc"], abs=1e-12)
        assert r["memory_bytes"] == 0 and r["time_s"] == pytest.approx(1e-3) and r["options"] == ""
        assert by["toy:scale=2", ratio]["options"] == '{"scale": 2}' and by["toy:scale=2", ratio]["info"]["scale"] == 2
    assert by["toy", "seq2x0.1"]["time_s"] == pytest.approx(2e-3)  # two requests
    assert toy_methods.count(2) == 4  # 2 single requests + 2 sequential ones
    assert by["mini", "0.1"]["memory_bytes"] > 0
    # interrupt: drop the last two rows (one cut mid-line) and resume: only those two rerun
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:20])
    logs.clear()
    rows2 = run_grid(cfg, log=logs.append, command="test")
    assert "13 already done, 17 to run" in logs[0]
    assert sum(1 for m in logs if m.startswith("[")) == 2
    assert len(load_rows(out)) == 15 and len(rows2) == 15
    for name in ("results.csv", "results.json", "table.md", "test_acc_vs_ratio.png", "mia_auc_vs_ratio.png",
                 "time_ratio_vs_ratio.png", "fidelity_vs_time.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "table.md").read_text()
    assert "Command: `test`" in table and "| toy:scale=2 |" in table and "| toy-broken | — | — |" in table
    assert "| mini |" in table and "±" not in table.split("**KL ratio**")[1].split("**")[0]  # one seed: no std
    forget_block = table.split("**forget-set loss / retrain's")[1].split("**")[1]  # past the heading's own **
    by01 = by["mini", "0.1"]
    assert f"| mini | {by01['forget_loss_ratio']:.3f} |" in forget_block  # one cell per ratio, in the table's order
    assert len(json.loads((out / "results.json").read_text())) == 15


@pytest.mark.parametrize("bad,msg", [
    ('methods = ["bogus"]', "unknown method"), ('ratios = [1.5]', "must lie in"), ('colour = 1', "unknown keys"),
    ('methods = ["retrain"]', "is the reference"), ('methods = ["deltagrad:lr"]', "bad option"),
    ('ratios = ["150%"]', "must lie in"), ('ratios = ["half"]', "write a fraction"), ('seeds = []', "non-empty"),
    ('report = "html"', "unknown report"), ('methods = ["mini", "mini"]', "repeat"),
])
def test_grid_config_errors(tmp_path, bad, msg):
    text = TOML.format(out=tmp_path)
    key = bad.split(" = ")[0]
    lines = [ln for ln in text.splitlines() if not ln.startswith(key + " =")]
    p = tmp_path / "bad.toml"
    p.write_text(bad + "\n" + "\n".join(lines))
    with pytest.raises(ValueError, match=msg):
        GridConfig.load(p)


def _cfg(out, **kw) -> GridConfig:
    base = dict(out=str(out), seeds=[0], ratios=[0.1], methods=["mini"], mia=False,
                models=[{"data": DATA, "model": "logreg", "l2": 1e-2}])
    return GridConfig(**(base | kw))


@pytest.mark.parametrize("change,msg", [
    ({"models": [{"data": DATA, "model": "logreg", "colour": 1}]}, "unknown keys"),
    ({"models": [{"data": DATA, "model": "logreg", "seed": 3}]}, "unknown keys"),  # the seed is the grid's
    ({"models": [{"model": "logreg"}]}, "needs data and model"),
    ({"models": [{"recipe": "nope"}]}, "unknown recipe"),
    ({"models": [{"recipe": "fidelity-mlp", "model": "logreg"}]}, "trains a mlp"),
    ({"models": [{"data": DATA, "model": "logreg"}] * 2}, "two model entries"),
    ({"report": "fidelity", "ratios": ["class1"]}, "uniform ratios only"),
    ({"targets": {"method": "mini", "colour": 1}}, "targets: unknown keys"),
])
def test_grid_config_errors_in_process(tmp_path, change, msg):
    with pytest.raises(ValueError, match=msg):
        _cfg(tmp_path, **change)


def test_ratio_and_method_labels():
    assert parse_ratio("10%") == ("uniform", 0.1, 1) == parse_ratio(0.1)  # the same forget sets either way
    assert parse_ratio("class3") == ("class", 3, 1) and parse_ratio("seq5x0.1") == ("seq", 0.1, 5)
    assert ratio_pct("0.1") == 10.0 and ratio_pct("12.5%") == 12.5 and ratio_pct(0.07) == 7.0
    assert pct_ratio(10.0) == "10%" and pct_ratio(12.5) == "12.5%" and ratio_pct(pct_ratio(0.1)) == 0.1
    assert parse_method("deltagrad:lr=0.1+steps=20+seed=x") == ("deltagrad", {"lr": 0.1, "steps": 20, "seed": "x"})
    assert parse_method("mini") == ("mini", {})


def test_recipe_model_entry_expands(tmp_path):
    cfg = _cfg(tmp_path, models=[{"recipe": "fidelity-mlp", "hidden": 16}])
    m = cfg.models[0]
    assert (m["data"], m["model"], m["l2"], m["hidden"]) == ("fashion_mnist:n_train=10000", "mlp", 1e-4, 16)


def test_run_grid_checks_methods_when_it_runs(tmp_path, toy_methods):
    cfg = _cfg(tmp_path, methods=["toy"])
    R.unregister_method("toy")
    try:
        with pytest.raises(ValueError, match="unknown method 'toy'"):
            run_grid(cfg, log=lambda m: None)
    finally:
        R.register_method("toy", lambda pb, f: None, summary="placeholder, unregistered by the fixture")
    assert not (tmp_path / "results.jsonl").exists()


def test_fidelity_report_rerun_replaces_and_fresh_discards(tmp_path, toy_methods):
    out = tmp_path / "fid"
    targets = {"method": "toy", "ratios": ["10%"], "kl_ratio": 2.0, "time_ratio": 1e-9}
    cfg = _cfg(out, methods=["toy", "toy:scale=2"], ratios=["10%", "20%"], report="fidelity", resume=False,
               reference_rows=True, targets=targets, title="Toy fidelity", intro="Made by a test.")
    rows = run_grid(cfg, log=lambda m: None, command="first")
    first = {(r["method"], r["ratio"]): r for r in rows}
    assert len(first) == 6  # 2 ratios x (retrain + 2 labels)
    ref = [r for r in rows if r["method"] == "retrain"]
    assert len(ref) == 2 and all(r["kl_test"] == 0.0 and r["rel_param_error"] == 0.0 and r["time_ratio"] == 1.0
                                 for r in ref)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"runs", "models", "rows"} and len(saved["rows"]) == 6
    assert [r["method"] for r in saved["rows"][:3]] == ["retrain", "toy", "toy:scale=2"]  # reference first
    assert {r["ratio_pct"] for r in saved["rows"]} == {10.0, 20.0}
    assert set(saved["rows"][1]) == set(FIDELITY_COLUMNS) | {"info"}
    assert "options" not in saved["rows"][0]  # the reference takes none
    (model_key, model), = saved["models"].items()
    assert model_key == "logreg:300:0" and model["data_spec"] == DATA and model["steps_run"] >= 1
    with open(out / "results.csv") as f:
        assert next(csv.reader(f)) == FIDELITY_COLUMNS
    table = (out / "table.md").read_text()
    assert table.startswith("# Toy fidelity\n\nMade by a test.\n")
    assert f"## logreg — {DATA} (n_train=300, seed=0)" in table
    assert "| method | 10% | 20% |" in table and "**All cells**" in table
    assert "**Targets for `toy` at 10%** (kl ratio ≤ 2.0, time ratio ≤ 1e-09):" in table
    assert "- 10%: **FAIL** — kl ratio 1 ≤ 2.0; time ratio " in table  # the time bound fails
    assert (out / "fidelity_vs_time.png").stat().st_size > 0
    # a second run of one cell replaces that cell's row (and the reference's) and keeps the others, read
    # back from results.json as a fidelity results.json written before results.jsonl existed is
    (out / "results.jsonl").unlink()
    calls = len(toy_methods)
    cfg.methods, cfg.ratios = ["toy"], ["20%"]
    rows2 = run_grid(cfg, log=lambda m: None, command="second")
    assert len(rows2) == 6 and len(toy_methods) == calls + 1
    by = {(r["method"], r["ratio"]): r for r in rows2}
    assert set(by) == {(m, r) for m in ("retrain", "toy", "toy:scale=2") for r in ("10%", "20%")}
    assert by["toy", "20%"]["info"]["call"] == calls + 1 and by["toy", "10%"]["info"]["call"] < calls + 1
    assert by["toy", "10%"] == first["toy", "10%"] and by["toy:scale=2", "20%"] == first["toy:scale=2", "20%"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["command"] for r in saved["runs"]] == ["first", "second"] and all(r["finished"] for r in saved["runs"])
    assert saved["runs"][0]["seed"] == 0 and saved["runs"][0]["ratios"] == [10.0, 20.0]  # as fidelity/run.py recorded them
    assert "- `second` —" in (out / "table.md").read_text() and "ratios 20; machine" in (out / "table.md").read_text()
    # fresh: the rows and runs of earlier runs are discarded (a dataset that is not here: nothing trains)
    cfg.models = [{"data": f"npz:{tmp_path / 'missing.npz'}", "model": "logreg"}]
    assert run_grid(cfg, fresh=True, log=lambda m: None, command="third") == []
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == [] and [r["command"] for r in saved["runs"]] == ["third"]


def _fidelity_script():
    spec = importlib.util.spec_from_file_location("fidelity_script", ROOT / "experiments" / "fidelity" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_fidelity_script_builds_its_grid_from_the_flags():
    fid = _fidelity_script()
    cfg = fid.build_config(fid.parse_args([]))  # the committed experiment
    assert cfg.report == "fidelity" and cfg.reference_rows and not cfg.resume and not cfg.mia
    assert Path(cfg.out) == ROOT / "experiments" / "fidelity" / "results"
    assert cfg.ratios == ["1%", "5%", "10%", "20%", "30%", "50%"] and cfg.seeds == [0]
    assert [(m["model"], m["data"], m["l2"]) for m in cfg.models] == [
        ("logreg", "fashion_mnist", 1e-3), ("mlp", "fashion_mnist:n_train=10000", 1e-4)]
    assert cfg.models[1]["hidden"] == 256
    # the commands the README cites
    cfg = fid.build_config(fid.parse_args(["--models", "logreg", "--methods", "mini,mini-plus"]))
    assert [m["model"] for m in cfg.models] == ["logreg"] and cfg.methods == ["mini", "mini-plus"]
    cfg = fid.build_config(fid.parse_args(["--fresh", "--methods", "mini,retrain,deltagrad:lr=0.1"]))
    assert cfg.methods == ["mini", "deltagrad:lr=0.1"] and len(cfg.models) == 2
    cfg = fid.build_config(fid.parse_args(["--models", "mlp,logreg", "--ratios", "10,12.5", "--seed", "3",
                                           "--mlp-n-train", "1000", "--hidden", "32", "--logreg-n-train", "500",
                                           "--logreg-l2", "0.01", "--data", "mnist5k", "--out", "/tmp/x"]))
    assert [(m["model"], m["data"]) for m in cfg.models] == [("mlp", "mnist5k:n_train=1000"),
                                                             ("logreg", "mnist5k:n_train=500")]
    assert cfg.models[0]["hidden"] == 32 and cfg.models[1]["l2"] == 0.01 and cfg.models[0]["l2"] == 1e-4
    assert cfg.ratios == ["10%", "12.5%"] and cfg.seeds == [3] and cfg.out == "/tmp/x"
    for argv, msg in ((["--ratios", "150"], "must lie in"), (["--ratios", "ten"], "--ratios"),
                      (["--methods", "bogus"], "unknown method"), (["--models", "cnn"], "unknown \\['cnn'\\]")):
        with pytest.raises(SystemExit, match=msg):
            fid.build_config(fid.parse_args(argv))


def test_grid_toml_loads():
    cfg = GridConfig.load(ROOT / "experiments" / "grid" / "grid.toml")
    assert cfg.report == "grid" and cfg.resume and len(cfg.cells()) == 2 * 3 * 8 * 7
    assert np.all([parse_ratio(r)[0] in ("uniform", "class", "seq") for r in cfg.ratios])
    # recipes' "grid-mlp" (experiments/trajectory_budget/run.py --setting grid-mlp) is this grid's MLP
    mlp = next(m for m in cfg.models if m["model"] == "mlp")
    spec, model, l2, hidden, make_cfg = recipes.RECIPES["grid-mlp"]
    assert (mlp["data"], mlp["model"], mlp["l2"], mlp["hidden"]) == (spec, model, l2, hidden) and make_cfg is None


@pytest.mark.filterwarnings("error::UserWarning")  # its plots once log-scaled an empty panel
def test_forget_score_over_seeds_on_a_shared_forget_set(tmp_path):
    """forget_score over 8 seeds on one forget set (forget_seed): a method that returns exactly the
    retrained model scores 1 (indistinguishable), one that returns a constant-output model scores
    0; configurations that cannot give a score are refused."""
    def retrain_copy(problem, forget):
        return R.run_method("retrain", problem, forget)

    def zero(problem, forget):
        import jax

        return MethodOutput(jax.tree.map(lambda a: a * 0, problem.params), True, "zeroed", 0.0, 0.0, {})

    R.register_method("retrain-copy", retrain_copy, summary="toy: retraining under another name")
    R.register_method("zero", zero, summary="toy: a constant-output model")
    try:
        seeds = list(range(8))
        cfg = GridConfig(out=str(tmp_path / "fs"), seeds=seeds, ratios=[0.2], methods=["retrain-copy", "zero"],
                         models=[{"data": DATA, "model": "mlp", "hidden": 8, "steps": 30}], mia=False,
                         forget_seed=0, forget_score=True)
        rows = run_grid(cfg, command="test", log=lambda *_: None)
    finally:
        R.unregister_method("retrain-copy")
        R.unregister_method("zero")
    assert len({r["seed"] for r in rows}) == 8 and len({r["n_removed"] for r in rows}) == 1
    scores = {s["method"]: s for s in json.loads((tmp_path / "fs" / "forget_score.json").read_text())}
    assert scores["retrain-copy"]["seeds"] == 8 and scores["retrain-copy"]["forget_score"] == pytest.approx(1.0)
    assert scores["zero"]["forget_score"] == pytest.approx(0.0)
    assert "Forget score" in (tmp_path / "fs" / "table.md").read_text()
    with pytest.raises(ValueError, match="at least 8 seeds"):
        GridConfig(out=str(tmp_path / "x"), seeds=[0, 1, 2], ratios=[0.2], methods=["finetune"],
                   models=[{"data": DATA, "model": "mlp"}], forget_seed=0, forget_score=True)
    with pytest.raises(ValueError, match="set forget_seed"):
        GridConfig(out=str(tmp_path / "x"), seeds=seeds, ratios=[0.2], methods=["finetune"],
                   models=[{"data": DATA, "model": "mlp"}], forget_score=True)


def test_fresh_never_deletes_a_results_jsonl_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.jsonl").write_text('{"my": "notes"}\nmore of my notes\n')
    cfg = GridConfig(out=str(out), seeds=[0], ratios=[0.1], methods=["neggrad"],
                     models=[{"data": DATA, "model": "logreg"}], mia=False)
    with pytest.raises(ValueError, match="not a row store of this harness"):
        run_grid(cfg, fresh=True, command="test", log=lambda *_: None)
    assert (out / "results.jsonl").read_text() == '{"my": "notes"}\nmore of my notes\n'


def test_an_mlp_entry_is_trajectory_unlearned_as_in_the_cli_and_scored_without_its_held_out_split(tmp_path):
    """By default an MLP under a mini-batch recipe keeps a trajectory buffer (the CLI's rule), so
    ``mini`` is trajectory unlearning, and every test metric leaves out the held-out test images it
    reads; ``trajectory = false`` scores on the whole test set, and there ``mini`` does not apply (the
    fixed point of a network is its trained model: the row says so instead of reporting a no-op)."""
    from mini_unlearn_jax.app import recipes
    from mini_unlearn_jax.evaluation import metrics as mt

    entry = {"data": DATA, "model": "mlp", "hidden": 8, "steps": 30}
    rows = {}
    for traj in ("auto", False):
        model = entry if traj == "auto" else dict(entry, trajectory=False)
        cfg = GridConfig(out=str(tmp_path / str(traj)), seeds=[0], ratios=[0.1], methods=["mini", "finetune"],
                         models=[model], mia=False)
        out = {r["method"]: r for r in run_grid(cfg, command="test", log=lambda *_: None)}
        rows[traj] = out["mini"] if traj == "auto" else out["finetune"]
        if traj is False:
            assert not out["mini"]["converged"] and "not applicable" in out["mini"]["reason"]
            assert "not known to be convex" in out["mini"]["reason"]
    assert rows["auto"]["info"]["solver"] == "trajectory"
    tr = recipes.build_problem(DATA, "mlp", 1e-3, 0, hidden=8, steps=30, trajectory=True)
    ds, vi = tr.dataset, tr.val_indices
    assert len(vi) == 50  # min(500, n_test // 2) of the 100 test images
    rest = np.setdiff1d(np.arange(len(ds.y_test)), vi)
    acc = lambda idx: mt.accuracy(mt.predict_probs(tr.problem.objective, tr.problem.params, ds.x_test[idx]),
                                  ds.y_test[idx])
    assert rows["auto"]["original_test_acc"] == pytest.approx(acc(rest), abs=1e-12)
    assert rows[False]["original_test_acc"] == pytest.approx(acc(np.arange(len(ds.y_test))), abs=1e-12)
    table = (tmp_path / "auto" / "table.md").read_text()
    assert "Test metrics are on 50 test images: the other 50 are the held-out split" in table
    with pytest.raises(ValueError, match="give true, false"):
        recipes.build_problem(DATA, "mlp", 1e-3, 0, hidden=8, steps=30, trajectory="yes")


def test_compiled_programs_are_dropped_between_models_and_kept_between_seeds(tmp_path, monkeypatch):
    """A long grid compiles for one model after another; each model's programs are dropped when the
    next model trains (thousands of CPU executables exhaust the process's memory maps). Another
    seed of the same model has the same shapes, so it reuses them: it compiles nothing."""
    from mini_unlearn_jax.core import aot

    sizes = []
    real = aot.clear_compiled

    def counting():
        sizes.append(len(aot._COMPILED))
        real()

    monkeypatch.setattr(aot, "clear_compiled", counting)
    other = "synthetic:n=200,n_test=100,d=6,classes=3,seed=2"
    cfg = GridConfig(out=str(tmp_path / "g"), seeds=[0, 1], ratios=[0.1], methods=["mini"],
                     models=[{"data": DATA, "model": "logreg"}, {"data": other, "model": "logreg"}], mia=False)
    rows = run_grid(cfg, command="test", log=lambda *_: None)
    assert len(sizes) == 1 and sizes[0] > 0  # once, before the second model, with something to drop
    mini = {(r["data"], r["seed"]): r for r in rows if r["method"] == "mini"}
    assert all(r["converged"] for r in mini.values()) and len(mini) == 4
    for data in (DATA, other):
        assert mini[(data, 0)]["compile_s"] > 0 and mini[(data, 1)]["compile_s"] == 0.0


def test_the_retrain_line_reads_only_rows_measured_against_the_shared_retrain(tmp_path):
    """DeltaGrad's rows carry its own SGD retrain's accuracy and MIA AUC (its reference); the grid
    table's ``retrain`` line must not average them in."""
    cfg = GridConfig(out=str(tmp_path / "g"), seeds=[0], ratios=[0.2], methods=["finetune", "deltagrad"],
                     models=[{"data": DATA, "model": "logreg"}], mia=True)
    rows = run_grid(cfg, command="test", log=lambda *_: None)
    by = {r["method"]: r for r in rows}
    assert by["deltagrad"]["reference"] == "deltagrad_retrain" and by["finetune"]["reference"] == "retrain"
    table = (tmp_path / "g" / "table.md").read_text()
    for block, key, fmt in (("**test acc**", "retrain_test_acc", "{:.4f}"), ("**MIA AUC (loss)**", "mia_auc_retrain",
                                                                              "{:.3f}")):
        line = next(ln for ln in table.split(block)[1].splitlines() if ln.startswith("| retrain |"))
        assert line == f"| retrain | {fmt.format(by['finetune'][key])} |"
    # the two references differ here, so a line that mixed them in would show their mean instead
    assert by["deltagrad"]["retrain_test_acc"] != by["finetune"]["retrain_test_acc"]


def test_row_store_helpers_keep_whole_rows_after_a_cut_line(tmp_path):
    """The JSON-lines helpers the grid and the benchmark protocol share: a row appended after an
    interrupted write stays whole; the cut line is skipped when read, tolerated as the last line by
    the ownership check, refused anywhere else, as is a line that is not a row."""
    from mini_unlearn_jax.app.harness.config import append_row, check_row_store, read_rows

    path = tmp_path / "rows.jsonl"
    is_row = lambda r: "a" in r
    assert read_rows(path) == [] and check_row_store(path, is_row) is None  # no file: nothing to refuse
    append_row(path, {"a": 1})
    path.write_text(path.read_text() + '{"a": 2, "b"')  # an interruption cut the second row
    check_row_store(path, is_row)  # a cut last line is ours
    append_row(path, {"a": 3})
    assert read_rows(path) == [{"a": 1}, {"a": 3}]
    with pytest.raises(ValueError, match="line 2"):
        check_row_store(path, is_row)  # the cut line is no longer the last: nothing proves it is ours
    path.write_text('{"a": 1}\n{"z": 0}\n')
    with pytest.raises(ValueError, match="left as it is"):
        check_row_store(path, is_row)
