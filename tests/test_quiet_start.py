"""No TensorFlow start-up chatter on stderr by default: commands, scripts and `import pyimagesearch_tl`.

Every run here sets ``TF_ENABLE_ONEDNN_OPTS=1``: TensorFlow then prints its oneDNN and absl lines at
import on any x86 CPU (by default only AVX-512 ones do), so the checks fail wherever the lines leak.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHATTER = (
    "oneDNN custom operations",
    "absl::InitializeLog",
    "This TensorFlow binary is optimized",
    "cpu_feature_guard",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module, empty at first: the first run converts and checks the network too."""
    return tmp_path_factory.mktemp("quiet-cache")


@pytest.fixture(scope="module")
def tiny_dataset(pipeline_run):
    return pipeline_run["dataset"]


def _run(args, cache):
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # as a user's shell has it
    env["XDG_CACHE_HOME"] = str(cache)
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"  # the lines an AVX-512 CPU prints by default, on every CPU
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def test_ptl_extract_writes_no_tensorflow_lines_and_verbose_lets_them_through(tiny_dataset, cache, tmp_path):
    ptl = [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()"]
    quiet = _run([*ptl, "extract", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "f1")], cache)
    assert quiet.returncode == 0, quiet.stderr
    assert "extracted" in quiet.stdout
    assert not [line for line in quiet.stderr.splitlines() if any(c in line for c in CHATTER)], quiet.stderr
    loud = _run(
        [*ptl, "--verbose", "extract", "--dataset", str(tiny_dataset), "--output", str(tmp_path / "f2")], cache
    )  # the network converted by the quiet run: no second conversion
    assert loud.returncode == 0, loud.stderr
    assert any(c in loud.stderr for c in CHATTER)  # the chatter exists: the quiet run really suppressed it


def test_a_numbered_script_and_a_notebook_style_import_are_quiet(tiny_dataset, cache, tmp_path):
    script = _run(
        [
            sys.executable,
            str(ROOT / "scripts" / "02_extract_features.py"),
            "--dataset",
            str(tiny_dataset),
            "--output",
            str(tmp_path / "features"),
        ],
        cache,
    )
    assert script.returncode == 0, script.stderr
    assert not any(c in script.stderr for c in CHATTER), script.stderr
    photo = next(tiny_dataset.rglob("*.jpg"))
    notebook = _run(
        [
            sys.executable,
            "-c",
            f"import pyimagesearch_tl as ptl; print(ptl.ImageFeatures().fit_transform([{str(photo)!r}]).shape)",
        ],
        cache,
    )
    assert notebook.returncode == 0, notebook.stderr
    assert notebook.stdout.strip() == "(1, 1280)"
    assert not any(c in notebook.stderr for c in CHATTER), notebook.stderr


def test_importing_the_package_then_tensorflow_is_quiet_and_errors_still_show(tmp_path):
    code = "import pyimagesearch_tl, tensorflow, sys; print('imported'); sys.stderr.write('ours\\n')"
    quiet = _run([sys.executable, "-c", code], tmp_path)
    assert quiet.returncode == 0 and quiet.stdout == "imported\n", quiet.stderr
    assert quiet.stderr == "ours\n"  # nothing of TensorFlow's, and our own lines still get through
    verbose = _run(
        [
            sys.executable,
            "-c",
            code.replace(
                "import pyimagesearch_tl,",
                "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '0'; import pyimagesearch_tl,",
            ),
        ],
        tmp_path,
    )
    assert any(c in verbose.stderr for c in CHATTER), verbose.stderr  # the lines exist; quiet removed them


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


def test_what_tensorflow_prints_before_it_aborts_still_gets_through(tmp_path):
    """An import that prints an error and aborts (as TensorFlow does on a CPU it was not built for): the
    error reaches stderr, the chatter before it does not; with stderr closed the import still works."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "import contextlib, os, sys\n"
        "with contextlib.suppress(OSError):  # as C++ logging, it ignores a closed stderr\n"
        "    os.write(2, b'I0000 00:00:1796137007.843687    1962 port.cc:153] oneDNN custom operations are on.\\n')\n"
        "    os.write(2, b'E0000 00:00:1796137007.843687    1962 cpu.cc:9] built for instructions this CPU lacks\\n')\n"
        "if 'abort' in sys.argv: os.abort()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    code = ["-c", "import sys, pyimagesearch_tl, tensorflow; print('imported')"]
    aborted = subprocess.run([sys.executable, *code, "abort"], capture_output=True, text=True, env=env, timeout=60)
    assert aborted.returncode != 0
    assert aborted.stderr.splitlines() == [
        "E0000 00:00:1796137007.843687    1962 cpu.cc:9] built for instructions this CPU lacks"
    ]
    closed = subprocess.run(
        [sys.executable, *code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, timeout=60
    )
    assert closed.returncode == 0 and closed.stdout == b"imported\n"
    gone = "import os, sys; os.close(2); sys.stderr = None; import pyimagesearch_tl, tensorflow; print('ok')"
    no_stderr = subprocess.run([sys.executable, "-c", gone], capture_output=True, text=True, env=env, timeout=60)
    assert no_stderr.returncode == 0 and no_stderr.stdout == "ok\n"


def test_tf_cpp_min_log_level_1_lets_warnings_through():
    from pyimagesearch_tl.quiet import filtered

    lines = (
        b"I0000 00:00:1796137007.843687    1962 port.cc:153] oneDNN custom operations are on.\n"
        b"W0000 00:00:1796137007.843599    1962 port.cc:148] TF_ENABLE_ONEDNN_OPTS is not set\n"
    )
    assert filtered(lines, level=1) == lines.splitlines(keepends=True)[1]
    assert filtered(lines, level=0) == lines
