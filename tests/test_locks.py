"""The output-folder lock: one lock per folder however it is spelled, a clear line when it cannot be
written, and `--wait` saying whom it waits for. The holder is a real second process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import PTLError
from pyimagesearch_tl.locks import FolderBusyError, lock_path, output_lock

HOLD = """
import sys, time
from pyimagesearch_tl.locks import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path, seconds: float = 30.0):
    """A second Python process holding the lock of ``folder`` for ``seconds`` (or until the block ends)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "held"
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


def _unwritable_place(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(an output folder that cannot be locked, the path the message must name)."""
    if kind == "parent is a file":  # unwritable even for root
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        return tmp_path / "notes.txt" / "runs" / "models", tmp_path / "notes.txt"
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes into a chmod 555 folder anyway")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "models", parent


@pytest.fixture
def restore_permissions(tmp_path):
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


@pytest.mark.parametrize("kind", ["parent is a file", "parent is read-only"])
def test_an_output_folder_whose_lock_cannot_be_written_is_one_clear_error(tmp_path, kind, restore_permissions):
    folder, culprit = _unwritable_place(tmp_path, kind)
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
    assert line.startswith(f"Error: cannot write output folder {folder}: {culprit} is ")
    assert "Traceback" not in result.output
