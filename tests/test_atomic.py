"""Output sets: all or nothing (errors, SIGTERM, a racing writer), checked before work, stale parts cleaned."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from maisi2 import atomic
from maisi2.atomic import OutputError, check_outputs, output_set

SRC = Path(__file__).resolve().parents[1] / "src"


def _write_all(staged, text="new"):
    for target, tmp in staged.items():
        tmp.write_text(f"{text} {target.name}")


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_set_appears_together_and_an_error_leaves_nothing(tmp_path):
    targets = [tmp_path / "out" / n for n in ("ct.nii.gz", "ct_report.json")]
    with pytest.raises(RuntimeError, match="broken"):
        with output_set(targets) as staged:
            _write_all(staged)
            raise RuntimeError("broken")
    assert _names(tmp_path / "out") == []
    with output_set(targets) as staged:
        _write_all(staged)
    assert _names(tmp_path / "out") == ["ct.nii.gz", "ct_report.json"]
    assert (tmp_path / "out" / "ct.nii.gz").read_text() == "new ct.nii.gz"
    assert oct((tmp_path / "out" / "ct.nii.gz").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_writer_racing_for_the_same_name_never_replaces_the_other(tmp_path):
    """The no-overwrite check is the link() that places the file: no check-then-rename window."""
    targets = [tmp_path / "a.txt", tmp_path / "b.txt"]
    with pytest.raises(FileExistsError, match="appeared while"):
        with output_set(targets) as staged:
            _write_all(staged, "late")
            (tmp_path / "b.txt").write_text("first writer")  # the other run finished meanwhile
    assert (tmp_path / "b.txt").read_text() == "first writer"
    assert _names(tmp_path) == ["b.txt"]  # a.txt, placed first, was taken back: all or nothing


def test_overwrite_puts_the_old_files_back_when_placing_fails(tmp_path, monkeypatch):
    targets = [tmp_path / n for n in ("a.txt", "b.txt", "c.txt")]
    for t in targets:
        t.write_text(f"old {t.name}")
    real_place = atomic._place

    def fail_on_c(tmp, target):
        if target.name == "c.txt":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        real_place(tmp, target)

    monkeypatch.setattr(atomic, "_place", fail_on_c)
    with pytest.raises(OutputError, match="disk is full"):
        with output_set(targets, overwrite=True) as staged:
            _write_all(staged)
    assert [t.read_text() for t in targets] == ["old a.txt", "old b.txt", "old c.txt"]
    assert _names(tmp_path) == ["a.txt", "b.txt", "c.txt"]
    monkeypatch.setattr(atomic, "_place", real_place)
    with output_set(targets, overwrite=True) as staged:
        _write_all(staged)
    assert [t.read_text() for t in targets] == ["new a.txt", "new b.txt", "new c.txt"]


def test_a_full_disk_while_writing_is_one_line_naming_the_target(tmp_path):
    target = tmp_path / "ct.nii.gz"
    with pytest.raises(OutputError) as err:
        with output_set([target]) as staged:
            raise OSError(errno.ENOSPC, "No space left on device", str(staged[target]))
    assert str(err.value) == f"writing {target} failed (No space left on device); the disk is full: free some " \
                             "space or choose another output folder"
    assert _names(tmp_path) == []


def _child(tmp_path, body: str) -> subprocess.Popen:
    script = textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, "the child ended early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sigterm_while_the_set_is_placed_lands_after_it(tmp_path):
    """The child is killed by SIGTERM (default action) in the middle of placing 4 files: all 4 are there."""
    proc = _child(tmp_path, """
        import sys, time
        from pathlib import Path
        from maisi2 import atomic
        out = Path(sys.argv[1])
        real = atomic._place
        def slow_place(tmp, target):
            (out / "placing").touch()
            time.sleep(0.3)
            real(tmp, target)
        atomic._place = slow_place
        with atomic.output_set([out / f"f{i}.txt" for i in range(4)]) as staged:
            for target, tmp in staged.items():
                tmp.write_text(target.name)
        time.sleep(30)  # not reached: the held SIGTERM is delivered as soon as the set is in place
    """)
    _wait_for(tmp_path / "placing", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == -signal.SIGTERM
    assert _names(tmp_path) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt", "placing"]


def test_sigterm_while_writing_leaves_nothing_under_the_cli_handler(tmp_path):
    """Under `maisi2` SIGTERM stops like Ctrl-C: the staged files are removed, nothing is placed, exit 143."""
    proc = _child(tmp_path, """
        import sys, time
        from pathlib import Path
        from maisi2 import atomic, cli
        out = Path(sys.argv[1])
        def work():
            with atomic.output_set([out / "ct.nii.gz", out / "ct_report.json"]) as staged:
                for tmp in staged.values():
                    tmp.write_text("partial")
                (out / "writing").touch()
                time.sleep(30)
        with cli._sigterm_stops_cleanly():
            work()
    """)
    _wait_for(tmp_path / "writing", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert _names(tmp_path) == ["writing"]


def test_parts_of_a_killed_writer_are_cleaned_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".ct.nii.gz.{dead_pid}-0123abcd.part.nii.gz"
    nested = tmp_path / f"..ct.nii.gz.{dead_pid}-0123abcd.part.nii.gz.{dead_pid}-4567cdef.part.nii.gz"
    alive = tmp_path / f".ct.nii.gz.{os.getppid()}-89abcdef.part.nii.gz"  # a writer still running
    for part in (stale, nested, alive):
        part.write_text("x")
    check_outputs([tmp_path / "ct.nii.gz"])
    assert _names(tmp_path) == [alive.name]


def test_outputs_are_checked_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "ct.nii.gz").mkdir()
    with pytest.raises(ValueError, match="is a folder; name the output file itself"):
        check_outputs([tmp_path / "ct.nii.gz"], overwrite=True)
    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_outputs([tmp_path / "taken.json"])
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file, so no output folder can be made"):
        check_outputs([tmp_path / "file" / "sub" / "ct.nii.gz"])
    with pytest.raises(OutputError, match="MiB free but the outputs need about"):
        check_outputs([tmp_path / "new" / "ct.nii.gz"], needed_bytes=2**62)
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_an_unwritable_folder_is_refused_before_work(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match=r"cannot write in .* \(Permission denied\); choose an output folder"):
        check_outputs([tmp_path / "ct.nii.gz"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the monkeypatched test covers it")
def test_a_read_only_folder_is_refused_before_work(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write in"):
            check_outputs([folder / "ct.nii.gz"])
    finally:
        folder.chmod(0o755)
