"""What the fine-tuning tests share: tiny settings (64 px, one epoch per stage) and the CLI in-process.

The runs are tiny: they check the mechanics, not the accuracy (benchmarks/finetune.py measures that).
"""

from click.testing import CliRunner

from pyimagesearch_tl import finetune as ft  # registers the Preprocess layer
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.config import load_config


def settings_with(**overrides) -> ft.FinetuneSettings:
    """The default configuration's fine-tuning settings, with ``overrides``."""
    return ft.FinetuneSettings.from_config(load_config().replace(**overrides))


def options(settings: dict) -> list[str]:
    """``ptl finetune`` options for :func:`settings_with` keys: ``{"head_epochs": 2}`` -> ``--head-epochs 2``."""
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


SIZE = 64
#: Tiny settings (64 px, one epoch per stage), as :func:`settings_with` keys; :data:`TINY` as ``ptl`` options.
TINY_SETTINGS = dict(input_size=SIZE, batch_size=8, head_epochs=1, finetune_epochs=1, unfreeze_blocks=2, seed=7)
TINY = options(TINY_SETTINGS)


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def validation_rows(dataset):
    from pyimagesearch_tl.features import dataset_rows

    return dataset_rows(dataset)["validation"]
