"""Output safety (issue 12): nothing the tool did not write is ever deleted or replaced.

Unit tests on the output-safety helpers (markers, checks, the rename protocol of app/atomic.py:
old result aside, new one in, old one removed, an interruption recovered on the next touch)
and end-to-end tests through ``mini_unlearn_jax.app.cli.main``.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mini_unlearn_jax.app import atomic as at
from mini_unlearn_jax.app import checkpoint as ck
from mini_unlearn_jax.app.atomic import OutputExistsError
from mini_unlearn_jax.app.checkpoint import load_run
from mini_unlearn_jax.app.cli import main
from mini_unlearn_jax.app.markers import MARKER_NAME, read_marker

SPEC = "synthetic:n=200,n_test=60,d=5,classes=3,seed=1"


def snapshot(path: Path) -> dict:
    """Every entry below ``path`` with its bytes (None for directories)."""
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def result(path: Path, text: str = "old", kind: str = "unlearn-report") -> Path:
    return at.write_files_atomic(path, {"report.json": text, "extra.txt": "x"}, overwrite=None, kind=kind)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def asides(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".old-" in p.name)


# -- the replacement protocol ------------------------------------------------------------------


def test_replacing_goes_old_aside_new_in_old_removed(tmp_path, monkeypatch):
    out = result(tmp_path / "out", "v0")
    renames, real = [], os.rename

    def spy(src, dst):
        renames.append((Path(src).name, Path(dst).name, (out / "report.json").exists() and
                        (out / "report.json").read_text()))
        real(src, dst)

    monkeypatch.setattr(at.os, "rename", spy)
    at.write_files_atomic(out, {"report.json": "v1", "extra.txt": "x"}, overwrite=True)
    monkeypatch.undo()
    (a, b, before1), (c, d, before2) = renames  # exactly two renames
    assert (a, before1) == ("out", "v0") and b.startswith(".out.old-")  # the old result aside, by name
    assert c.startswith(".out.partial-") and d == "out" and before2 is False  # then the new one in
    assert (out / "report.json").read_text() == "v1" and leftovers(tmp_path) == []  # the old one removed


def test_a_watcher_never_sees_a_half_written_result(tmp_path):
    """While results are replaced again and again, ``out`` is only ever absent (between the two
    renames) or a complete result: its marker, report.json and extra.txt."""
    out = result(tmp_path / "out", "v0")
    seen, stop = set(), threading.Event()

    def watch():  # a listing counts only if the directory listed was still at ``out`` after it
        while not stop.is_set():
            try:
                fd = os.open(out, os.O_RDONLY)
            except FileNotFoundError:
                seen.add(None)
                continue
            try:
                names, st = tuple(sorted(os.listdir(fd))), os.fstat(fd)
                now = os.stat(out)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    seen.add(names)
            except FileNotFoundError:
                seen.add(None)
            finally:
                os.close(fd)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 20):
            at.write_files_atomic(out, {"report.json": f"v{i}", "extra.txt": "x"}, overwrite=True)
    finally:
        stop.set()
        t.join()
    assert seen - {None} == {(MARKER_NAME, "extra.txt", "report.json")}, seen
    assert (out / "report.json").read_text() == "v19" and leftovers(tmp_path) == []


# Replaces the result OUT in a fresh interpreter whose atomic module (and the deletion helpers it
# shares with tombstone.py) calls os._exit(9) at the N-th filesystem step; prints the step count
# when not killed.
KILL_WRITE = r"""
import os, shutil, sys
from mini_unlearn_jax.app import atomic as at
from mini_unlearn_jax.app import tombstone as tb
out, n = sys.argv[1], int(sys.argv[2])
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
at.os = tb.os = Proxy(os, ("rename", "replace", "unlink", "rmdir", "chmod"))
at.shutil = tb.shutil = Proxy(shutil, ("rmtree",))
at.write_files_atomic(out, {"report.json": "new", "extra.txt": "y", "more.txt": "z"}, overwrite=True)
print("steps", count[0])
"""


@pytest.mark.slow
def test_a_replacement_killed_at_any_step_is_recovered(tmp_path):
    """Kill the replacement at every step: ``out`` then holds the old complete result, the new one,
    or -- killed between the renames -- nothing, with the old one aside; the next touch
    (check_output_dir, is_run, a save) restores the old one or finishes removing it."""
    out = tmp_path / "out"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    states = []
    for n in range(1, 30):
        for p in tmp_path.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        old = snapshot(result(out, "old"))
        (tmp_path / "mine.txt").write_text("precious")  # a file of yours next to it: never touched
        proc = subprocess.run([sys.executable, "-c", KILL_WRITE, str(out), str(n)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 9), proc.stderr[-2000:]
        if not out.exists():
            state = "between"
            (aside,) = asides(tmp_path)
            assert snapshot(aside) == old  # the old result, complete, under its aside name
        else:
            state = "old" if (out / "report.json").read_text() == "old" else "new"
        ck.is_run(out)  # the next touch
        after = snapshot(out)
        if state in ("old", "between"):
            assert after == old, (n, state)
        else:
            assert set(after) == {MARKER_NAME, "report.json", "extra.txt", "more.txt"}
            assert (out / "report.json").read_text() == "new" and (out / "extra.txt").read_text() == "y"
        assert asides(tmp_path) == [] and (tmp_path / "mine.txt").read_text() == "precious"
        at.check_output_dir(out, overwrite=True)  # and the path is replaceable again
        states.append(state)
        if proc.returncode == 0:
            break
    else:
        pytest.fail("the replacement never completed")
    assert "between" in states and "old" in states and states[-1] == "new", states


def _gap(tmp_path: Path) -> tuple[Path, Path, dict]:
    """The state a kill between the two renames leaves: nothing at ``out``, the old result aside."""
    out = result(tmp_path / "out", "old")
    old = snapshot(out)
    aside = tmp_path / ".out.old-0123456789ab"
    os.rename(out, aside)
    return out, aside, old


@pytest.mark.parametrize("touch", ["check_output_dir", "is_run", "read_meta", "write"])
def test_the_aside_copy_is_restored_by_the_next_touch(tmp_path, touch):
    out, aside, old = _gap(tmp_path)
    if touch == "check_output_dir":
        assert at.check_output_dir(out, overwrite=True) == "replace"
    elif touch == "is_run":
        assert not ck.is_run(out)  # a report, not a run, but it is back
    elif touch == "read_meta":
        with pytest.raises(ck.CheckpointError, match="not a run directory"):
            ck.read_meta(out)
    else:
        with pytest.raises(OutputExistsError, match="pass --overwrite"):  # it is back, so not silently replaced
            at.write_files_atomic(out, {"report.json": "new"}, overwrite=False)
    assert snapshot(out) == old and not aside.exists()


def test_an_aside_copy_is_removed_once_the_new_result_is_in(tmp_path):
    out, aside, old = _gap(tmp_path)
    os.rename(result(tmp_path / "new", "new"), out)  # as if killed after the second rename
    at.recover(out)
    assert not aside.exists() and (out / "report.json").read_text() == "new"


def test_a_removal_cut_short_is_finished(tmp_path):
    out, aside, _ = _gap(tmp_path)
    (aside / "report.json").unlink()  # half removed (its marker still there), and nothing at out
    at.recover(out)
    assert not aside.exists() and not out.exists()


def test_what_is_not_ours_beside_the_path_is_never_deleted_or_restored(tmp_path):
    out, aside, old = _gap(tmp_path)
    (aside / "mine.txt").write_text("precious")  # an aside copy with a file of yours in it
    foreign = tmp_path / ".out.old-feedfacecafe"  # and one not marked as ours at all
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2")
    (out / "x").mkdir(parents=True)  # and something of yours at out, not a result of ours
    at.recover(out)
    assert snapshot(aside) == dict(old, **{"mine.txt": b"precious"}) and (foreign / "data.csv").exists()
    shutil.rmtree(out)
    at.recover(out)  # nothing at out: the aside copy of ours goes back (a rename loses nothing)
    assert snapshot(out) == dict(old, **{"mine.txt": b"precious"}) and (foreign / "data.csv").exists()
    at.recover(out)  # a result of ours at out, but the foreign copy stays
    assert (foreign / "data.csv").read_text() == "1,2"


def test_a_file_added_during_the_swap_puts_the_old_result_back(tmp_path, monkeypatch):
    out = result(tmp_path / "out")
    real, calls = os.rename, []

    def racing(src, dst):
        if not calls:  # the user drops a file in just after the last check
            (Path(src) / "mine.txt").write_text("precious")
        calls.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(at.os, "rename", racing)
    with pytest.raises(OutputExistsError, match="mine.txt") as e:
        at.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    monkeypatch.undo()
    assert str(out) in str(e.value) and ".old-" not in str(e.value)
    assert [c[0] for c in calls] == ["out", calls[0][1]] and calls[1][1] == "out"  # aside, then back
    assert (out / "mine.txt").read_text() == "precious" and (out / "report.json").read_text() == "old"
    assert leftovers(tmp_path) == []


def test_an_npz_appearing_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    path = tmp_path / "p.npz"
    real = at.check_output_file

    def racing(p, *, overwrite=None):  # the last check passes, then a file of yours appears
        state = real(p, overwrite=overwrite)
        if state == "absent" and any(".partial-" in q.name for q in tmp_path.iterdir()):
            Path(p).write_bytes(b"yours")
        return state

    monkeypatch.setattr(at, "check_output_file", racing)
    with pytest.raises(OutputExistsError, match="appeared while it was being written"):
        at.write_npz_atomic(path, {"test": np.ones(2)})
    assert path.read_bytes() == b"yours" and os.listdir(tmp_path) == ["p.npz"]


# -- the directory writer ----------------------------------------------------------------------


def test_writer_marks_the_directory_and_uses_normal_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        out = at.write_files_atomic(tmp_path / "new" / "out", {"report.json": "{}"})
    finally:
        os.umask(old)
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker == {"tool": "mini-unlearn", "kind": "unlearn-report", "format_version": 1,
                      "entries": ["report.json"]}
    assert read_marker(out) == marker
    assert (out.stat().st_mode & 0o777) == 0o750  # not mkdtemp's 0700


def test_an_empty_directory_may_be_written_into(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert at.check_output_dir(out) == "empty"
    at.write_files_atomic(out, {"report.json": "new"})
    assert (out / "report.json").read_text() == "new"


def test_overwrite_replaces_a_result_and_keeps_it_if_the_new_write_fails(tmp_path):
    out = result(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        at.write_files_atomic(out, {"report.json": "new"}, overwrite=False)

    def failing(tmp):
        (tmp / "report.json").write_text("half")
        raise RuntimeError("disk full (test)")

    before = snapshot(out)
    with pytest.raises(RuntimeError, match="disk full"):
        at.write_dir_atomic(out, failing, kind="unlearn-report", overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    at.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert snapshot(out) == {MARKER_NAME: (out / MARKER_NAME).read_bytes(), "report.json": b"new"}
    assert leftovers(tmp_path) == []


# -- what is refused ---------------------------------------------------------------------------


def test_foreign_directory_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    (out / "code").mkdir(parents=True)
    (out / "data.csv").write_text("1,2")
    (out / "code" / "x.py").write_text("print()")
    before = snapshot(out)
    for overwrite in (None, False, True):
        with pytest.raises(OutputExistsError) as e:
            at.write_files_atomic(out, {"report.json": "new"}, overwrite=overwrite)
        msg = str(e.value)
        assert "code, data.csv" in msg and "not written by mini-unlearn" in msg and "choose a new --out" in msg
        assert "--overwrite" not in msg
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("added", ["notes.txt", "sub/notes.txt"])
def test_result_with_an_added_file_is_not_replaced(tmp_path, added):
    out = tmp_path / "out"
    at.write_dir_atomic(out, lambda t: ((t / "sub").mkdir(), (t / "report.json").write_text("old")),
                        kind="unlearned")
    (out / added).write_text("mine")
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=f"1 entry that mini-unlearn did not write \\({added}\\)") as e:
        at.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert "--overwrite" not in str(e.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("kind,msg", [("trained", "never overwritten"), ("attack", "never replaced")])
def test_non_replaceable_kinds(tmp_path, kind, msg):
    out = result(tmp_path / "out", kind=kind)
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=msg) as e:
        at.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert "--overwrite" not in str(e.value) and snapshot(out) == before


def test_legacy_run_without_marker_is_not_replaced(tmp_path):
    out = tmp_path / "old"
    (out / "ckpt").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"kind": "unlearned"}))
    with pytest.raises(OutputExistsError, match="without the .mini-unlearn marker"):
        at.check_output_dir(out, overwrite=True)
    (out / "run.json").write_text(json.dumps({"kind": "trained"}))
    with pytest.raises(OutputExistsError, match="never overwritten"):
        at.check_output_dir(out, overwrite=True)


def test_special_paths_are_refused(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("mine")
    target = result(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    cwd = tmp_path / "a" / "b"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    for path, msg in [(f, "not a directory"), (link, "symbolic link"), (Path("."), "current working directory"),
                      (cwd, "current working directory"), (Path(".."), "parent of the current"),
                      (Path("/"), "parent of the current"), (home, "home directory")]:
        with pytest.raises(OutputExistsError, match=msg) as e:
            at.write_files_atomic(path, {"report.json": "new"}, overwrite=True)
        assert "--overwrite" not in str(e.value)
    assert f.read_text() == "mine" and link.is_symlink() and (target / "report.json").read_text() == "old"
    assert os.listdir(cwd) == [] and os.listdir(home) == []


def test_export_file_rules(tmp_path):
    foreign = tmp_path / "p.npz"
    np.savez(foreign, test=np.zeros(2), forget=np.zeros(2), forget_indices=np.zeros(2))  # same keys, not ours
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by mini-unlearn") as e:
            at.write_npz_atomic(foreign, {"test": np.ones(2)}, overwrite=overwrite)
        assert "--overwrite" not in str(e.value)
    with pytest.raises(OutputExistsError, match="not a regular file"):
        at.check_output_file(tmp_path, overwrite=True)
    ours = at.write_npz_atomic(tmp_path / "sub" / "q.npz", {"test": np.ones(2)})
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        at.write_npz_atomic(ours, {"test": np.zeros(2)}, overwrite=False)
    at.write_npz_atomic(ours, {"test": np.zeros(3)}, overwrite=True)
    with np.load(ours) as z:
        assert z["test"].shape == (3,)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["q.npz"]


# -- end to end through the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "trained"
    assert main(["train", "--data", SPEC, "--model", "logreg", "--l2", "1e-2", "--out", str(out)]) == 0
    assert read_marker(out)["kind"] == "trained"
    return out


def unlearn(run_dir, out, *extra, ratio="0.1"):
    return main(["unlearn", "--run", str(run_dir), "--method", "mini", "--ratio", ratio, "--out", str(out), *extra])


def test_cli_overwrite_on_the_current_directory_is_refused(run_dir, tmp_path, monkeypatch, capsys):
    """The issue's reproduction: `--out . --overwrite` in a folder of the user's files."""
    (tmp_path / "code").mkdir()
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "code" / "x.py").write_text("print('hi')\n")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert unlearn(run_dir, ".", "--overwrite") == 1
    err = capsys.readouterr().err
    assert "current working directory" in err and "--overwrite" not in err
    assert snapshot(tmp_path) == before


def test_cli_folder_of_user_files_is_refused_with_or_without_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "folder"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert unlearn(run_dir, out, *extra) == 1
        err = capsys.readouterr().err
        assert "notes.txt" in err and "choose a new --out" in err and "--overwrite" not in err
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    capsys.readouterr()
    assert main(["train", "--data", SPEC, "--model", "logreg", "--out", str(out)]) == 1
    assert "notes.txt" in capsys.readouterr().err and os.listdir(out) == ["notes.txt"]


@pytest.mark.slow
def test_cli_overwrite_replaces_a_result_and_keeps_it_on_failure(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "u"
    assert unlearn(run_dir, out) == 0
    assert read_marker(out)["kind"] == "unlearned" and load_run(out).removed.size == 20

    def boom(tmp, kind):
        raise RuntimeError("interrupted mid-write (test)")

    with monkeypatch.context() as m:  # the new result is complete except for its marker: the old one stays
        m.setattr(at, "_write_marker", boom)
        before = snapshot(out)
        with pytest.raises(RuntimeError, match="interrupted"):
            unlearn(run_dir, out, "--overwrite", ratio="0.3")
        assert snapshot(out) == before and leftovers(tmp_path) == []
    assert unlearn(run_dir, out, "--overwrite", ratio="0.3") == 0
    assert load_run(out).removed.size == 60 and leftovers(tmp_path) == []
    # a user's file put into the result makes it no longer replaceable
    (out / "my_notes.txt").write_text("mine")
    capsys.readouterr()
    assert unlearn(run_dir, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "my_notes.txt" in err and "--overwrite" not in err
    assert (out / "my_notes.txt").read_text() == "mine" and load_run(out).removed.size == 60


def test_cli_trained_run_is_never_replaced(run_dir, tmp_path, capsys):
    copy = tmp_path / "trained_copy"
    shutil.copytree(run_dir, copy)
    before = snapshot(copy)
    capsys.readouterr()
    assert unlearn(run_dir, copy, "--overwrite") == 1
    assert "never overwritten" in capsys.readouterr().err
    assert snapshot(copy) == before


@pytest.mark.slow
def test_cli_export_probs_never_replaces_a_foreign_file(run_dir, tmp_path, capsys):
    probs = tmp_path / "probs.npz"
    probs.write_bytes(b"the user's own file")
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert unlearn(run_dir, tmp_path / "u", "--export-probs", str(probs), *extra) == 1
        err = capsys.readouterr().err
        assert "not written by mini-unlearn" in err and "--overwrite" not in err
    assert probs.read_bytes() == b"the user's own file" and not (tmp_path / "u").exists()
    mine = tmp_path / "mine.npz"
    assert unlearn(run_dir, tmp_path / "u", "--export-probs", str(mine)) == 0
    capsys.readouterr()
    assert unlearn(run_dir, tmp_path / "u2", "--export-probs", str(mine)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert unlearn(run_dir, tmp_path / "u2", "--export-probs", str(mine), "--overwrite", ratio="0.3") == 0
    with np.load(mine) as z:
        assert z["forget"].shape == (60, 3) and z["test"].shape == (60, 3)


def test_cli_attack_refuses_the_current_directory(run_dir, tmp_path, monkeypatch, capsys):
    unl = tmp_path / "u"
    assert unlearn(run_dir, unl) == 0
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["attack", "--run", str(run_dir), "--unlearned", str(unl), "--out", "."]) == 1
    assert "current working directory" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
