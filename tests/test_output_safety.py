"""Output safety (issue 12): nothing the tool did not write is ever deleted or replaced.

Unit tests on the checkpoint helpers (markers, checks, the atomic exchange) and end-to-end
tests through ``mini_unlearn_jax.app.cli.main``.
"""

import errno
import json
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from mini_unlearn_jax.app import checkpoint as ck
from mini_unlearn_jax.app.checkpoint import OutputExistsError, load_run
from mini_unlearn_jax.app.cli import main

SPEC = "synthetic:n=200,n_test=60,d=5,classes=3,seed=1"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")


def snapshot(path: Path) -> dict:
    """Every entry below ``path`` with its bytes (None for directories)."""
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def result(path: Path, text: str = "old", kind: str = "unlearn-report") -> Path:
    return ck.write_files_atomic(path, {"report.json": text, "extra.txt": "x"}, overwrite=None, kind=kind)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# -- the exchange ------------------------------------------------------------------------------


@linux_only
def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "g").write_text("B")
    ck.exchange(a, b)
    assert (a / "g").read_text() == "B" and (b / "f").read_text() == "A"
    assert not (a / "f").exists() and not (b / "g").exists()


@linux_only
@pytest.mark.skipif(platform.machine().lower() not in ck._SYS_RENAMEAT2, reason="no syscall number for this CPU")
def test_exchange_through_raw_syscall(tmp_path):
    """The fallback for a libc without the renameat2 wrapper."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("A")
    b.write_text("B")
    assert ck._renameat2_syscall(a, b, ck.RENAME_EXCHANGE) == 0
    assert a.read_text() == "B" and b.read_text() == "A"
    assert ck._renameat2_syscall(a, b, ck.RENAME_NOREPLACE) == errno.EEXIST


def _watch_path(monkeypatch, path: Path) -> list[str]:
    """After every rename/exchange/removal the writer makes, record it if ``path`` holds no result."""
    gaps = []

    def spy(name, fn):
        def wrapped(*a, **kw):
            try:
                return fn(*a, **kw)
            finally:
                if not (path / "report.json").exists():
                    gaps.append(name)
        return wrapped

    monkeypatch.setattr(ck, "_renameat2", spy("renameat2", ck._renameat2))
    monkeypatch.setattr(os, "rename", spy("rename", os.rename))
    monkeypatch.setattr(os, "replace", spy("replace", os.replace))
    monkeypatch.setattr(shutil, "rmtree", spy("rmtree", shutil.rmtree))
    return gaps


@linux_only
def test_replacing_a_result_never_leaves_the_path_empty(tmp_path, monkeypatch):
    out = result(tmp_path / "out", "v0")
    gaps = _watch_path(monkeypatch, out)
    seen_missing = []
    stop = threading.Event()

    def watch():  # a second observer, in parallel with the writer
        while not stop.is_set():
            if not (out / "report.json").exists():
                seen_missing.append(1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 20):
            ck.write_files_atomic(out, {"report.json": f"v{i}", "extra.txt": "x"}, overwrite=True)
    finally:
        stop.set()
        t.join()
    assert gaps == [] and not seen_missing
    assert (out / "report.json").read_text() == "v19" and (out / "extra.txt").read_text() == "x"
    assert leftovers(tmp_path) == []  # every old result was removed


def test_the_watch_sees_the_gap_of_two_renames(tmp_path, monkeypatch):
    """The fallback (no exchange) does leave a moment with nothing at the path; the watch above would see it."""
    def unsupported(src, dst, flags):
        raise OSError(errno.ENOSYS, "not here (test)")

    monkeypatch.setattr(ck, "_renameat2", unsupported)
    out = result(tmp_path / "out", "v0")
    gaps = _watch_path(monkeypatch, out)
    ck.write_files_atomic(out, {"report.json": "v1"}, overwrite=True)
    assert gaps == ["rename"] and (out / "report.json").read_text() == "v1"


# -- the directory writer ----------------------------------------------------------------------


def test_writer_marks_the_directory_and_uses_normal_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        out = ck.write_files_atomic(tmp_path / "new" / "out", {"report.json": "{}"})
    finally:
        os.umask(old)
    marker = json.loads((out / ck.MARKER_NAME).read_text())
    assert marker == {"tool": "mini-unlearn", "kind": "unlearn-report", "format_version": 1,
                      "entries": ["report.json"]}
    assert ck.read_marker(out) == marker
    assert (out.stat().st_mode & 0o777) == 0o750  # not mkdtemp's 0700


def test_an_empty_directory_may_be_written_into(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert ck.check_output_dir(out) == "empty"
    ck.write_files_atomic(out, {"report.json": "new"})
    assert (out / "report.json").read_text() == "new"


def test_overwrite_replaces_a_result_and_keeps_it_if_the_new_write_fails(tmp_path):
    out = result(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        ck.write_files_atomic(out, {"report.json": "new"}, overwrite=False)

    def failing(tmp):
        (tmp / "report.json").write_text("half")
        raise RuntimeError("disk full (test)")

    before = snapshot(out)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.write_dir_atomic(out, failing, kind="unlearn-report", overwrite=True)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    ck.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert snapshot(out) == {ck.MARKER_NAME: (out / ck.MARKER_NAME).read_bytes(), "report.json": b"new"}
    assert leftovers(tmp_path) == []


def test_fallback_without_exchange_still_replaces(tmp_path, monkeypatch):
    def unsupported(src, dst, flags):
        raise OSError(errno.ENOSYS, "not here (test)")

    monkeypatch.setattr(ck, "_renameat2", unsupported)
    out = result(tmp_path / "out")
    ck.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert (out / "report.json").read_text() == "new" and not (out / "extra.txt").exists()
    assert leftovers(tmp_path) == []
    with pytest.raises(OutputExistsError):  # the no-clobber rename is emulated by a check
        ck.write_files_atomic(out, {"report.json": "again"})


@linux_only
def test_a_file_added_during_the_swap_puts_the_old_result_back(tmp_path, monkeypatch):
    out = result(tmp_path / "out")
    real = ck.exchange
    calls = []

    def racing(a, b):
        if not calls:  # the user drops a file in just after the last check
            (Path(b) / "mine.txt").write_text("precious")
        calls.append((a, b))
        real(a, b)

    monkeypatch.setattr(ck, "exchange", racing)
    with pytest.raises(OutputExistsError, match="mine.txt"):
        ck.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert len(calls) == 2  # swapped, then swapped back
    assert (out / "mine.txt").read_text() == "precious" and (out / "report.json").read_text() == "old"
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
            ck.write_files_atomic(out, {"report.json": "new"}, overwrite=overwrite)
        msg = str(e.value)
        assert "code, data.csv" in msg and "not written by mini-unlearn" in msg and "choose a new --out" in msg
        assert "--overwrite" not in msg
    assert snapshot(out) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("added", ["notes.txt", "sub/notes.txt"])
def test_result_with_an_added_file_is_not_replaced(tmp_path, added):
    out = tmp_path / "out"
    ck.write_dir_atomic(out, lambda t: ((t / "sub").mkdir(), (t / "report.json").write_text("old")),
                        kind="unlearned")
    (out / added).write_text("mine")
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=f"1 entry that mini-unlearn did not write \\({added}\\)") as e:
        ck.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert "--overwrite" not in str(e.value)
    assert snapshot(out) == before


@pytest.mark.parametrize("kind,msg", [("trained", "never overwritten"), ("attack", "never replaced")])
def test_non_replaceable_kinds(tmp_path, kind, msg):
    out = result(tmp_path / "out", kind=kind)
    before = snapshot(out)
    with pytest.raises(OutputExistsError, match=msg) as e:
        ck.write_files_atomic(out, {"report.json": "new"}, overwrite=True)
    assert "--overwrite" not in str(e.value) and snapshot(out) == before


def test_legacy_run_without_marker_is_not_replaced(tmp_path):
    out = tmp_path / "old"
    (out / "ckpt").mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"kind": "unlearned"}))
    with pytest.raises(OutputExistsError, match="without the .mini-unlearn marker"):
        ck.check_output_dir(out, overwrite=True)
    (out / "run.json").write_text(json.dumps({"kind": "trained"}))
    with pytest.raises(OutputExistsError, match="never overwritten"):
        ck.check_output_dir(out, overwrite=True)


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
            ck.write_files_atomic(path, {"report.json": "new"}, overwrite=True)
        assert "--overwrite" not in str(e.value)
    assert f.read_text() == "mine" and link.is_symlink() and (target / "report.json").read_text() == "old"
    assert os.listdir(cwd) == [] and os.listdir(home) == []


def test_export_file_rules(tmp_path):
    foreign = tmp_path / "p.npz"
    np.savez(foreign, test=np.zeros(2), forget=np.zeros(2), forget_indices=np.zeros(2))  # same keys, not ours
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by mini-unlearn") as e:
            ck.write_npz_atomic(foreign, {"test": np.ones(2)}, overwrite=overwrite)
        assert "--overwrite" not in str(e.value)
    with pytest.raises(OutputExistsError, match="not a regular file"):
        ck.check_output_file(tmp_path, overwrite=True)
    ours = ck.write_npz_atomic(tmp_path / "sub" / "q.npz", {"test": np.ones(2)})
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        ck.write_npz_atomic(ours, {"test": np.zeros(2)}, overwrite=False)
    ck.write_npz_atomic(ours, {"test": np.zeros(3)}, overwrite=True)
    with np.load(ours) as z:
        assert z["test"].shape == (3,)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["q.npz"]


# -- end to end through the CLI ------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("safety") / "trained"
    assert main(["train", "--data", SPEC, "--model", "logreg", "--l2", "1e-2", "--out", str(out)]) == 0
    assert ck.read_marker(out)["kind"] == "trained"
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


def test_cli_overwrite_replaces_a_result_and_keeps_it_on_failure(run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "u"
    assert unlearn(run_dir, out) == 0
    assert ck.read_marker(out)["kind"] == "unlearned" and load_run(out).removed.size == 20

    def boom(tmp, kind):
        raise RuntimeError("interrupted mid-write (test)")

    with monkeypatch.context() as m:  # the new result is complete except for its marker: the old one stays
        m.setattr(ck, "_write_marker", boom)
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
