"""The output-folder lock: one lock per folder however it is spelled, a clear line when it cannot be
written, and `--wait` saying whom it waits for. The holder is a real second process.

An output folder whose parent cannot be written (a volume mount point) is tried for real, even as
root: under a read-only bind mount in a user namespace (``unshare``), and with permissions as the
unprivileged user ``nobody`` (``setpriv``) when the tests run as root."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import PTLError
from pyimagesearch_tl.locks import FolderBusyError, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from pyimagesearch_tl.errors import PTLError
from pyimagesearch_tl.locks import lock_path, output_lock
try:
    with output_lock(sys.argv[1]):
        print("held", lock_path(sys.argv[1]), flush=True)
        time.sleep(float(sys.argv[2]))
except PTLError as exc:
    print(exc, flush=True)
"""

#: ``ptl`` itself, run by the Python running the tests (the repository first on its path).
PTL = [sys.executable, "-c", "import sys; from pyimagesearch_tl.cli import cli; cli(sys.argv[1:], prog_name='ptl')"]


@contextlib.contextmanager
def held_by_another_process(folder: Path, seconds: float = 30.0, prefix: list[str] = ()):
    """A second Python process (run under the command ``prefix``) holding the lock of ``folder`` for
    ``seconds`` (or until the block ends); its ``lock`` is the lock file it holds."""
    process = subprocess.Popen(
        [*prefix, sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        line = process.stdout.readline().strip()
        assert line.startswith("held "), line
        process.lock = Path(line.removeprefix("held "))
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("alias_of", ["parent", "folder"])
def test_a_symlinked_alias_of_an_output_folder_takes_the_same_lock(tmp_path, alias_of):
    real = tmp_path / "real"
    (real / "features").mkdir(parents=True) if alias_of == "folder" else real.mkdir()
    if alias_of == "parent":  # the folder need not exist yet: its existing part is resolved
        (tmp_path / "alias").symlink_to(real)
        alias = tmp_path / "alias" / "features"
    else:
        alias = tmp_path / "alias"
        alias.symlink_to(real / "features")
    assert lock_path(alias) == lock_path(real / "features")
    with held_by_another_process(real / "features") as holder:
        with pytest.raises(FolderBusyError, match=rf"in use by .*pid {holder.pid}"):
            with output_lock(alias):
                pass
    with output_lock(alias):  # free again once the holder is gone
        pass


def test_wait_says_whom_it_waits_for_then_runs(tmp_path, capsys):
    folder = tmp_path / "models"
    with held_by_another_process(folder, seconds=1.5) as holder:
        started = time.monotonic()
        with output_lock(folder, wait=True):
            waited = time.monotonic() - started
        [line] = capsys.readouterr().err.splitlines()
    assert waited > 0.5
    assert line.startswith(f"waiting for {folder}: in use by ") and f"pid {holder.pid} " in line, line
    assert line.endswith(" ...")


def test_no_word_when_the_folder_is_free(tmp_path, capsys):
    with output_lock(tmp_path / "models", wait=True):
        pass
    assert capsys.readouterr().err == ""


def test_an_output_folder_whose_parent_is_a_file_is_one_clear_error(tmp_path):
    folder, culprit = tmp_path / "notes.txt" / "runs" / "models", tmp_path / "notes.txt"
    culprit.write_text("a file, not a folder")
    with pytest.raises(PTLError, match="cannot write output folder") as caught:
        with output_lock(folder):
            pass
    assert type(caught.value) is PTLError and str(culprit) in str(caught.value)

    features = tmp_path / "features"
    features.mkdir()
    result = CliRunner().invoke(cli, ["train", "--features", str(features), "--output", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"Error: cannot write output folder {folder}: {culprit} is a file, not a folder")
    assert "Traceback" not in result.output


# --- an output folder whose parent cannot be written ---------------------------------------------

RESTRICTIONS = ["read-only mount", "no write permission"]

REPLACING = """
import sys
from pyimagesearch_tl.locks import lock_path, output_lock
print(lock_path(sys.argv[1], replaces_folder=True))
with output_lock(sys.argv[1], replaces_folder=True):
    pass
"""


@pytest.fixture
def world_dir():
    """A fresh folder any user may enter (tmp_path's ancestors are private to the user running the tests)."""
    base = Path(tempfile.mkdtemp(prefix="ptl-locks-"))
    base.chmod(0o755)
    yield base
    for path in [base, *base.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(base)


def _works(command: list[str]) -> str | None:
    """None if ``command`` runs here, else why not."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=60)
    except OSError as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["exit %d" % done.returncode])[-1]


def restricted(restriction: str, parent: Path, writable: Path | None = None) -> list[str]:
    """A command prefix under which folder ``parent`` and all in it cannot be written, even by root,
    but for ``writable`` (a folder in ``parent``, the mount point of a volume); skips where impossible.

    ``read-only mount``: ``parent`` bind-mounted read-only (``writable`` bound read-write over it) in
    a mount namespace of a user namespace, as a container's read-only root with a volume mounted.
    ``no write permission``: ``parent`` chmod 555 (``writable`` 777), the command run as ``nobody``
    when the tests run as root (whom permission bits do not stop).
    """
    if restriction == "read-only mount":
        script = (
            'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && '
            'if [ -n "$2" ]; then mount --bind "$2" "$2" && mount -o remount,bind,rw "$2"; fi && shift 2 && exec "$@"'
        )
        prefix = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh", str(parent)]
        prefix.append(str(writable or ""))
        why = _works([*prefix, sys.executable, "-c", "import pyimagesearch_tl"])
        if why:
            pytest.skip(f"no read-only bind mount in a user namespace here (unshare --map-root-user --mount): {why}")
        return prefix
    for path in [parent, *parent.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o777 if path == writable else 0o555)
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    why = _works([*prefix, sys.executable, "-c", "import pyimagesearch_tl"])
    if why:
        pytest.skip(f"running as root, whom permission bits do not stop, and cannot run as nobody (setpriv): {why}")
    return prefix


def ptl(prefix: list[str], *arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *PTL, *arguments], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("restriction", RESTRICTIONS)
def test_an_output_folder_whose_parent_is_read_only_is_locked_inside_it(world_dir, restriction):
    parent = world_dir / "read-only-root"
    folder = parent / "output"  # a volume's mount point: it can be written, its parent cannot
    folder.mkdir(parents=True)
    features = world_dir / "features"  # empty: train gets past the lock, then finds nothing to train on
    features.mkdir()
    prefix = restricted(restriction, parent, writable=folder)

    with held_by_another_process(folder, prefix=prefix) as holder:
        assert holder.lock == folder / ".ptl-lock"
        second = ptl(prefix, "train", "--features", str(features), "--output", str(folder))
        assert second.returncode == 1, second.stderr
        assert second.stderr.startswith(f"Error: {folder} is in use by "), second.stderr
    third = ptl(prefix, "train", "--features", str(features), "--output", str(folder))  # free again
    assert third.returncode == 1 and "in use" not in third.stderr and "cannot write" not in third.stderr, third.stderr
    assert third.stderr.startswith("Error: no feature file for split"), third.stderr
    assert not (parent / ".output.ptl-lock").exists()

    # A stage that replaces its folder as a whole (build-dataset) needs the parent: never inside.
    replacing = subprocess.run(
        [*prefix, sys.executable, "-c", REPLACING, str(folder)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert replacing.stdout == f"{parent / '.output.ptl-lock'}\n", replacing.stderr
    assert replacing.stderr.splitlines()[-1] == (
        f"pyimagesearch_tl.errors.PTLError: cannot write output folder {folder}: {parent} is not writable (this "
        f"stage builds the whole folder beside where it goes, then moves it in) (cannot create the lock file "
        f"{parent / '.output.ptl-lock'})"
    )


@pytest.mark.parametrize("restriction", RESTRICTIONS)
@pytest.mark.parametrize("folder_state", ["missing", "read-only"])
def test_a_lock_that_can_be_made_neither_beside_nor_inside_the_folder_names_them(world_dir, restriction, folder_state):
    parent = world_dir / "read-only-root"
    parent.mkdir()
    folder = parent / "output"
    if folder_state == "read-only":
        folder.mkdir()
    features = world_dir / "features"
    features.mkdir()
    prefix = restricted(restriction, parent)

    result = ptl(prefix, "train", "--features", str(features), "--output", str(folder))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    [line] = result.stderr.splitlines()
    culprit = folder if folder_state == "read-only" else parent
    assert line.startswith(f"Error: cannot write output folder {folder}: {culprit} is not writable"), line
    assert str(parent / ".output.ptl-lock") in line
    assert (str(folder / ".ptl-lock") in line) == (folder_state == "read-only"), line


def test_the_lock_is_beside_a_folder_whose_parent_can_be_written(tmp_path):
    folder = tmp_path / "output"
    assert lock_path(folder) == tmp_path / ".output.ptl-lock"  # not made yet: beside, the parent is created
    folder.mkdir()
    with output_lock(folder):
        assert (tmp_path / ".output.ptl-lock").exists() and not (folder / ".ptl-lock").exists()


# --- a symlink loop -------------------------------------------------------------------------------


@pytest.mark.parametrize("below", [False, True])
def test_a_symlink_loop_as_output_folder_is_one_clear_error(tmp_path, below):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    folder = tmp_path / "a" / "models" if below else tmp_path / "a"
    message = f"cannot write output folder {folder}: {tmp_path / 'a'} is a symlink loop"
    with pytest.raises(PTLError) as caught:
        lock_path(folder)
    assert str(caught.value) == message
    with pytest.raises(PTLError) as caught:
        with output_lock(folder):
            pass
    assert str(caught.value) == message

    features = tmp_path / "features"
    features.mkdir()
    result = CliRunner().invoke(cli, ["train", "--features", str(features), "--output", str(folder)])
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [f"Error: {message}"]


# --- check_writable creates nothing ----------------------------------------------------------------


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "photos" / "cat.png"
    path.parent.mkdir()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(path)
    return path


@pytest.mark.parametrize("command", ["predict", "export"])
def test_a_failing_run_leaves_no_output_folder_behind(tmp_path, image, command):
    output = tmp_path / "out" / "strayd" / ("r.csv" if command == "predict" else "m.onnx")
    arguments = [command, "--model", str(tmp_path / "missing.skops"), "--output", str(output)]
    result = CliRunner().invoke(cli, arguments + ([str(image)] if command == "predict" else []))
    assert result.exit_code == 1, result.output
    assert "missing.skops" in result.stderr and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no out/strayd


def test_check_writable_creates_nothing_and_names_the_path_at_fault(tmp_path):
    from pyimagesearch_tl.atomic import check_writable

    target = tmp_path / "new" / "deeper" / "r.csv"
    assert check_writable(target) == target
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(PTLError, match=rf"^cannot write .*: {tmp_path / 'notes.txt'} is a file, not a folder$"):
        check_writable(tmp_path / "notes.txt" / "new" / "r.csv")
    with pytest.raises(PTLError, match=r"^cannot write .*: it is a folder$"):
        check_writable(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(PTLError, match=rf"^cannot write .*: {tmp_path / 'loop'} is a symlink loop$"):
        check_writable(tmp_path / "loop" / "r.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop", "notes.txt"]


@pytest.mark.parametrize("restriction", RESTRICTIONS)
def test_check_writable_refuses_a_read_only_place_without_making_it(world_dir, restriction):
    parent = world_dir / "read-only-root"
    parent.mkdir()
    prefix = restricted(restriction, parent)
    check = "import sys; from pyimagesearch_tl.atomic import check_writable; check_writable(sys.argv[1])"
    done = subprocess.run(
        [*prefix, sys.executable, "-c", check, str(parent / "new" / "r.csv")], capture_output=True, text=True, cwd=ROOT
    )
    assert f"PTLError: cannot write {parent / 'new' / 'r.csv'}: {parent} is not writable" in done.stderr, done.stderr
