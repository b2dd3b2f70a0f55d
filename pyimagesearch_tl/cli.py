"""The ``ptl`` command: one click group whose subcommands are the pipeline stages.

Every subcommand is a thin call into the modules above: it merges the configuration (defaults <
``--config FILE`` < command-line options), calls one function and reports. The numbered scripts
in ``scripts/`` run these same commands. Errors the user can fix are printed as one message
without a traceback, with a non-zero exit status.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import unicodedata
import warnings
from pathlib import Path

import click

from .atomic import describe_os_error
from .audit import APPROXIMATE_ROWS, SEARCHES
from .config import Config, load_config
from .errors import ConfigError, PTLError
from .layouts import LAYOUTS, breaks_a_line
from .locks import output_lock
from .novelty import list_detectors
from .store import FORMATS


class PTLCommand(click.Command):
    """Turns :class:`PTLError` into a clean ``Error: ...`` message and warnings into ``warning:`` lines.

    An ``OSError`` that reaches it (an output that cannot be written: disk full, read-only folder) is
    one line too, naming the path and the cause (:func:`~pyimagesearch_tl.atomic.describe_os_error`).
    """

    def invoke(self, ctx: click.Context):
        def show_warning(message, category, filename, lineno, file=None, line=None):
            click.echo(f"warning: {shown(message)}", err=True)

        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            warnings.filterwarnings("default", module="pyimagesearch_tl")
            try:
                return super().invoke(ctx)
            except PTLError as exc:  # messages name files and labels from outside: shown escaped
                raise click.ClickException(shown(exc)) from None
            except OSError as exc:
                raise click.ClickException(shown(describe_os_error(exc))) from None


class PTLGroup(click.Group):
    command_class = PTLCommand


def _split_list(kind):
    def convert(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return [kind(v) for v in items]
        except ValueError:
            raise click.BadParameter(
                f"expected a comma-separated list of {kind.__name__} values, got {value!r}"
            ) from None

    return convert


def shown(name: object) -> str:
    """A file or class name, or a message naming them, as one line of the terminal shows it: what would break
    the line (:func:`~pyimagesearch_tl.layouts.breaks_a_line`: a tab, a newline, an escape sequence, a
    bidirectional override) and undecodable bytes as escapes (``\\t``, ``\\x1b``, ``\\u202e``, ``\\xff``), so
    that a name can neither forge an output line nor drive the terminal; every other character as it is."""
    text = str(name)
    return "".join(map(_escaped, text)) if any(map(_unsafe, text)) else text


def _unsafe(character: str) -> bool:
    return breaks_a_line(character) or unicodedata.category(character) == "Cs"  # a lone surrogate: no terminal's


def _escaped(character: str) -> str:
    if not _unsafe(character):
        return character
    if "\udc80" <= character <= "\udcff":  # an undecodable byte of a file name (surrogateescape)
        return f"\\x{ord(character) - 0xDC00:02x}"
    return character.encode("unicode_escape").decode("ascii")


def _name_paths(ctx, param, values):
    """``NAME=PATH`` pairs into a dict (None when none were given, so the config's value stands)."""
    if not values:
        return None
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=PATH, got {value!r}")
        pairs[name] = path
    return pairs


def features_option(help: str):
    """``--features DIR``, repeatable: one folder, or several whose features are combined."""
    return click.option(
        "--features",
        "features_dir",
        multiple=True,
        callback=lambda ctx, param, values: None if not values else values[0] if len(values) == 1 else list(values),
        help=help,
    )


def with_config(command):
    """Add ``--config FILE`` and pass the effective :class:`Config` as ``config``."""

    @click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False),
        default=None,
        help="TOML file overriding the defaults (command-line options override it).",
    )
    @click.pass_context
    @functools.wraps(command)
    def wrapper(ctx: click.Context, config_file, **options):
        if config_file is None and isinstance(ctx.obj, dict):
            config_file = ctx.obj.get("config_file")
        try:
            config = load_config(config_file)
        except ConfigError as exc:
            raise click.ClickException(shown(exc)) from None
        return ctx.invoke(command, config=config, **options)

    return wrapper


def wait_option(command):
    """``--wait``: queue behind another run that holds the output folder instead of refusing."""
    return click.option(
        "--wait",
        is_flag=True,
        default=False,
        help="If another run is writing the output folder, wait for it instead of refusing.",
    )(command)


def engine_options(command):
    """``--engine``, ``--ray-address``, ``--ray-cpus-per-worker``, ``--shard-size``: where shard work runs."""
    for option in reversed(
        [
            click.option("--engine", help="Where the work runs: local (this process) or ray (a Ray cluster)."),
            click.option(
                "--ray-address", help="ray engine: the cluster to join ('auto': this machine's); unset: start one."
            ),
            click.option(
                "--ray-cpus-per-worker", type=int, help="ray engine: CPUs of each worker (one backbone each)."
            ),
            click.option("--shard-size", type=int, help="Images per shard: the unit of work and of resume."),
        ]
    ):
        command = option(command)
    return command


#: What a Ctrl-C of a run that keeps finished shards says (extract, and predict with --output).
RESUMABLE = "interrupted; finished shards are saved: rerun the same command to resume"


def _say_workers(engine) -> None:
    """The workers of an engine other than this process, in one line."""
    if engine.name != "local":
        click.echo(f"{engine.name}: {len(engine.workers)} workers ({'; '.join(engine.workers)})")


def resize_option(command):
    """``--resize``: how images meet the backbone's square input (extract and finetune take it)."""
    from .images import RESIZE_MODES

    return click.option(
        "--resize",
        type=click.Choice(RESIZE_MODES),
        help="How images meet the square input: squash (the whole image, aspect lost), crop (its centre, at the "
        "backbone's crop share) or letterbox (the whole image on gray margins). Default: the backbone's.",
    )(command)


def runtime_option(command):
    """``--runtime``: where the backbone runs (every command that runs it takes it)."""
    from .runtimes import list_runtimes

    return click.option(
        "--runtime",
        type=click.Choice(list_runtimes()),
        help="Where the backbone runs: auto (the first of OpenVINO, ONNX Runtime, TensorFlow that is installed "
        "and matches TensorFlow), or one by name.",
    )(command)


def trust_pickle_option(command):
    """``--trust-pickle``: every command that loads a bundle also loads one saved as a pickle, when told to."""
    return click.option(
        "--trust-pickle",
        is_flag=True,
        default=False,
        help="Also load a bundle saved as a pickle (before .skops bundles), which runs any code the file holds: "
        "only for files from a source you trust.",
    )(command)


def _apply(config: Config, **overrides) -> Config:
    try:
        return config.replace(**overrides)
    except ConfigError as exc:
        raise click.ClickException(shown(exc)) from None


@click.group(cls=PTLGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML file overriding the defaults for every subcommand.",
)
@click.option(
    "--verbose", is_flag=True, default=False, help="Let TensorFlow print its start-up and C++ log lines (stderr)."
)
@click.version_option(package_name="pyimagesearch_tl")
@click.pass_context
def cli(ctx: click.Context, config_file, verbose):
    """Transfer learning by feature extraction: build-dataset, extract, train, evaluate, predict."""
    if verbose:  # TensorFlow reads it when first imported, which no command has done yet
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    ctx.obj = {"config_file": config_file}


@cli.command("config")
@with_config
def show_config(config: Config):
    """Print the effective configuration as TOML."""
    click.echo(config.to_toml(), nl=False)


def _registries() -> dict:
    """Every registry, once the modules that fill them are imported (none of them imports TensorFlow)."""
    from . import backbones, classifiers, engines, novelty, runtimes, store  # noqa: F401
    from .registry import REGISTRIES

    return REGISTRIES


@cli.command("list")
@click.argument("kind", type=click.Choice(list(_registries())))
@click.argument("pattern", default="*")
def show_registry(kind, pattern):
    """List the registered KIND (backbones, classifiers, ...) whose names match the shell-style PATTERN: each
    name, whether it can be used here (else what to install), and what it is."""
    registry = _registries()[kind]
    if not registry.names(pattern):
        raise click.ClickException(f"no {kind} match {pattern!r}; the {kind} are: {', '.join(registry)}")
    rows = [("name", "usable here", "description")]
    for entry in registry.entries(pattern):
        unusable = entry.unusable()
        rows.append((entry.name, "yes" if unusable is None else f"no: {unusable}", entry.description))
    widths = [max(len(row[k]) for row in rows) for k in (0, 1)]
    for name, usable, description in rows:
        click.echo(f"{name:<{widths[0]}}  {usable:<{widths[1]}}  {description}")


@cli.command("backbones", hidden=True)
@click.pass_context
def show_backbones(context):
    """The same as `ptl list backbones`."""
    context.invoke(show_registry, kind="backbones")


@cli.command("runtimes")
@click.option("--backbone", help="Registered backbone (see `ptl list backbones`).")
@click.option("--weights", help="imagenet, none, or a path to a weights file.")
@click.option("--pooling", type=click.Choice(["avg", "max", "flatten"]))
@click.option("--batch-size", type=int)
@click.option("--benchmark", is_flag=True, help="Also time each runtime here (median of 5 runs on a fixed batch).")
@with_config
def runtimes_command(config: Config, benchmark, **options):
    """List where the backbone can run here: installed, parity with TensorFlow, and (--benchmark) speed."""
    from .features import FeatureExtractor
    from .runtimes import PREFERENCE

    config = _apply(config, **options)
    extractor = FeatureExtractor(
        config.backbone, config.weights, config.pooling, config.batch_size, runtime="tensorflow", views=config.views
    )
    rows = extractor.survey_runtimes(timed=benchmark)
    click.echo(f"{extractor.meta.describe()}; auto takes the first installed runtime that passed, in this order:")
    click.echo(f"{'runtime':<12} {'installed':<9} {'parity (max abs diff)':<22} {'img/s':>7}")
    for row in rows:
        parity = "reference" if row["runtime"] == "tensorflow" else "-"
        if "passed" in row:
            parity = f"{'passed' if row['passed'] else 'FAILED'} ({row['max_abs_diff']:.1e})"
        speed = f"{row['img_per_s']:.1f}" if "img_per_s" in row else "-"
        click.echo(f"{row['runtime']:<12} {'yes' if row['installed'] else 'no':<9} {parity:<22} {speed:>7}")
        if not row["installed"]:
            click.echo(f"  install: {row['install']}")
    auto = next((r["runtime"] for r in rows if r["installed"] and r.get("passed", r["runtime"] == "tensorflow")), None)
    click.echo(f"auto -> {auto} (order: {', '.join(PREFERENCE)})")


@cli.command("build-dataset")
@click.option("--input", "input_dir", help="Folder of photos (class folders, Food-5K names or a labels file).")
@click.option("--output", "dataset_dir", help="Where to write <split>/<class>/ and manifest.csv.")
@click.option("--layout", type=click.Choice(["auto", *LAYOUTS]))
@click.option("--classes", callback=_split_list(str), help="Comma-separated class names (Food-5K: in index order).")
@click.option("--labels", "labels_file", help="Labels file for the labels-file layout.")
@click.option(
    "--split-file",
    "split_files",
    multiple=True,
    callback=_name_paths,
    metavar="NAME=PATH",
    help="split-lists layout: the list file of one split (repeat per split), e.g. train=meta/train.txt.",
)
@click.option("--split-fractions", callback=_split_list(float), help="e.g. 0.75,0.15,0.10")
@click.option("--seed", type=int)
@click.option("--link", type=click.Choice(["copy", "hardlink", "symlink"]))
@click.option("--exclude", help="An audit.csv trimmed to the rows to drop: those images are left out.")
@engine_options
@wait_option
@with_config
def build_dataset_command(config: Config, wait, **options):
    """Build dataset/<split>/<class>/ and manifest.csv from a folder of photos."""
    from . import api

    report = api.build_dataset(config=_apply(config, **options), wait=wait).report
    click.echo(f"layout: {report.layout}")
    for split, counts in report.counts.items():
        detail = ", ".join(f"{shown(label)} {n}" for label, n in sorted(counts.items()))
        click.echo(f"{split}: {sum(counts.values())} images ({detail or 'none'})")
    if report.unlabelled:
        click.echo(f"unlabelled: {len(report.unlabelled)} images not used (listed in unlabelled.csv)")
    for path, reason in report.skipped:
        click.echo(f"skipped {shown(path)}: {shown(reason)}", err=True)
    if report.duplicates:
        groups = len({row["sha256"] for row in report.duplicates})
        click.echo(
            f"warning: {groups} images have identical copies in two splits or under two labels "
            f"(test data leaking into training); see duplicates.csv",
            err=True,
        )
    total = sum(sum(c.values()) for c in report.counts.values())
    click.echo(f"wrote {total} images, skipped {len(report.skipped)}: {report.output_dir}/manifest.csv")


@cli.command("extract")
@click.option("--dataset", "dataset_dir", help="Dataset folder written by build-dataset.")
@click.option("--output", "features_dir", help="Where to write <split>.h5 / <split>.csv.")
@click.option("--backbone", help="Registered backbone (see `ptl list backbones`).")
@click.option("--weights", help="imagenet, none, or a path to a weights file.")
@click.option("--pooling", type=click.Choice(["avg", "max", "flatten"]))
@click.option("--format", "feature_format", type=click.Choice(FORMATS.names()))
@click.option("--dtype", type=click.Choice(["float32", "float16"]), help="Storage type of the features.")
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16", "int8"]),
    help="Arithmetic of the backbone: bfloat16 (CPUs with AVX512-BF16/AMX) or int8 (OpenVINO, calibrated on "
    "the training photos), each gated against float32.",
)
@click.option("--batch-size", type=int)
@click.option(
    "--views",
    type=click.Choice(["1", "2"]),
    callback=lambda ctx, param, value: None if value is None else int(value),
    help="2: average each image's features with its left-right mirror's (one more forward pass per image).",
)
@resize_option
@runtime_option
@engine_options
@wait_option
@with_config
def extract_command(config: Config, wait, **options):
    """Extract one feature file per split with a pretrained backbone."""
    from . import api

    config = _apply(config, **options)

    gated = []

    def report(split):
        quality = json.loads(split.quality) if split.quality else None
        if quality and not gated:  # one line: every split of the job passed the same gate
            gated.append(quality)
            click.echo(
                f"{quality['precision']} against float32 on {quality['images']} photos of this job: mean cosine "
                f"{quality['cosine']:.4f} (lowest {quality['min_cosine']:.4f}), "
                f"probe agreement {quality['agreement']:.4f}"
            )
        if split.up_to_date:
            click.echo(f"{split.split}: up to date, nothing to do ({split.path})")
            return
        note = (
            f", resumed: {split.shards_resumed} of {split.shards} shards were already done"
            if split.shards_resumed
            else ""
        )
        note += f", reused {split.reused} unchanged" if split.reused else ""
        runtime = f", {'/'.join(split.runtimes)}" if split.runtimes else ""
        click.echo(
            f"{split.split}: extracted {split.extracted}, skipped {len(split.skipped)}{note} "
            f"({split.images_per_second:.1f} img/s{runtime}) -> {split.path}"
        )
        if config.engine != "local" and split.nodes:
            click.echo("  shards per node: " + ", ".join(f"{n[:8]} {c}" for n, c in sorted(split.nodes.items())))
        for path, reason in split.skipped:
            click.echo(f"  skipped {shown(path)}: {shown(reason)}", err=True)

    try:
        reports = api.extract(
            config=config, wait=wait, progress=sys.stderr.isatty(), on_split=report, on_engine=_say_workers
        ).reports
    except KeyboardInterrupt:
        raise click.ClickException(RESUMABLE) from None
    extracted = sum(r.extracted for r in reports)
    skipped = sum(len(r.skipped) for r in reports)
    click.echo(f"extracted {extracted}, skipped {skipped}: features in {config.features_dir}")


@cli.command("train")
@features_option("Folder of feature files written by extract; repeat to combine several (e.g. two backbones).")
@click.option("--output", "models_dir", help="Where to write <classifier>.skops bundles.")
@click.option("--classifier", help="Registered classifier, or 'all'.")
@click.option("--cv", help="Number of stratified folds, or 'validation'.")
@click.option("--class-weight", type=click.Choice(["none", "balanced"]))
@click.option("--unknown", help=f"The 'unknown' detector: {', '.join(list_detectors())}.")
@click.option(
    "--streaming/--in-memory",
    default=None,
    help="Learn from the feature file block by block (classifiers with partial_fit, e.g. sgd).",
)
@wait_option
@with_config
def train_command(config: Config, wait, **options):
    """Grid-search and save one bundle per classifier."""
    from . import api

    models = api.train(config=config, wait=wait, **options)  # options not given are None: the config's
    reports = [model.report for model in (models.values() if isinstance(models, dict) else [models])]
    click.echo(f"{'classifier':<12} {'best params':<28} {'cv acc':>7} {'val acc':>8} {'val auc':>8} {'fit s':>7}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for r in reports:
        params = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.best_params.items())
        click.echo(
            f"{r.classifier:<12} {params:<28} {r.cv_score:>7.4f} {fmt(r.validation_accuracy):>8} "
            f"{fmt(r.validation_auc):>8} {r.fit_seconds:>7.1f}"
        )
    for r in reports:
        click.echo(f"saved {r.path}")


@cli.command("evaluate")
@click.option("--model", "model_path", required=True, help="A bundle written by train or finetune.")
@features_option("Folder of feature files (bundles trained on features); one per folder the model combines.")
@click.option("--dataset", "dataset_dir", help="Dataset folder (fine-tuned bundles are evaluated on its images).")
@click.option("--split", help="Split to evaluate (default: evaluation, else validation).")
@click.option("--output", "evaluation_dir", help="Evaluation folder: writes <model>/metrics.json and the plots there.")
@click.option(
    "--unknown-test",
    "unknown_test",
    help="A folder of photos of none of the classes: reports the share the model calls unknown.",
)
@runtime_option
@trust_pickle_option
@wait_option
@with_config
def evaluate_command(config: Config, model_path, split, wait, unknown_test, trust_pickle, **options):
    """Report accuracy, the confusion matrix, ROC AUC and macro F1 of a bundle on a split."""
    from .bundle import Bundle
    from .evaluation import default_split, evaluate, features_for
    from .prediction import expand_paths

    config = _apply(config, **options)
    bundle = Bundle.load(model_path, trust_pickle=trust_pickle)
    if unknown_test:  # checked before the split goes through the model
        if bundle.novelty is None:
            raise ConfigError(f"{model_path} has no 'unknown' detector to test")
        strangers = expand_paths([unknown_test])
        if not strangers:
            raise ConfigError(f"no image files in {unknown_test}")
    if split is None:  # the held-out split when there is one, else the validation split
        split = default_split(
            bundle,
            [config.split_for("evaluation"), config.split_for("validation")],
            config.features_dir,
            config.dataset_dir,
        )
    features, skipped = features_for(
        bundle,
        split,
        config.features_dir,
        config.dataset_dir,
        config.batch_size,
        config.max_image_pixels,
        config.runtime,
    )
    for path, reason in skipped:
        click.echo(f"skipped {shown(path)}: {shown(reason)}", err=True)
    output_dir = Path(config.evaluation_dir) / Path(model_path).stem
    metrics = evaluate(bundle, features, output_dir, split, model_path, wait=wait)
    click.echo(f"{bundle.name} on {split} ({metrics['images']} images)")
    for line in metrics["report_text"].splitlines():  # class names from the bundle
        click.echo(shown(line))
    click.echo("confusion matrix (rows: true, columns: predicted; " + ", ".join(map(shown, metrics["labels"])) + "):")
    for row in metrics["confusion_matrix"]:
        click.echo("  " + " ".join(f"{v:>6}" for v in row))
    if metrics["roc_auc"] is not None:
        click.echo(f"roc_auc: {metrics['roc_auc']:.4f}")
    if "rank5" in metrics:
        click.echo(f"rank-1: {metrics['rank1']:.4f}  rank-5: {metrics['rank5']:.4f}")
    if "unknown" in metrics:
        found = metrics["unknown"]
        click.echo(
            f"unknown: {found['called_unknown']} of {metrics['images']} photos of the classes called unknown "
            f"(detector {found['detector']}, threshold set to keep {bundle.novelty.calibration_rule})"
        )
    click.echo(f"macro F1: {metrics['macro_f1']:.4f}")
    click.echo(f"accuracy: {metrics['accuracy']:.4f}")
    if unknown_test:
        from .atomic import atomic_write_json
        from .prediction import Predictor, rejection

        predictor = Predictor(bundle, config.batch_size, config.max_image_pixels, runtime=config.runtime)
        predictor.expect(len(strangers))
        metrics["unknown_test"] = dict(rejection(predictor, strangers), folder=unknown_test)
        atomic_write_json(output_dir / "metrics.json", metrics)
        test = metrics["unknown_test"]
        click.echo(
            f"unknown test: {test['unknown']} of {test['images']} photos in {unknown_test} called unknown "
            f"({'-' if test['rejected'] is None else format(test['rejected'], '.3f')}, detector {test['detector']}, "
            f"calibrated on the {test['calibration']})"
        )
    click.echo(f"wrote {output_dir / 'metrics.json'}")


@cli.command("audit")
@click.option("--features", "features_dir", help="Folder of feature files written by extract.")
@click.option("--dataset", "dataset_dir", help="The dataset folder the features were extracted from.")
@click.option("--output", "audit_dir", help="Where to write audit.csv, audit.json and the contact sheets.")
@click.option(
    "--neighbour-search",
    type=click.Choice(SEARCHES),
    help=f"Near-duplicate candidates: exact, approximate (faiss), or auto (approximate above {APPROXIMATE_ROWS:,} "
    "rows).",
)
@runtime_option
@wait_option
@with_config
def audit_command(config: Config, wait, **options):
    """Find near-duplicate leaks, likely label errors and outliers from the feature files."""
    from . import api

    report = api.audit(config=_apply(config, **options), wait=wait)
    summary = report.summary
    images = ", ".join(f"{split} {n}" for split, n in summary["images"].items())
    click.echo(f"audited {sum(summary['images'].values())} images ({images}) in {summary['seconds']} s")
    click.echo(
        f"near-duplicates: feature similarity >= {summary['duplicate_threshold']:.3f} and pixel agreement >= "
        f"{summary['pixel_threshold']:.3f} (calibrated on {summary['duplicate_calibration']['copies']} edited copies "
        f"of the dataset's photos)"
    )
    for kind, by_split in summary["counts"].items():
        detail = ", ".join(f"{split} {n}" for split, n in by_split.items())
        click.echo(f"{kind:<10} {sum(by_split.values()):>5}" + (f"  ({detail})" if detail else ""))
    click.echo("wrote " + ", ".join(report.files))


@cli.command("compare")
@click.option(
    "--output",
    "run_dir",
    default="output",
    show_default=True,
    help="The run's output folder: every metrics.json below it is compared.",
)
def compare_command(run_dir):
    """Put every evaluated model of a run in one table and one figure (comparison.csv/.json/.png)."""
    from .evaluation import compare, comparison_warning

    rows, written = compare(run_dir)
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    click.echo(
        f"{'model':<16} {'kind':<22} {'split':<11} {'images':>6} {'accuracy':>8} {'roc_auc':>7} "
        f"{'macro_f1':>8} {'train s':>8} {'size MB':>7}"
    )
    for r in rows:
        click.echo(
            f"{shown(r['model']):<16} {r['kind']:<22} {shown(r['split']):<11} {fmt(r['images'], 'd'):>6} "
            f"{fmt(r['accuracy'], '.4f'):>8} {fmt(r['roc_auc'], '.4f'):>7} {fmt(r['macro_f1'], '.4f'):>8} "
            f"{fmt(r['train_seconds'], '.1f'):>8} {fmt(r['model_mb'], '.2f'):>7}"
        )
    warning = comparison_warning(rows)
    if warning:
        click.echo(f"warning: {shown(warning)}", err=True)
    click.echo("wrote " + ", ".join(written))


@cli.command("finetune")
@click.option("--dataset", "dataset_dir", help="Dataset folder written by build-dataset.")
@click.option("--output", "finetune_dir", help="Where to write the network, the bundle, history.json and the curves.")
@click.option("--backbone", help="Registered backbone (see `ptl list backbones`).")
@click.option("--weights", help="imagenet, none, or a path to a weights file.")
@click.option("--input-size", type=int, help="Square input side (default: the backbone's own).")
@resize_option
@click.option("--head-epochs", type=int, help="Stage 1: epochs of the new head on the frozen backbone.")
@click.option("--finetune-epochs", type=int, help="Stage 2: epochs with the last blocks unfrozen (0: skip).")
@click.option("--unfreeze-blocks", type=int, help="How many of the backbone's last blocks stage 2 trains.")
@click.option("--head-lr", type=float, help="Learning rate of stage 1.")
@click.option("--finetune-lr", type=float, help="Learning rate of stage 2 (much lower).")
@click.option("--augment", type=click.Choice(["none", "light", "strong"]), help="Augmentation of the training images.")
@click.option(
    "--monitor", type=click.Choice(["val_loss", "val_auc"]), help="What early stopping and the checkpoint watch."
)
@click.option("--patience", type=int, help="Epochs without improvement before a stage stops.")
@click.option("--head-dropout", type=float)
@click.option("--head-batchnorm/--no-head-batchnorm", default=None)
@click.option("--class-weight", type=click.Choice(["none", "balanced"]))
@click.option("--batch-size", type=int)
@click.option("--seed", type=int)
@runtime_option
@wait_option
@with_config
def finetune_command(config: Config, wait, **options):
    """Train a new head on the frozen backbone, then fine-tune its last blocks."""
    config = _apply(config, **options)
    with output_lock(config.finetune_dir, wait):  # before TensorFlow's import (finetune locks it again)
        _finetune(config)


def _finetune(config: Config):
    from .finetune import FinetuneSettings, finetune

    settings = FinetuneSettings.from_config(config)

    def report(stage, epoch, logs):
        values = "  ".join(f"{k} {v:.4f}" for k, v in sorted(logs.items()))
        click.echo(f"{stage:<8} epoch {epoch:>3}  {values}")

    try:
        result = finetune(
            config.dataset_dir,
            config.finetune_dir,
            settings,
            training_split=config.split_for("training"),
            validation_split=config.split_for("validation"),
            on_epoch=report,
        )
    except KeyboardInterrupt:
        raise click.ClickException("interrupted before any weights were worth keeping; nothing saved") from None
    if result.interrupted:
        click.echo("interrupted: training stopped early; the best weights so far are saved", err=True)
    best = result.history["best"]
    click.echo(f"validation: {result.holdout}")
    click.echo(
        f"stage 2 unfroze: {', '.join(result.unfrozen) or '(stage 2 skipped)'} (BatchNormalization stays frozen)"
    )
    click.echo(
        f"best {result.history['monitor']} {best['value']:.4f} at epoch {best['epoch']} "
        f"({best['stage']} stage), restored"
    )
    auc = "-" if result.validation_auc is None else f"{result.validation_auc:.4f}"
    click.echo(f"validation accuracy {result.validation_accuracy:.4f}, roc_auc {auc}; {result.seconds:.1f} s")
    for path, reason in sorted(result.skipped.items()):
        click.echo(f"  skipped {shown(path)}: {shown(reason)}", err=True)
    click.echo(f"saved {result.model_path} and {result.bundle_path} (for predict, evaluate and serve)")


@cli.command("predict")
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A bundle written by train or finetune, or an .onnx file written by export (no TensorFlow, no 'unknown').",
)
@click.argument("paths", nargs=-1)
@click.option(
    "--list",
    "file_list",
    type=click.Path(dir_okay=False),
    help="A text file naming one photo per line, with or instead of PATHS: relative paths from its folder; "
    "blank lines and lines starting with # skipped, spaces around a name stripped.",
)
@click.option(
    "--output",
    "output_file",
    type=click.Path(dir_okay=False),
    help="Also write one row per photo to .csv, .parquet or .json; an interrupted run resumes from its shards.",
)
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--batch-size", type=int)
@runtime_option
@engine_options
@trust_pickle_option
@wait_option
@with_config
def predict_command(config: Config, model_path, paths, file_list, output_file, top_k, trust_pickle, wait, **options):
    """Classify images (files, folders, glob patterns, a list file) with a bundle."""
    from .bulk_prediction import PredictionRun
    from .prediction import UNKNOWN

    if not paths and not file_list:
        raise click.UsageError("give the photos to classify: PATHS (files, folders, patterns) or --list FILE")
    config = _apply(config, **options)
    run = PredictionRun.from_config(
        config, model_path, paths, output_file, file_list=file_list, top_k=top_k, trust_pickle=trust_pickle
    )
    model = run.model

    def started(engine, resumed, shards):
        if engine is not None:
            _say_workers(engine)
        if resumed:
            click.echo(f"resumed: {resumed} of {shards} shards were already done")

    def show(rows):
        for row in rows:
            if row["error"] is not None:
                click.echo(f"{shown(row['path'])}\tskipped: {shown(row['error'])}", err=True)
            elif row["unknown"]:
                click.echo(
                    f"{shown(row['path'])}\t{UNKNOWN}\t(closest: {shown(row['top'][0][0])} "
                    f"{model.score_kind}={row['score']:.4f}; "
                    f"{model.novelty.score_name} {row['familiarity']:.3f} < {model.novelty.threshold:.3f})"
                )
            else:
                click.echo(f"{shown(row['path'])}\t{shown(row['label'])}\t{model.score_kind}={row['score']:.4f}")

    try:
        report = run.execute(wait=wait, progress=sys.stderr.isatty(), on_rows=show, on_start=started)
    except KeyboardInterrupt:
        raise click.ClickException(RESUMABLE if run.output is not None else "interrupted; nothing saved") from None
    if report.output is not None:
        click.echo(f"wrote {report.output}")
    novelty = model.novelty
    calibrated = "" if novelty is None else f": threshold set to keep {novelty.calibration_rule}"
    click.echo(f"predicted {report.predicted} ({report.unknown} unknown{calibrated}), skipped {len(report.skipped)}")


@cli.command("serve")
@click.option(
    "--model",
    "model_path",
    required=True,
    help="A bundle written by train or finetune, or an .onnx file written by export (no TensorFlow, no 'unknown').",
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-upload-mb", type=click.FloatRange(min=0, min_open=True), default=10, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=4, show_default=True)
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@runtime_option
@trust_pickle_option
@with_config
def serve_command(config: Config, model_path, host, port, max_upload_mb, threads, top_k, runtime, trust_pickle):
    """Serve an upload page and an HTTP API (POST /api/predict, GET /health) for a bundle."""
    from . import api
    from .serve import serve

    predictor = api.load_predictor(model_path, top_k, trust_pickle=trust_pickle, config=_apply(config, runtime=runtime))
    click.echo(f"serving {model_path} ({predictor.bundle.meta.describe()}) on http://{host}:{port}/  (Ctrl-C stops)")
    serve(predictor, host, port, int(max_upload_mb * 2**20), threads)


@cli.command("export")
@click.option("--model", "model_path", required=True, help="A bundle written by train or finetune.")
@click.option(
    "--output", "output_file", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write."
)
@trust_pickle_option
def export_command(model_path, output_file, trust_pickle):
    """Write a bundle as one ONNX graph: 0-255 RGB pixels in, label and class scores out."""
    from .bundle import Bundle
    from .export import export_bundle

    bundle = Bundle.load(model_path, trust_pickle=trust_pickle)
    path = export_bundle(bundle, output_file)
    click.echo(
        f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB): input 'pixels' uint8 (N, {bundle.meta.input_size}, "
        f"{bundle.meta.input_size}, 3) RGB; outputs 'label' and class scores; labels: {', '.join(bundle.label_names)}"
    )


@cli.command("convert-bundle")
@click.option("--model", "model_path", required=True, help="A bundle, e.g. a pickle saved before .skops bundles.")
@click.option(
    "--output", "output_file", type=click.Path(dir_okay=False), help="The .skops file to write (default: beside it)."
)
@trust_pickle_option
def convert_bundle_command(model_path, output_file, trust_pickle):
    """Save a bundle again as .skops: a file that cannot run code when loaded (a pickle needs --trust-pickle)."""
    from .atomic import check_writable
    from .bundle import BUNDLE_SUFFIX, Bundle

    output = Path(output_file or Path(model_path).with_suffix(BUNDLE_SUFFIX))
    check_writable(output)
    path = Bundle.load(model_path, trust_pickle=trust_pickle).save(output)
    click.echo(f"wrote {path}")


#: Subcommands by name, for the numbered scripts.
COMMANDS = cli.commands


def run_script(name: str) -> None:
    """Entry point of a numbered script: run subcommand ``name`` with the script's arguments."""
    COMMANDS[name].main(prog_name=Path(sys.argv[0]).name)


def main() -> None:
    cli.main(prog_name="ptl")
