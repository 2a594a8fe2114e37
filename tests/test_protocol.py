"""Cross-validation folds by patient and nested, stratified label-fraction subsets."""

import numpy as np
import pytest

from vismae_jax.torch import protocol

FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.8, 1.0)


def example_dataset(num_patients: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (patient id per image, class per image): 5 to 14 images per patient, 30% class 1."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(
        [f"patient{p:02d}" for p in range(num_patients)], rng.integers(5, 15, num_patients)
    )
    labels = (rng.random(patients.size) < 0.3).astype(np.int64)
    return patients, labels


def test_folds_no_patient_in_two():
    patients, labels = example_dataset()

    fold_of_image = protocol.assign_folds(patients, labels, num_folds=5, seed=0)

    for patient in np.unique(patients):
        assert np.unique(fold_of_image[patients == patient]).size == 1, patient
    assert set(fold_of_image.tolist()) == set(range(5))


def test_splits_partition_images():
    patients, labels = example_dataset()

    splits = protocol.make_splits(patients, labels, fold_column=None, num_folds=5, seed=0)

    assert len(splits) == 5
    for split in splits:
        everything = np.concatenate([split.train, split.validation, split.test])
        assert np.array_equal(np.sort(everything), np.arange(patients.size)), split.name
        assert not set(patients[split.train]) & set(patients[split.test]), split.name
        assert not set(patients[split.train]) & set(patients[split.validation]), split.name
    tested = np.sort(np.concatenate([split.test for split in splits]))
    assert np.array_equal(tested, np.arange(patients.size))


def test_folds_too_few_patients():
    patients, labels = example_dataset(num_patients=3)

    with pytest.raises(ValueError, match="cannot fill 5 folds"):
        protocol.assign_folds(patients, labels, num_folds=5, seed=0)


def test_fold_column_patient_conflict():
    patients = np.array(["a", "a", "b", "c"])

    with pytest.raises(ValueError, match="same fold"):
        protocol.make_splits(
            patients, np.zeros(4, int), fold_column=["0", "1", "1", "2"], num_folds=5, seed=0
        )


def test_fold_column_roles():
    roles = ["train", "train", "validation", "test", "train"]

    (split,) = protocol.make_splits(
        np.array(list("abcde")), np.zeros(5, int), roles, num_folds=5, seed=0
    )

    assert split.train.tolist() == [0, 1, 4]
    assert split.validation.tolist() == [2]
    assert split.test.tolist() == [3]


def test_fixed_split_above_limit():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(400).astype(str), 10)
    labels = (rng.random(patients.size) < 0.2).astype(np.int64)

    (split,) = protocol.make_splits(patients, labels, fold_column=None, num_folds=5, seed=0)

    assert split.name == "fixed"
    assert split.train.size == pytest.approx(0.7 * patients.size, rel=0.05)
    assert split.test.size == pytest.approx(0.2 * patients.size, rel=0.1)
    assert not set(patients[split.train]) & set(patients[split.test])


def test_label_fractions_nested():
    patients, labels = example_dataset(num_patients=40)
    train = protocol.make_splits(patients, labels, None, num_folds=5, seed=0)[0].train

    subsets = protocol.label_fraction_subsets(train, labels, FRACTIONS, seed=3)

    for smaller, larger in zip(FRACTIONS, FRACTIONS[1:], strict=False):
        assert set(subsets[smaller]) <= set(subsets[larger]), (smaller, larger)
    assert np.array_equal(subsets[1.0], np.sort(train))


def test_label_fractions_sizes():
    train = np.arange(30)

    subsets = protocol.label_fraction_subsets(train, np.zeros(30, int), FRACTIONS, seed=0)

    assert [subsets[f].size for f in FRACTIONS] == [2, 3, 8, 15, 24, 30]


def test_label_fractions_stratified():
    patients, labels = example_dataset(num_patients=40)
    train = protocol.make_splits(patients, labels, None, num_folds=5, seed=0)[0].train
    positive_share = labels[train].mean()

    subsets = protocol.label_fraction_subsets(train, labels, FRACTIONS, seed=3)

    for fraction, subset in subsets.items():
        expected_positives = positive_share * subset.size
        assert abs(labels[subset].sum() - expected_positives) <= 1.0, fraction


def test_label_fractions_same_seed_same_subsets():
    patients, labels = example_dataset()
    train = np.arange(patients.size)

    first = protocol.label_fraction_subsets(train, labels, (0.25,), seed=7)
    second = protocol.label_fraction_subsets(train, labels, (0.25,), seed=7)

    assert np.array_equal(first[0.25], second[0.25])
