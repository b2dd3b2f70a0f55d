"""The "unknown" detectors as scikit-learn outlier estimators (issue 26): every registered detector that scores
the features alone passes scikit-learn's estimator checks, and on real features the estimator gives exactly
the verdicts of the detector a bundle holds."""

import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from pyimagesearch_tl.estimators import UnknownDetector
from pyimagesearch_tl.novelty import fit_detector, list_detectors, make_detector
from pyimagesearch_tl.store import feature_file, read_features

FEATURES_ONLY = [name for name in list_detectors() if not make_detector(name).uses_logits]
#: Mahalanobis whitens in float32: a row's score moves by ~1e-7 relative with the rows beside it in the
#: product, above the check's 1e-7 (thresholds sit between calibration scores, so verdicts do not move).
EXPECTED = {"check_methods_subset_invariance": "float32 whitening: scores agree to ~1e-7 relative across batches"}


def test_the_detectors_checked_are_every_registered_one_that_scores_features_alone():
    assert FEATURES_ONLY == ["centroid", "knn", "mahalanobis", "lof"]
    assert {name for name in list_detectors() if name not in FEATURES_ONLY} == {
        "energy",
        "centroid+energy",
        "mahalanobis+energy",
    }


@parametrize_with_checks(
    [UnknownDetector(detector=name) for name in FEATURES_ONLY],
    expected_failed_checks=lambda estimator: EXPECTED if estimator.detector == "mahalanobis" else {},
)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("name", list_detectors())
def test_on_real_features_the_estimator_says_what_the_bundle_detector_says(pipeline_run, name):
    """Cats and dogs features: trained on the training split, calibrated on validation, applied to both."""
    training, validation = (
        read_features(feature_file(pipeline_run["features"], s)) for s in ("training", "validation")
    )
    rng = np.random.default_rng(0)  # stand-in logits: what the energy parts score
    weights = rng.normal(size=(training.features.shape[1], 2)) / 30
    logits = {id(part): part.features @ weights for part in (training, validation)}
    names = np.array(training.meta.label_names)
    estimator = UnknownDetector(detector=name, keep=0.9).fit(
        training.features,
        names[training.labels],
        calibration=validation.features,
        logits=logits[id(training)],
        calibration_logits=logits[id(validation)],
    )
    detector = fit_detector(
        name,
        training.features,
        training.labels,
        2,
        logits[id(training)],
        validation.features,
        logits[id(validation)],
        0.9,
    )
    assert estimator.offset_ == detector.threshold
    for part in (training, validation):
        known = detector.is_known(part.features, logits[id(part)])
        assert (estimator.predict(part.features, logits[id(part)]) == np.where(known, 1, -1)).all()
        np.testing.assert_array_equal(
            estimator.score_samples(part.features, logits[id(part)]),
            detector.familiarity(part.features, logits[id(part)]),
        )
    kept = (estimator.predict(validation.features, logits[id(validation)]) == 1).mean()
    assert 0.85 <= kept <= 0.95  # the calibration rows keep about the share asked for
    if estimator.detector_.uses_logits:
        with pytest.raises(ValueError, match="scores a classifier's logits: pass logits="):
            UnknownDetector(detector=name).fit(training.features, training.labels)


def test_what_the_estimator_refuses_it_names(pipeline_run):
    """Logits of another shape, NaN logits, calibration rows without theirs, a continuous y: one clear error
    each, never a threshold set on the wrong rows; fit_predict passes the logits given to fit on to predict."""
    training = read_features(feature_file(pipeline_run["features"], "training"))
    X, y = training.features, training.labels
    logits = X @ np.random.default_rng(0).normal(size=(X.shape[1], 2)) / 30
    energy = UnknownDetector(detector="energy")
    for bad, message in (
        (dict(logits=logits[:5]), r"logits must be of shape \(30, classes\), one row per row of X; got \(5, 2\)"),
        (dict(logits=logits[:, 0]), r"logits must be of shape \(30, classes\), one row per row of X; got \(30,\)"),
        (dict(logits=np.full_like(logits, np.nan)), "logits holds NaN or infinite values"),
        (dict(logits=logits, calibration=X[:10]), "pass calibration_logits= for calibration"),
        (dict(logits=logits, calibration=X[:10], calibration_logits=logits[:3]), r"calibration_logits must be of"),
        (dict(logits=logits, calibration_logits=logits), "calibration_logits without calibration"),
    ):
        with pytest.raises(ValueError, match=message):
            energy.fit(X, y, **bad)
    verdicts = energy.fit_predict(X, y, logits=logits)
    assert set(verdicts) <= {-1, 1} and (verdicts == energy.predict(X, logits)).all()
    with pytest.raises(ValueError, match="logits must be of shape"):
        energy.predict(X, logits[:5])
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        UnknownDetector().fit(X, y + 0.5)
