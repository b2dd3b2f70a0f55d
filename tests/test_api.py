"""The Python way in (``import pyimagesearch_tl as ptl``) and the scikit-learn transformer, on real photos."""

import pickle
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared
from PIL import Image

import pyimagesearch_tl as ptl
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.store import read_features


@pytest.fixture(scope="module")
def walk(cats_dogs, pipeline_run, tmp_path_factory):
    """build -> extract -> train through the API, as the README's Python example does. The photos are the
    shared extraction's, and its feature files are copied where ptl.extract writes: the API's build and
    defaults must make them up to date (checked in the first test) instead of extracting them again."""
    work = tmp_path_factory.mktemp("api")
    dataset = ptl.build_dataset(cats_dogs, work / "dataset", split_fractions=[0.75, 0.15, 0.10])
    shutil.copytree(pipeline_run["features"], work / "features")
    features = ptl.extract(dataset, work / "features", batch_size=16)
    model = ptl.train(features, work / "models", classifier="logreg", cv="2")
    return dict(work=work, dataset=dataset, features=features, model=model)


def test_build_extract_train_evaluate_predict_save_load(walk, cats_dogs):
    """The API's objects: the dataset's counts and layout, the features as arrays, a model that evaluates,
    predicts, saves and loads (predicting the same in TensorFlow)."""
    dataset, features, model = walk["dataset"], walk["features"], walk["model"]
    assert dataset.counts == {"training": {"cats": 15, "dogs": 15}, "validation": {"cats": 15, "dogs": 15}}
    assert dataset.report.layout == "class-folders"
    assert sorted(features) == ["training", "validation"]
    assert [(r.split, r.up_to_date) for r in features.reports] == [("training", True), ("validation", True)]
    X, y = features["training"].load()
    assert X.shape == (30, 1280) and X.dtype == np.float32 and sorted(np.bincount(y)) == [15, 15]
    assert features["training"].label_names == ["cats", "dogs"] == model.label_names

    metrics = model.evaluate(features["validation"], walk["work"] / "evaluation")
    assert metrics["images"] == 30 and metrics["accuracy"] >= 0.9
    assert (walk["work"] / "evaluation" / "metrics.json").is_file()

    photos = sorted((cats_dogs / "validation" / "dogs").glob("*.jpg"))[:4]
    predictions = model.predict(photos)
    assert [p.label for p in predictions].count("dogs") >= 3
    saved = model.save(walk["work"] / "copy.skops")
    again = ptl.load_model(saved, runtime="tensorflow")
    reloaded = again.predict(photos)
    assert [p.label for p in reloaded] == [p.label for p in predictions]
    np.testing.assert_allclose([p.score for p in reloaded], [p.score for p in predictions], atol=1e-4)


def test_the_command_line_and_the_api_give_the_same_model(walk, tmp_path):
    """One code path: ptl train on the same features writes the same classifier as ptl.train."""
    result = CliRunner().invoke(
        cli, ["train", "--features", str(walk["features"].path), "--output", str(tmp_path), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    from_cli = ptl.load_model(tmp_path / "logreg.skops")
    validation = read_features(walk["features"]["validation"].path)
    ours, _ = walk["model"].bundle.scores(validation.features)
    theirs, _ = from_cli.bundle.scores(validation.features)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)
    assert from_cli.bundle.info["best_params"] == walk["model"].bundle.info["best_params"]


def test_api_errors_are_the_command_lines_errors(walk, tmp_path):
    with pytest.raises(ptl.ConfigError) as api_error:
        ptl.train(walk["features"], tmp_path, classifier="nope")
    result = CliRunner().invoke(
        cli, ["train", "--features", str(walk["features"].path), "--output", str(tmp_path), "--classifier", "nope"]
    )
    assert result.exit_code != 0
    assert result.output.strip() == f"Error: {api_error.value}"
    assert "configuration key 'classifier': got 'nope'" in str(api_error.value)
    with pytest.raises(ptl.PTLError, match="does not exist"):
        ptl.extract(tmp_path / "missing", tmp_path / "features")
    with pytest.raises(ptl.PTLError, match="no feature file for split 'evaluation'"):
        walk["features"]["evaluation"]


# --- the scikit-learn transformer --------------------------------------------------------------------


def _photos(per_class: int, split: str = "train"):
    root = shared("cats_and_dogs_filtered", split)
    paths, labels = [], []
    for label in ("cats", "dogs"):
        found = sorted((root / label).glob("*.jpg"))[:per_class]
        paths += [str(p) for p in found]
        labels += [label] * len(found)
    return paths, np.array(labels)


def test_transformer_in_a_pipeline_trains_on_paths_in_grid_search_and_cross_validation():
    """A pipeline of the transformer, a scaler and a classifier learns cats from dogs on image paths, in
    cross-validation and in a grid search (12 photos per class: every fit extracts its fold again); pickled, it
    is small and predicts the same after rebuilding the network."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    paths, labels = _photos(12)
    pipeline = make_pipeline(ptl.ImageFeatures(batch_size=16), StandardScaler(), LogisticRegression(max_iter=2000))
    folds = StratifiedKFold(2, shuffle=True, random_state=0)
    scores = cross_val_score(pipeline, paths, labels, cv=folds)
    assert scores.mean() >= 0.85
    search = GridSearchCV(pipeline, {"logisticregression__C": [0.01, 1.0]}, cv=folds).fit(paths, labels)
    test_paths, test_labels = _photos(10, "validation")
    assert (search.predict(test_paths) == test_labels).mean() >= 0.85

    # pickled without the network: small, and it rebuilds the network to predict the same
    blob = pickle.dumps(search.best_estimator_)
    assert len(blob) < 200_000
    restored = pickle.loads(blob)
    np.testing.assert_allclose(
        restored.predict_proba(test_paths), search.best_estimator_.predict_proba(test_paths), atol=1e-6
    )


def test_transformer_features_equal_the_extracted_feature_files(pipeline_run):
    stored = read_features(pipeline_run["features"] / "training.h5")
    paths = [str(pipeline_run["dataset"] / p) for p in stored.paths]
    features = ptl.ImageFeatures().fit(paths).transform(paths)
    np.testing.assert_allclose(features, stored.features, atol=1e-4)


def test_transformer_takes_uint8_images_like_files(tmp_path):
    from sklearn.exceptions import NotFittedError

    paths, _ = _photos(2)
    pixels = [np.asarray(Image.open(p).convert("RGB").resize((224, 224)), dtype=np.uint8) for p in paths]
    files = []
    for index, array in enumerate(pixels):  # lossless files of exactly these pixels
        files.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(array).save(files[-1])
    transformer = ptl.ImageFeatures(runtime="tensorflow")
    with pytest.raises(NotFittedError):
        transformer.transform(files)
    from_arrays = transformer.fit(np.stack(pixels)).transform(np.stack(pixels))
    np.testing.assert_allclose(from_arrays, transformer.transform(files), atol=1e-5)
    assert transformer.get_feature_names_out()[0] == "efficientnet_lite0_avg_0"
    with pytest.raises(ptl.ImageError, match="not_there.jpg"):
        transformer.transform(files + [str(tmp_path / "not_there.jpg")])
    with pytest.raises(ValueError, match="got float64 array of shape \\(4, 3\\)"):
        transformer.fit(np.zeros((4, 3)))
    with pytest.raises(ptl.ConfigError, match="configuration key 'backbone': got 'alexnet'"):
        ptl.ImageFeatures(backbone="alexnet").fit(files)


#: Checks of sklearn.utils.estimator_checks that feed a numeric table (X of shape (n, features)) and
#: so cannot apply to a transformer whose input is images. Every other check must pass.
NEEDS_A_NUMERIC_TABLE = {
    "check_fit_score_takes_y",
    "check_estimators_overwrite_params",
    "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self",
    "check_readonly_memmap_input",
    "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit",
    "check_estimators_dtypes",
    "check_complex_data",
    "check_dtype_object",
    "check_estimators_empty_data_messages",
    "check_pipeline_consistency",
    "check_estimators_nan_inf",
    "check_estimators_pickle",
    "check_f_contiguous_array_estimator",
    "check_transformer_data_not_an_array",
    "check_transformer_general",
    "check_transformer_preserve_dtypes",
    "check_methods_sample_order_invariance",
    "check_methods_subset_invariance",
    "check_fit2d_1sample",
    "check_fit2d_1feature",
    "check_dict_unchanged",
    "check_fit_idempotent",
    "check_fit_check_is_fitted",
    "check_n_features_in",
    "check_fit2d_predict1d",
}


def test_scikit_learn_estimator_checks(recwarn):
    """scikit-learn's own checks. The tags say the input is not a numeric table, so check_estimator would
    skip everything; a probe claiming 2-D input runs them all, and only the numeric-table ones may fail."""
    from sklearn.utils.estimator_checks import check_estimator

    class Probe(ptl.ImageFeatures):
        def __sklearn_tags__(self):
            tags = super().__sklearn_tags__()
            tags.input_tags.two_d_array = True
            return tags

    results = check_estimator(Probe(weights="none"), on_fail=None)
    failed = {r["check_name"] for r in results if r["status"] == "failed"}
    passed = {r["check_name"] for r in results if r["status"] == "passed"}
    assert failed <= NEEDS_A_NUMERIC_TABLE, f"failed for another reason: {sorted(failed - NEEDS_A_NUMERIC_TABLE)}"
    assert {
        "check_no_attributes_set_in_init",
        "check_parameters_default_constructible",
        "check_get_params_invariance",
        "check_set_params",
        "check_estimator_cloneable",
        "check_estimators_unfitted",
        "check_transformers_unfitted",
        "check_do_not_raise_errors_in_init_or_set_params",
        "check_estimator_sparse_array",
        "check_estimator_sparse_matrix",
        "check_estimator_repr",
    } <= passed
    for result in results:  # the numeric-table checks failed on the input, not on something else
        if result["status"] == "failed" and result["check_name"] not in (
            "check_estimators_nan_inf",
            "check_positive_only_tag_during_fit",
        ):
            assert "ImageFeatures takes" in str(result["exception"]), result


def test_transformer_takes_the_paths_column_a_column_transformer_passes():
    """A data frame's column of paths, selected as a list (a one-column DataFrame) or by name (a Series),
    or an (n, 1) array: the features of the paths; a table of several columns is refused."""
    pd = pytest.importorskip("pandas")
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    paths, labels = _photos(6)
    test_paths, test_labels = _photos(3, "validation")
    frame = pd.DataFrame({"path": paths, "owner": ["ann", "bob"] * 6})
    test_frame = pd.DataFrame({"path": test_paths, "owner": ["ann"] * 6})
    columns = ColumnTransformer([("image", ptl.ImageFeatures(), ["path"])])
    model = make_pipeline(columns, StandardScaler(), LogisticRegression(max_iter=2000)).fit(frame, labels)
    assert (model.predict(test_frame) == test_labels).mean() >= 0.8
    expected = ptl.ImageFeatures().fit(test_paths).transform(test_paths)
    np.testing.assert_allclose(model[0].transform(test_frame), expected, atol=1e-5)
    by_name = ColumnTransformer([("image", ptl.ImageFeatures(), "path")])
    np.testing.assert_allclose(by_name.fit_transform(test_frame), expected, atol=1e-5)
    column = np.asarray(test_paths, dtype=object).reshape(-1, 1)
    np.testing.assert_allclose(ptl.ImageFeatures().fit(column).transform(column), expected, atol=1e-5)
    with pytest.raises(
        ValueError, match=r"one column of image file paths; got a DataFrame with 2 columns \['path', 'owner'\]"
    ):
        ptl.ImageFeatures().fit(frame)


def test_threads_fitting_at_once_build_the_backbone_once(default_network):
    """Two fits at the same moment (a threaded grid search, a server's first requests) share one build.

    The default backbone, whose network the session has converted and checked: the extractor learns its
    width from it, without building the Keras model (with random weights, the build took 2 to 42 s here)."""
    import threading

    from pyimagesearch_tl import estimators

    paths, _ = _photos(1)
    parameters = dict(batch_size=3)  # parameters no other test builds: a sure miss
    before = estimators._extractor.cache_info()
    start, networks, errors = threading.Barrier(2), [], []

    def fit():
        transformer = ptl.ImageFeatures(**parameters)
        start.wait()
        try:
            networks.append(transformer.fit(paths)._network())
        except Exception as exc:  # reported below: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=fit) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    after = estimators._extractor.cache_info()
    assert after.misses - before.misses == 1, "the backbone was built more than once"
    assert networks[0] is networks[1]
