"""Adding a method is one registration: the registry, the CLI's --method and the harness see it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import mini_unlearn_jax as mu
from mini_unlearn_jax.app import cli
from mini_unlearn_jax.app.harness import GridConfig, run_grid
from mini_unlearn_jax.core import registry as R

SPEC = "synthetic:n=300,n_test=100,d=8,classes=3,seed=2"


def _shrink(problem: mu.Problem, forget, factor: float = 0.5) -> mu.MethodOutput:
    """A toy method: shrink w* towards 0 (converged, free)."""
    params = jax.tree.map(lambda a: a * factor, problem.params)
    return mu.MethodOutput(params, True, f"shrunk by {factor}", 0.001, 0.0, {"factor": factor})


@pytest.fixture
def toy():
    mu.register_method("toy-shrink", _shrink, summary="a toy: shrink the trained parameters")
    yield "toy-shrink"
    R.unregister_method("toy-shrink")


@pytest.mark.slow
def test_one_registration_reaches_the_registry_the_cli_and_the_harness(toy, tmp_path, capsys):
    assert toy in mu.METHODS and R.get_method(toy).summary.startswith("a toy")
    # the CLI: --help lists it, and `unlearn --method toy-shrink` runs it end to end
    sub = cli.build_parser()._subparsers._group_actions[0].choices["unlearn"].format_help()
    assert toy in " ".join(sub.split())
    run = tmp_path / "run"
    assert cli.main(["train", "--data", SPEC, "--model", "logreg", "--out", str(run)]) == 0
    capsys.readouterr()
    assert cli.main(["unlearn", "--run", str(run), "--method", toy, "--ratio", "0.1", "--out", str(tmp_path / "u"),
                     "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["method"] == toy and report["reason"] == "shrunk by 0.5" and report["details"] == {"factor": 0.5}
    w_star, w_toy = mu.load_run(run).params, mu.load_run(tmp_path / "u").params
    np.testing.assert_allclose(w_toy["Dense_0"]["kernel"], 0.5 * np.asarray(w_star["Dense_0"]["kernel"]), rtol=1e-6)
    # the harness: a grid with only the toy method, options included
    cfg = GridConfig(out=str(tmp_path / "grid"), seeds=[0], ratios=[0.1], methods=[f"{toy}:factor=0.25"],
                     models=[{"data": SPEC, "model": "logreg"}], mia=False)
    rows = run_grid(cfg, command="test", log=lambda *_: None)
    mine = [r for r in rows if r["method"].startswith(toy)]
    assert len(mine) == 1 and mine[0]["converged"]
    assert 0.0 < mine[0]["rel_param_error"]  # measured against the retrained model of the same run


def test_registration_is_checked():
    with pytest.raises(ValueError, match="already registered"):
        mu.register_method("mini", _shrink, summary="again")
    with pytest.raises(ValueError, match="lower-case"):
        mu.register_method("Bad Name", _shrink, summary="x")
    with pytest.raises(ValueError, match="summary"):
        mu.register_method("no-summary", _shrink, summary="")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        mu.run_method("nope", None, [0])
    assert "no-summary" not in mu.METHODS


def test_a_method_that_does_not_apply_is_refused_with_its_reason(tmp_path):
    mu.register_method("needs-stats", _shrink, summary="toy", needs=lambda p: None if p.stats else "no statistics")
    try:
        x = np.zeros((10, 3), np.float32)
        problem = mu.Problem(None, None, None, {"w": np.ones(2)}, None, None, x, np.zeros(10, np.int32))
        assert mu.applicable("needs-stats", problem) == "no statistics"
        with pytest.raises(ValueError, match="does not apply to this problem: no statistics"):
            mu.run_method("needs-stats", problem, [1])
    finally:
        R.unregister_method("needs-stats")


def test_retrain_without_initial_parameters_says_what_is_missing():
    x = np.zeros((10, 3), np.float32)
    problem = mu.Problem(None, lambda *a: None, None, {"w": np.ones(2)}, None, None, x, np.zeros(10, np.int32))
    assert "params0" in mu.applicable("retrain", problem)
    with pytest.raises(ValueError, match="params0"):
        mu.run_method("retrain", problem, [1])
