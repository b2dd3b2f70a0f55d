import pytest
from click.testing import CliRunner

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.config import DEFAULTS, RULES, load_config, validate
from pyimagesearch_tl.errors import ConfigError


def test_defaults_are_valid_and_use_the_offline_backbone():
    config = load_config()
    assert config.backbone == "efficientnet_lite0"
    assert config.splits == ["training", "validation", "evaluation"]
    assert config.split_for("evaluation") == "evaluation"


def test_toml_overrides_defaults_and_options_override_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('batch_size = 8\ncv = 3\nbackbone = "vgg16"\n[grids.logreg]\nC = [0.5, 2.0]\n')
    config = load_config(path)
    assert (config.batch_size, config.cv, config.backbone) == (8, "3", "vgg16")
    assert config.grids == {"logreg": {"C": [0.5, 2.0]}}
    assert config.replace(batch_size=4, backbone=None).batch_size == 4
    assert config.replace(batch_size=4).backbone == "vgg16"


@pytest.mark.parametrize(
    "text, key",
    [
        ("batch_sise = 8", "batch_sise"),
        ('batch_size = "8"', "batch_size"),
        ("batch_size = 0", "batch_size"),
        ('pooling = "mean"', "pooling"),
        ('backbone = "vgg17"', "backbone"),
        ('classifier = "forest"', "classifier"),
        ("split_fractions = [0.5, 0.2, 0.1]", "split_fractions"),
        ('cv = "1"', "cv"),
        ("seed = true", "seed"),
    ],
)
def test_bad_key_or_value_is_an_error_naming_the_key(tmp_path, text, key):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match=repr(key)):
        load_config(path)


def test_unknown_backbone_error_lists_the_valid_names(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('backbone = "vgg17"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "efficientnet_lite0" in str(info.value) and "vgg16" in str(info.value)


def test_ptl_config_prints_effective_configuration(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("batch_size = 7\n")
    result = CliRunner().invoke(cli, ["--config", str(path), "config"])
    assert result.exit_code == 0, result.output
    assert "batch_size = 7" in result.output
    assert f'pooling = "{DEFAULTS["pooling"]}"' in result.output


def test_cli_reports_config_errors_without_traceback(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("colour = 3\n")
    result = CliRunner().invoke(cli, ["config", "--config", str(path)])
    assert result.exit_code != 0
    assert "unknown configuration key 'colour'" in result.output
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(cli, ["config", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_cli_option_values_are_validated_like_the_config(tmp_path):
    result = CliRunner().invoke(cli, ["extract", "--dataset", str(tmp_path), "--backbone", "alexnet"])
    assert result.exit_code != 0
    assert "alexnet" in result.output
    assert "'backbone'" in result.output and "efficientnet_lite0" in result.output
    result = CliRunner().invoke(cli, ["train", "--classifier", "forest"])
    assert result.exit_code != 0 and "'classifier'" in result.output and "logreg" in result.output


@pytest.mark.parametrize(
    "key, value",
    [(key, value) for key, constraint in RULES.items() for value in constraint.refused()],
    ids=lambda v: repr(v)[:30],
)
def test_every_value_a_constraint_refuses_is_an_error_naming_the_key_and_what_it_allows(key, value):
    """Generated from the constraints themselves: each key's typical mistakes (wrong type, out of range,
    not an option, a boolean for a number) are refused with the key, the value and what is allowed."""
    values = dict(DEFAULTS, **{key: value})
    with pytest.raises(ConfigError) as info:
        validate(values)
    assert str(info.value) == f"configuration key {key!r}: got {value!r}, expected {RULES[key].describe()}"


def test_every_default_satisfies_its_constraint_and_every_key_has_one():
    assert RULES.keys() == DEFAULTS.keys()
    assert all(RULES[key].allows(value) for key, value in DEFAULTS.items())
