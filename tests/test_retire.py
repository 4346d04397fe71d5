"""Retiring a run after unlearning (app/retire.py, ``mini-unlearn retire``, ``unlearn --retire-source``).

One trained run ``t``, its unlearned successor ``u`` and ``u``'s own successor ``u2`` are built
once; every test starts from pristine copies of ``t`` and ``u`` at their original paths (the
successors' ledgers name those paths as parents). The crash test kills a retire in a subprocess
at every filesystem step in turn and checks that each kill leaves one of the two complete states.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mini_unlearn_jax.app import atomic as at
from mini_unlearn_jax.app import checkpoint as ck
from mini_unlearn_jax.app import retire as rt
from mini_unlearn_jax.app.cli import main
from mini_unlearn_jax.app.markers import MARKER_NAME
from mini_unlearn_jax.core import registry as R

SPEC = "synthetic:n=300,n_test=100,d=5,classes=3,seed=1"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")
pytestmark = pytest.mark.slow  # end-to-end: its module fixture builds three runs through the CLI
RETIRED_FILES = {MARKER_NAME, "removed.npy", "run.json", rt.TOMBSTONE_NAME}


def snapshot(path: Path) -> dict:
    """Every entry below ``path`` (hidden ones too) with its bytes (None for directories)."""
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def params_bytes(run) -> list[bytes]:
    return [np.asarray(a).tobytes() for a in jax.tree.leaves(run.params)]


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    runs, bak = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("bak")
    t, u, u2 = runs / "t", runs / "u", runs / "u2"
    assert main(["train", "--data", SPEC, "--model", "logreg", "--out", str(t)]) == 0
    assert main(["unlearn", "--run", str(t), "--ratio", "0.1", "--out", str(u)]) == 0
    assert main(["unlearn", "--run", str(u), "--ratio", "0.1", "--seed", "1", "--out", str(u2)]) == 0
    for p in (t, u):
        shutil.copytree(p, bak / p.name, symlinks=True)
    ref = {p.name: (snapshot(p), params_bytes(ck.load_run(p))) for p in (t, u, u2)}
    return {"runs": runs, "bak": bak, "t": t, "u": u, "u2": u2, "ref": ref}


def restore(b) -> None:
    """Put pristine ``t`` and ``u`` back at their paths and remove everything hidden next to them."""
    for name in (*hidden(b["runs"]), "t", "u"):
        p = b["runs"] / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
    for name in ("t", "u"):
        shutil.copytree(b["bak"] / name, b["runs"] / name, symlinks=True)


@pytest.fixture
def b(built):
    restore(built)
    return built


def assert_unchanged(b, *names) -> None:
    for name in names:
        assert snapshot(b[name]) == b["ref"][name][0], f"{name} changed"


def assert_retired(b, name: str, successor: Path) -> dict:
    p = b[name]
    assert {e.name for e in p.iterdir()} == RETIRED_FILES
    meta, tomb = rt.read_retired(p)
    assert tomb["successor"] == str(successor) and meta["kind"] == "retired"
    assert (p / "removed.npy").read_bytes() == b["ref"][name][0]["removed.npy"]
    return tomb


# -- retiring ------------------------------------------------------------------------------------


@linux_only
def test_retire_deletes_the_model_keeps_the_ledger_and_the_successor(b, capsys):
    """Retire ``u`` (an unlearned run with one ledger entry) in favour of ``u2``, through the CLI."""
    u, u2 = b["u"], b["u2"]
    old_meta = json.loads((u / "run.json").read_text())
    assert main(["retire", str(u), "--successor", str(u2), "--reason", "erasure request 42"]) == 0
    assert "retired" in capsys.readouterr().out
    tomb = assert_retired(b, "u", u2)
    assert tomb["reason"] == "erasure request 42" and tomb["kind_before"] == "unlearned"
    assert "ckpt" in tomb["deleted"] and "report.json" in tomb["deleted"] and tomb["pending"].startswith(".u.")
    assert not (u / "ckpt").exists() and hidden(b["runs"]) == []  # nothing of the old model anywhere
    meta = json.loads((u / "run.json").read_text())
    assert meta["ledger"] == old_meta["ledger"] and len(meta["ledger"]) == 1
    assert meta["retired"]["successor"] == str(u2) and ck.read_marker(u)["kind"] == "retired"
    assert not ck.is_run(u)
    for load in (ck.load_run, ck.read_meta):
        with pytest.raises(rt.RetiredRunError, match=f"was retired on .*erasure request 42.*successor is {u2}"):
            load(u)
    # the successor is untouched and loads bit for bit as before
    assert_unchanged(b, "u2", "t")
    assert params_bytes(ck.load_run(u2)) == b["ref"]["u2"][1]
    # info still shows the ledger and the tombstone, and the indices
    assert main(["info", str(u), "--indices"]) == 0
    out = capsys.readouterr().out
    assert "kind                     retired" in out and "1 request(s)" in out and str(u2) in out
    assert json.loads(out.strip().splitlines()[-1]) == np.load(u / "removed.npy").tolist()
    # a second retire is a no-op that says so; a retired run is never overwritten, never unlearned from
    before = snapshot(u)
    assert main(["retire", str(u), "--successor", str(u2)]) == 0
    assert "already retired" in capsys.readouterr().out
    rt.retire_run(u, u2, reason="again")
    assert snapshot(u) == before
    with pytest.raises(at.OutputExistsError, match="retired run .* never overwritten"):
        at.check_output_dir(u, overwrite=True)
    assert main(["unlearn", "--run", str(b["t"]), "--ratio", "0.1", "--out", str(u), "--overwrite"]) == 1
    assert main(["unlearn", "--run", str(u), "--ratio", "0.1", "--out", str(b["runs"] / "x")]) == 1
    assert "was retired on" in capsys.readouterr().err and snapshot(u) == before


def _copy(src: Path, dst: Path, edit=None) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    if edit is not None:
        meta = json.loads((dst / "run.json").read_text())
        edit(meta)
        (dst / "run.json").write_text(json.dumps(meta))
    return dst


def _foreign_in_source(b, tmp):
    (b["t"] / "notes.txt").write_text("mine")
    return b["t"], b["u"], "notes.txt"


def _not_derived(b, tmp):  # u2 derives from u, not from t
    return b["t"], b["u2"], "not a successor"


def _not_unlearned(b, tmp):  # a trained run is nobody's successor
    return b["u"], b["t"], "kind is 'trained'"


def _missing_successor(b, tmp):
    return b["t"], tmp / "nowhere", "not a complete run"


def _incomplete_successor(b, tmp):
    s = _copy(b["u"], tmp / "broken")
    shutil.rmtree(s / "ckpt" / "0" / "state")
    return b["t"], s, "not a complete run"


def _other_data(b, tmp):
    return b["t"], _copy(b["u"], tmp / "fp", lambda m: m.update(data_fingerprint="0" * 64)), "fingerprint differs"


def _other_model(b, tmp):
    return b["t"], _copy(b["u"], tmp / "hid", lambda m: m.update(hidden=64)), "model differs"


def _not_a_run(b, tmp):
    d = tmp / "plain"
    d.mkdir()
    (d / "data.csv").write_text("1,2\n")
    return d, b["u"], "not written by mini-unlearn"


def _a_report(b, tmp):
    return at.write_files_atomic(tmp / "rep", {"report.json": "{}"}), b["u"], "not a trained or unlearned run"


@linux_only
@pytest.mark.parametrize("case", [_foreign_in_source, _not_derived, _not_unlearned, _missing_successor,
                                  _incomplete_successor, _other_data, _other_model, _not_a_run, _a_report])
def test_refusals_change_nothing(b, tmp_path, case):
    source, successor, msg = case(b, tmp_path)
    before = snapshot(source)
    succ_before = snapshot(successor) if successor.exists() else None
    with pytest.raises(ck.CheckpointError, match=msg):
        rt.retire_run(source, successor, reason="test")
    assert snapshot(source) == before and (snapshot(successor) if successor.exists() else None) == succ_before
    assert hidden(source.parent) == [] and hidden(b["runs"]) == []
    if source == b["t"] and case is not _foreign_in_source:
        assert_unchanged(b, "t", "u")
        assert params_bytes(ck.load_run(b["t"])) == b["ref"]["t"][1]


@linux_only
def test_a_file_added_after_the_last_check_puts_the_run_back(b, monkeypatch):
    real, calls = rt.check_retirable, []

    def racing(source):
        marker = real(source)
        calls.append(source)
        if len(calls) == 2:  # the last check, just before the renames: then the user drops a file in
            (Path(source) / "mine.txt").write_text("precious")
        return marker

    monkeypatch.setattr(rt, "check_retirable", racing)
    with pytest.raises(ck.CheckpointError, match="mine.txt.*put back as it was"):
        rt.retire_run(b["t"], b["u"], reason="test")
    assert len(calls) == 2
    after = snapshot(b["t"])
    assert after.pop("mine.txt") == b"precious" and after == b["ref"]["t"][0]
    assert hidden(b["runs"]) == []  # the aside copy went back, the build was removed


@linux_only
def test_a_retire_killed_between_its_renames_is_undone_by_the_next_touch(b):
    """The state a kill between the two renames leaves (nothing at the run, the old run aside,
    the retired build naming it as pending): loading the run puts it back, removes the build."""
    t, runs = b["t"], b["runs"]
    build = runs / ".t.retire-build"
    build.mkdir()
    marker = ck.read_marker(t)
    rt._build_retired(build, t, ck.read_meta(t), marker, b["u"], "test", ".t.retire-aside")
    os.rename(t, runs / ".t.retire-aside")
    assert not t.exists()
    assert params_bytes(ck.load_run(t)) == b["ref"]["t"][1]
    assert_unchanged(b, "t")
    assert hidden(runs) == []
    # a build whose pending copy is gone (the retire went through, then the run was removed by
    # you) is never a reason to bring anything back
    build.mkdir()
    rt._build_retired(build, t, ck.read_meta(t), marker, b["u"], "test", ".t.retire-gone")
    os.rename(t, runs / ".t.retire-other")
    at.recover(t)
    assert not t.exists() and (runs / ".t.retire-other").is_dir()


@linux_only
def test_a_deletion_cut_short_inside_the_checkpoint_is_finished_later(b, monkeypatch):
    """The old payload half deleted (some checkpoint files gone, its marker still there): the
    next load_run of the retired run deletes the rest; a payload holding a foreign file stays."""
    def cut_short(trash):
        files = sorted(p for p in (trash / "ckpt").rglob("*") if p.is_file())
        for p in files[: len(files) // 2]:
            p.unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(rt, "_delete_owned", cut_short)
    with pytest.raises(KeyboardInterrupt):
        rt.retire_run(b["t"], b["u"], reason="test")
    monkeypatch.undo()
    pending = b["runs"] / assert_retired(b, "t", b["u"])["pending"]
    assert (pending / "ckpt").is_dir() and hidden(b["runs"]) == [pending.name]
    (pending / "mine.txt").write_text("precious")  # not ours: the payload is left, and the error says so
    with pytest.raises(rt.RetiredRunError, match="mine.txt"):
        ck.read_meta(b["t"])
    assert (pending / "mine.txt").exists()
    (pending / "mine.txt").unlink()
    with pytest.raises(rt.RetiredRunError) as e:
        ck.load_run(b["t"])
    assert e.value.note is None and hidden(b["runs"]) == []
    assert_unchanged(b, "u")


# -- the CLI's unlearn --retire-source -------------------------------------------------------------


def test_unlearn_retire_source(b, tmp_path, monkeypatch, capsys):

    run, out = _copy(b["bak"] / "t", tmp_path / "t"), tmp_path / "out"
    (run / "notes.txt").write_text("mine")  # refused before any work: nothing written
    assert main(["unlearn", "--run", str(run), "--ratio", "0.1", "--out", str(out), "--retire-source"]) == 1
    assert "notes.txt" in capsys.readouterr().err and not out.exists()
    (run / "notes.txt").unlink()
    real = R.run_method

    def failing(name, problem, forget, **kw):
        return real(name, problem, forget, **kw)._replace(converged=False, reason="test", params=problem.params)

    monkeypatch.setattr(R, "run_method", failing)
    before = snapshot(run)
    assert main(["unlearn", "--run", str(run), "--ratio", "0.1", "--out", str(out), "--retire-source"]) == 2
    assert snapshot(run) == before  # did not converge: nothing is retired
    monkeypatch.setattr(R, "run_method", real)
    out2 = tmp_path / "out2"
    assert main(["unlearn", "--run", str(run), "--ratio", "0.1", "--out", str(out2), "--retire-source"]) == 0
    assert {e.name for e in run.iterdir()} == RETIRED_FILES and rt.read_retired(run)[1]["successor"] == str(out2)
    assert ck.load_run(out2).removed.size == 30 and hidden(tmp_path) == []


# -- crash safety --------------------------------------------------------------------------------

# Runs retire_run in a fresh interpreter whose retire module calls os._exit(9) at the N-th
# filesystem step: every os.fsync/unlink/rmdir/replace/rename and shutil.rmtree/copyfile the
# module makes (and atomic.py's two renames, and tombstone.py's deletion steps), and its os.sync.
# Prints the number of steps when not killed.
KILL_SCRIPT = r"""
import os, shutil, sys
from mini_unlearn_jax.app import atomic as at
from mini_unlearn_jax.app import retire as rt
from mini_unlearn_jax.app import tombstone as tb
source, successor, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
count = [0]
def killer(fn):
    def step(*a, **k):
        count[0] += 1
        if count[0] == n:
            os._exit(9)
        return fn(*a, **k)
    return step
class Proxy:
    def __init__(self, mod, names):
        self._mod = mod
        for name in names:
            setattr(self, name, killer(getattr(mod, name)))
    def __getattr__(self, name):
        return getattr(self._mod, name)
rt.os = Proxy(os, ("fsync", "sync", "unlink", "rmdir", "replace", "rename"))
rt.shutil = Proxy(shutil, ("rmtree", "copyfile"))
tb.os, tb.shutil = rt.os, rt.shutil  # the deletion steps retire_run shares with finish_retire
at.os, at.shutil = rt.os, rt.shutil  # the two renames (replace_by_renames)
rt.retire_run(source, successor, reason="crash test")
print("steps", count[0])
"""


@linux_only
def test_a_retire_killed_at_any_step_leaves_a_complete_state(built):
    b = built
    t, u, runs = b["t"], b["u"], b["runs"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    states = []
    for n in range(1, 40):
        restore(b)
        proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(t), str(u), str(n)], env=env,
                              capture_output=True, text=True, timeout=240)
        assert proc.returncode in (0, 9), proc.stderr[-2000:]
        assert_unchanged(b, "u")  # the successor is complete and untouched at every instant
        between = not t.exists()
        if between:  # killed between the two renames: both copies complete beside the path ...
            pending = [n for n in hidden(runs) if (runs / n / "ckpt").is_dir()]
            assert len(pending) == 1 and snapshot(runs / pending[0]) == b["ref"]["t"][0]
            assert ck.is_run(t)  # ... and the next touch puts the run back
        if rt.read_retired(t) is None:  # before the second rename: the run is exactly as it was
            state = "intact"
            assert_unchanged(b, "t")
            assert params_bytes(ck.load_run(t)) == b["ref"]["t"][1]
            for name in hidden(runs):  # at most a retired build that never went in: no model in it
                assert not (runs / name / "ckpt").exists(), name
            rt.retire_run(t, u, reason="after the crash")  # a later retire completes and tidies up
        else:  # after it: retired, the old payload at most pending next to it
            state = "retired"
            assert_retired(b, "t", u)
            assert set(hidden(runs)) <= {rt.read_retired(t)[1]["pending"]}
            with pytest.raises(rt.RetiredRunError, match="was retired on"):
                ck.load_run(t)  # ... which finishes the pending deletion
        assert_retired(b, "t", u) and hidden(runs) == []
        assert_unchanged(b, "u")
        states.append("between" if between else state)
        if proc.returncode == 0:
            break
    else:
        pytest.fail("the retire never completed")
    assert states[-1] == "retired" and len(states) >= 10, states  # >= 9 kills, then the run that completed
    assert states.count("intact") >= 2 and states.count("between") == 1 and states.count("retired") >= 6, states
    restore(b)
