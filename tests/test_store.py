"""Feature files: HDF5 and CSV round trips, unfinished files, shard files, reading rows back."""

import numpy as np
import pytest

from pyimagesearch_tl.errors import FeatureFileError
from pyimagesearch_tl.store import (
    FORMATS,
    FeatureMeta,
    HDF5FeatureWriter,
    Shard,
    check_same_layout,
    feature_file,
    iter_chunks,
    read_features,
    read_fingerprint,
    read_meta,
    read_sha256,
    read_shard,
    read_skipped,
    row_reader,
    write_shard,
)

META = FeatureMeta(
    backbone="efficientnet_lite0",
    weights="imagenet",
    pooling="avg",
    input_size=224,
    preprocessing="lite",
    decoder="test-decoder",
    feature_dim=5,
    dtype="float32",
    label_names=("cats", "dogs"),
)


def _batches(rng):
    for start in range(0, 20, 8):
        n = min(8, 20 - start)
        yield (
            rng.normal(size=(n, 5)).astype(np.float32),
            rng.integers(0, 2, n),
            [f"training/c/img {i}é.jpg" for i in range(start, start + n)],
            [f"{i:064x}" for i in range(start, start + n)],
        )


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_round_trip_keeps_values_labels_paths_and_metadata(tmp_path, fmt):
    rng = np.random.default_rng(0)
    path = tmp_path / f"training{FORMATS.get(fmt).suffix}"
    writer = FORMATS.get(fmt).writer(path, META, "fp", chunk_rows=8)
    expected = list(_batches(rng))
    for number, (features, labels, paths, shas) in enumerate(expected):
        writer.append(
            features,
            labels,
            paths,
            shas,
            skipped=[("training/c/bad.jpg", "empty file (0 bytes)")] if number == 0 else [],
        )
    assert not path.exists()  # only the .partial exists until finished
    writer.finish()
    loaded = read_features(path)
    np.testing.assert_allclose(loaded.features, np.concatenate([b[0] for b in expected]), rtol=1e-6)
    assert loaded.labels.tolist() == np.concatenate([b[1] for b in expected]).tolist()
    assert loaded.paths == [p for b in expected for p in b[2]]
    assert loaded.sha256 == [s for b in expected for s in b[3]]
    assert loaded.meta == META == read_meta(path)
    assert read_skipped(path) == [("training/c/bad.jpg", "empty file (0 bytes)")]
    assert read_sha256(path) == loaded.sha256 and read_fingerprint(path) == "fp"
    assert feature_file(tmp_path, "training") == path


def test_every_format_has_its_own_suffix_and_other_files_are_refused(tmp_path):
    suffixes = [FORMATS.get(fmt).suffix for fmt in FORMATS]
    assert len(set(suffixes)) == len(suffixes) == 2
    with pytest.raises(FeatureFileError, match=r"features\.npz: not a feature file \(expected a name ending in"):
        read_meta(tmp_path / "features.npz")
    assert read_fingerprint(tmp_path / "features.npz") is None


def test_float16_storage(tmp_path):
    meta = FeatureMeta(**{**META.__dict__, "dtype": "float16"})
    writer = HDF5FeatureWriter(tmp_path / "training.h5", meta, "fp")
    values = np.linspace(0, 6, 10, dtype=np.float32).reshape(2, 5)
    writer.append(values, [0, 1], ["a", "b"], ["0" * 64, "1" * 64], [])
    writer.finish()
    loaded = read_features(tmp_path / "training.h5")
    assert loaded.features.dtype == np.float16
    np.testing.assert_allclose(loaded.features, values, rtol=1e-3)


def test_unfinished_file_is_never_read_as_finished(tmp_path):
    writer = HDF5FeatureWriter(tmp_path / "training.h5", META, "fp")
    writer.append(np.zeros((2, 5)), [0, 1], ["a", "b"], ["0" * 64, "1" * 64], [])
    writer.close()
    with pytest.raises(FeatureFileError, match="unfinished extraction; rerun extract to resume"):
        feature_file(tmp_path, "training")
    with pytest.raises(FeatureFileError, match="no feature file for split 'validation'"):
        feature_file(tmp_path, "validation")


def test_unfinished_shards_are_an_unfinished_extraction(tmp_path):
    (tmp_path / ".shards" / "training").mkdir(parents=True)
    with pytest.raises(FeatureFileError, match="'training' features in .* are an unfinished extraction"):
        feature_file(tmp_path, "training")


def test_a_new_writer_starts_over_whatever_partial_file_is_there(tmp_path):
    (tmp_path / "training.h5.partial").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    writer = HDF5FeatureWriter(tmp_path / "training.h5", META, "fp")
    writer.append(np.ones((1, 5)), [1], ["x"], ["1" * 64], [])
    writer.finish()
    assert read_features(tmp_path / "training.h5").paths == ["x"]
    assert not (tmp_path / "training.h5.partial").exists()


def test_shard_round_trip_and_identity(tmp_path):
    shard = Shard(np.arange(10, dtype=np.float32).reshape(2, 5), np.array([0, 2]), [(1, "corrupt image: cut")])
    path = tmp_path / "000003-abc.h5"
    write_shard(path, "identity-1", shard)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temporary file was renamed
    loaded = read_shard(path, "identity-1")
    np.testing.assert_array_equal(loaded.features, shard.features)
    assert loaded.positions.tolist() == [0, 2] and loaded.skipped == [(1, "corrupt image: cut")]
    assert read_shard(path, "identity-2") is None  # another shard's file is never taken for this one
    assert read_shard(tmp_path / "missing.h5", "identity-1") is None
    (tmp_path / "junk.h5").write_bytes(b"junk")
    assert read_shard(tmp_path / "junk.h5", "identity-1") is None


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_rows_are_read_back_by_number_in_the_order_asked(tmp_path, fmt):
    values = np.arange(40, dtype=np.float32).reshape(8, 5)
    writer = FORMATS.get(fmt).writer(tmp_path / f"training{FORMATS.get(fmt).suffix}", META, "fp", chunk_rows=3)
    writer.append(values, [0, 1] * 4, list("abcdefgh"), ["0" * 64] * 8, [])
    writer.finish()
    with row_reader(tmp_path / f"training{FORMATS.get(fmt).suffix}") as read:
        np.testing.assert_array_equal(read([6, 1, 6, 0]), values[[6, 1, 6, 0]])
        assert read([]).shape == (0, 5)


def test_chunked_reading_streams_the_rows(tmp_path):
    writer = HDF5FeatureWriter(tmp_path / "training.h5", META, "fp", chunk_rows=3)
    values = np.arange(50, dtype=np.float32).reshape(10, 5)
    writer.append(values, [0, 1] * 5, list("abcdefghij"), ["0" * 64] * 10, [])
    writer.finish()
    blocks = list(iter_chunks(tmp_path / "training.h5"))
    assert [len(b[0]) for b in blocks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), values)


def test_layout_mismatch_names_the_field():
    other = FeatureMeta(**{**META.__dict__, "backbone": "vgg16", "feature_dim": 512})
    with pytest.raises(FeatureFileError, match="backbone='vgg16'"):
        check_same_layout(META, other, "validation.h5")
    relabelled = FeatureMeta(**{**META.__dict__, "label_names": ("ants", "bees")})
    with pytest.raises(FeatureFileError, match="labels"):
        check_same_layout(META, relabelled, "validation.h5")
