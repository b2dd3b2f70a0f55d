"""One registry idiom for every pluggable part, and `ptl list` over all of them."""

import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import ConfigError
from pyimagesearch_tl.registry import REGISTRIES, Registry

KINDS = ["backbones", "classifiers", "runtimes", "engines", "detectors", "formats"]


def test_every_pluggable_part_lives_in_one_kind_of_registry():
    from pyimagesearch_tl.cli import _registries

    assert sorted(_registries()) == sorted(KINDS)
    assert all(isinstance(registry, Registry) and len(registry) >= 2 for registry in REGISTRIES.values())


@pytest.mark.parametrize("kind", KINDS)
def test_a_taken_name_is_refused_and_an_unknown_one_lists_the_valid_ones(kind):
    registry = REGISTRIES[kind]
    first = registry.names()[0]
    before = registry.get(first)
    with pytest.raises(ValueError, match=f"^{registry.kind} {first!r} is already registered$"):
        registry.register(first, object(), description="a plug-in reusing a name")
    assert registry.get(first) is before  # nothing replaced
    valid = re.escape(", ".join(registry))
    with pytest.raises(ConfigError, match=f"^unknown {registry.kind} 'nope'; choose one of: {valid}$"):
        registry.get("nope")
    with pytest.raises(ConfigError, match=f"^unknown {registry.kind} "):
        registry.get(["a", "list"])  # a config file's wrong type is the same clear error


@pytest.mark.parametrize("kind", KINDS)
def test_ptl_list_prints_each_entry_with_its_description_and_whether_it_is_usable(kind):
    result = CliRunner().invoke(cli, ["list", kind])
    assert result.exit_code == 0, result.output
    header, *lines = result.output.splitlines()
    assert header.split() == ["name", "usable", "here", "description"]
    assert [line.split()[0] for line in lines] == REGISTRIES[kind].names()
    assert all(line.split()[1] in ("yes", "no:") and len(line.split()) > 2 for line in lines)


def test_ptl_list_filters_by_pattern_and_names_what_to_install_for_a_missing_extra():
    result = CliRunner().invoke(cli, ["list", "backbones", "efficientnet_lite*"])
    assert [line.split()[0] for line in result.output.splitlines()[1:]] == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ]
    # Ray and OpenVINO hidden from a fresh process, as on a machine without the extras
    code = (
        "import sys; sys.modules['ray'] = sys.modules['openvino'] = None; "
        "from pyimagesearch_tl.cli import main; sys.argv = ['ptl', 'list', sys.argv[1]]; main()"
    )
    for kind, name, install in (("engines", "ray", "[ray]"), ("runtimes", "openvino", "[openvino]")):
        done = subprocess.run([sys.executable, "-c", code, kind], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        [line] = [line for line in done.stdout.splitlines() if line.startswith(name + " ")]
        assert f"no: pip install 'pyimagesearch_tl{install}'" in line


def test_a_pattern_that_matches_nothing_is_an_error_listing_the_names():
    result = CliRunner().invoke(cli, ["list", "backbones", "zzz*"])
    assert result.exit_code == 1 and "no backbones match 'zzz*'; the backbones are: efficientnet_lite0" in result.output


def test_ptl_backbones_still_lists_the_backbones():
    result = CliRunner().invoke(cli, ["backbones"])
    assert result.exit_code == 0 and "efficientnet_lite0" in result.output
