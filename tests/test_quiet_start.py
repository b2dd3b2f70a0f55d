"""No TensorFlow start-up chatter on stderr by default: commands, scripts and `import pyimagesearch_tl`.

Every run here sets ``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow then prints its oneDNN and absl lines at
import on any x86 CPU (by default only AVX-512 ones do), so the checks fail wherever the lines leak.
"""

import os
import subprocess
import sys

import pytest
from conftest import PTL, chatter, chatty_env, copy_subset, shared


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, empty at first: the notebook-style run (``ImageFeatures``, which
    converts for any job) converts and checks the network too; the small extractions run in TensorFlow."""
    return tmp_path_factory.mktemp("quiet-cache")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    """Four real photos, a cat and a dog in each of two splits: the runs here check what reaches stderr,
    not the features, so each extraction is short."""
    from pyimagesearch_tl.layouts import build_dataset

    work = tmp_path_factory.mktemp("quiet")
    photos = copy_subset(shared("cats_and_dogs_filtered"), work / "photos", 1)
    return build_dataset(photos, work / "dataset", splits=["training", "validation"], fractions=[0.5, 0.5]).output_dir


def _run(args, cache):
    return subprocess.run(args, capture_output=True, text=True, env=chatty_env(XDG_CACHE_HOME=str(cache)), timeout=600)


def test_ptl_extract_writes_no_tensorflow_lines_and_verbose_lets_them_through(tiny_dataset, cache, tmp_path):
    """The numbered scripts are checked the same way where test_pipeline runs them."""
    quiet = _run([*PTL, "extract", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "f1")], cache)
    assert quiet.returncode == 0, quiet.stderr
    assert "extracted" in quiet.stdout
    assert not chatter(quiet.stderr), quiet.stderr
    loud = _run(
        [*PTL, "--verbose", "extract", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "f2")], cache
    )  # the network converted by the quiet run: no second conversion
    assert loud.returncode == 0, loud.stderr
    assert chatter(loud.stderr)  # the chatter exists on this machine: the quiet runs here really suppress it


def test_a_notebook_style_import_is_quiet_and_errors_still_show(tiny_dataset, cache):
    """``import pyimagesearch_tl`` then the API (TensorFlow imported on the way): nothing of TensorFlow's
    on stderr, and the program's own lines still get through."""
    photo = next(tiny_dataset.rglob("*.jpg"))
    code = (
        "import sys, pyimagesearch_tl as ptl; "
        f"print(ptl.ImageFeatures().fit_transform([{str(photo)!r}]).shape); sys.stderr.write('ours\\n')"
    )
    notebook = _run([sys.executable, "-c", code], cache)
    assert notebook.returncode == 0, notebook.stderr
    assert notebook.stdout.strip() == "(1, 1280)"
    assert notebook.stderr == "ours\n", notebook.stderr


def test_the_filter_keeps_errors_and_drops_only_info_and_warning_lines():
    from pyimagesearch_tl.quiet import filtered

    captured = (
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        b"I0000 00:00:1796137007.843687    1962 port.cc:153] oneDNN custom operations are on.\n"
        b"W0000 00:00:1796137007.843599    1962 port.cc:148] TF_ENABLE_ONEDNN_OPTS is not set\n"
        b"E0000 00:00:1796137007.843599    1962 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
        b"Traceback (most recent call last):\n"
    )
    assert filtered(captured) == (
        b"E0000 00:00:1796137007.843599    1962 cuda_dnn.cc:8310] Unable to register cuDNN factory\n"
        b"Traceback (most recent call last):\n"
    )


ERROR_LINE = "E0000 00:00:1796137007.843687    1962 cpu.cc:9] built for instructions this CPU lacks"


def _fake_tensorflow(folder) -> dict:
    """An environment whose ``tensorflow`` prints an info line and an error line as TensorFlow's C++ log
    does, then aborts when ``abort`` is among the arguments; TF_CPP_MIN_LOG_LEVEL unset."""
    fake = folder / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import contextlib, os, sys\n"
        "with contextlib.suppress(OSError):  # as C++ logging, it ignores a closed stderr\n"
        "    os.write(2, b'I0000 00:00:1796137007.843687    1962 port.cc:153] oneDNN custom operations are on.\\n')\n"
        f"    os.write(2, b'{ERROR_LINE}\\n')\n"
        "if 'abort' in sys.argv: os.abort()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(folder / "fake"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def test_what_tensorflow_prints_before_it_aborts_still_gets_through(tmp_path):
    """An import that prints an error and aborts (as TensorFlow does on a CPU it was not built for): the
    error reaches stderr, the chatter before it does not; with stderr closed the import still works."""
    env = _fake_tensorflow(tmp_path)
    code = ["-c", "import sys, pyimagesearch_tl, tensorflow; print('imported')"]
    aborted = subprocess.run([sys.executable, *code, "abort"], capture_output=True, text=True, env=env, timeout=60)
    assert aborted.returncode != 0
    assert aborted.stderr.splitlines() == [ERROR_LINE]
    closed = subprocess.run(
        [sys.executable, *code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, timeout=60
    )
    assert closed.returncode == 0 and closed.stdout == b"imported\n"
    gone = "import os, sys; os.close(2); sys.stderr = None; import pyimagesearch_tl, tensorflow; print('ok')"
    no_stderr = subprocess.run([sys.executable, "-c", gone], capture_output=True, text=True, env=env, timeout=60)
    assert no_stderr.returncode == 0 and no_stderr.stdout == "ok\n"


@pytest.mark.parametrize("level", ["", " ", "abc", "-1", "\u00b2"])
def test_an_empty_or_unreadable_level_counts_as_unset(tmp_path, level):
    """TensorFlow reads an empty or unreadable TF_CPP_MIN_LOG_LEVEL as 0 (every line): it let all the start-up
    lines through. It counts as unset now: the default level 2, errors still shown."""
    env = dict(_fake_tensorflow(tmp_path), TF_CPP_MIN_LOG_LEVEL=level)
    code = "import os, pyimagesearch_tl, tensorflow; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0 and done.stdout == "2\n" and done.stderr.splitlines() == [ERROR_LINE], done.stderr


def test_tf_cpp_min_log_level_1_lets_warnings_through():
    from pyimagesearch_tl.quiet import filtered

    lines = (
        b"I0000 00:00:1796137007.843687    1962 port.cc:153] oneDNN custom operations are on.\n"
        b"W0000 00:00:1796137007.843599    1962 port.cc:148] TF_ENABLE_ONEDNN_OPTS is not set\n"
    )
    assert filtered(lines, level=1) == lines.splitlines(keepends=True)[1]
    assert filtered(lines, level=0) == lines
