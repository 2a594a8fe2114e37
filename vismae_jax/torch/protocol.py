"""Evaluation protocol: patient-grouped folds, train/validation/test splits, label fractions.

Data sets under `CROSS_VALIDATION_LIMIT` images use K-fold cross-validation (K = 5 by default):
in split k, fold k is the test set, fold (k + 1) mod K the validation set that picks the best
epoch, and the other K - 2 folds are the training set. Larger sets use one fixed split made of
10 folds: 7 for training, 1 for validation and 2 for testing (70/10/20). Folds are built from
groups (a patient, or one source file when patients are unknown, so the slices of one volume
never straddle folds) and stratified by class where each class has enough members.

Label-efficiency runs train on the first `ceil(fraction x N)` images of one stratified random
order of the training set. So the subsets for 5, 10, 25, 50, 80 and 100% are nested, and each
keeps the class proportions of the full training set to within one image per class.
"""

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

CROSS_VALIDATION_LIMIT = 4000
FIXED_SPLIT_FOLDS = 10
FIXED_SPLIT_ROLES = {"train": range(0, 7), "validation": range(7, 8), "test": range(8, 10)}


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices of the training, validation and test images of one cross-validation fold."""

    name: str  # "fold0".."fold4", or "fixed" for the fixed split.
    train: np.ndarray  # int64 [N_train] image indices.
    validation: np.ndarray  # int64 [N_val] image indices; picks the best epoch.
    test: np.ndarray  # int64 [N_test] image indices; reported metrics.


def assign_folds(
    groups: Sequence[str], strata: np.ndarray, num_folds: int, seed: int
) -> np.ndarray:
    """Assign every image to one of `num_folds` folds so that no group spans two folds.

    Args:
        groups: [N] group id per image (patient id, or source path when unknown).
        strata: [N] int class per image used for stratification (label, or lesion present).
        num_folds: number of folds, >= 2.
        seed: shuffles the groups before they are dealt out.

    Returns:
        int64 [N] fold index per image.
    """
    group_ids = np.unique(np.asarray(groups), return_inverse=True)[1]
    num_groups = int(group_ids.max()) + 1
    if num_groups < num_folds:
        raise ValueError(
            f"{num_groups} patients (or source files) cannot fill {num_folds} folds; "
            "lower protocol.num_folds or add images from more patients."
        )

    placeholder = np.zeros(len(group_ids))
    smallest_class = np.min(np.unique(strata, return_counts=True)[1])
    if smallest_class >= num_folds:
        splitter = StratifiedGroupKFold(num_folds, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, strata, group_ids)
    else:
        logging.info(
            "A class has %d images, fewer than %d folds: folds are grouped but not stratified.",
            smallest_class,
            num_folds,
        )
        splitter = GroupKFold(num_folds, shuffle=True, random_state=seed)
        folds = splitter.split(placeholder, strata, group_ids)

    fold_of_image = np.full(len(group_ids), -1, dtype=np.int64)
    for fold, (_, held_out) in enumerate(folds):
        fold_of_image[held_out] = fold
    return fold_of_image


def cross_validation_splits(fold_of_image: np.ndarray) -> list[Split]:
    """Return one Split per fold k: test fold k, validation fold (k + 1) mod K, train the rest.

    Args:
        fold_of_image: int [N] fold index per image, folds numbered 0..K-1 with K >= 3.
    """
    num_folds = int(fold_of_image.max()) + 1
    if num_folds < 3:
        raise ValueError(
            f"Cross-validation needs at least 3 folds (train, validation, test), got {num_folds}."
        )

    splits = []
    for fold in range(num_folds):
        validation_fold = (fold + 1) % num_folds
        train_mask = (fold_of_image != fold) & (fold_of_image != validation_fold)
        splits.append(
            Split(
                name=f"fold{fold}",
                train=np.flatnonzero(train_mask),
                validation=np.flatnonzero(fold_of_image == validation_fold),
                test=np.flatnonzero(fold_of_image == fold),
            )
        )
    return splits


def fixed_split(groups: Sequence[str], strata: np.ndarray, seed: int) -> Split:
    """Return the 70/10/20 train/validation/test split, grouped by patient and stratified."""
    fold_of_image = assign_folds(groups, strata, FIXED_SPLIT_FOLDS, seed)
    indices = {
        role: np.flatnonzero(np.isin(fold_of_image, list(folds)))
        for role, folds in FIXED_SPLIT_ROLES.items()
    }
    return Split(
        name="fixed", train=indices["train"], validation=indices["validation"], test=indices["test"]
    )


def split_from_roles(roles: Sequence[str]) -> Split:
    """Return the Split given by a `fold` column of "train", "validation" and "test" values."""
    roles_array = np.asarray(roles)
    unknown = sorted(set(roles_array) - {"train", "validation", "test"})
    if unknown:
        raise ValueError(f"Invalid fold values {unknown}; use integers or train/validation/test.")
    return Split(
        name="fixed",
        train=np.flatnonzero(roles_array == "train"),
        validation=np.flatnonzero(roles_array == "validation"),
        test=np.flatnonzero(roles_array == "test"),
    )


def make_splits(
    groups: Sequence[str],
    strata: np.ndarray,
    fold_column: Sequence[str] | None,
    num_folds: int,
    seed: int,
) -> list[Split]:
    """Choose the protocol for N images and return its splits.

    Args:
        groups: [N] group id per image.
        strata: [N] int class per image.
        fold_column: [N] values of the CSV's `fold` column, or None. Integers are fold
            indices for cross-validation; train/validation/test give a fixed split.
        num_folds: K for cross-validation when the folds are not given.
        seed: fold assignment seed.
    """
    if fold_column is not None:
        if all(str(value).lstrip("-").isdigit() for value in fold_column):
            fold_values = np.asarray([int(value) for value in fold_column])
            check_groups_within_folds(groups, fold_values)
            folds, fold_of_image = np.unique(fold_values, return_inverse=True)
            logging.info(
                "Using the %d folds given in the CSV (values %s).", len(folds), folds.tolist()
            )
            return cross_validation_splits(fold_of_image)
        return [split_from_roles([str(value) for value in fold_column])]

    if len(groups) < CROSS_VALIDATION_LIMIT:
        logging.info("%d images: %d-fold cross-validation by patient.", len(groups), num_folds)
        return cross_validation_splits(assign_folds(groups, strata, num_folds, seed))
    logging.info("%d images: fixed 70/10/20 split by patient.", len(groups))
    return [fixed_split(groups, strata, seed)]


def check_groups_within_folds(groups: Sequence[str], fold_of_image: np.ndarray) -> None:
    """Raise ValueError when the images of one group are given different folds."""
    fold_of_group: dict[str, int] = {}
    for group, fold in zip(groups, fold_of_image.tolist(), strict=True):
        if fold_of_group.setdefault(group, fold) != fold:
            raise ValueError(
                f"The CSV's fold column puts one patient (or source file) in folds "
                f"{fold_of_group[group]} and {fold}. Give every image of a patient the same fold."
            )


def stratified_order(strata: np.ndarray, seed: int) -> np.ndarray:
    """Return a permutation of range(N) whose every prefix keeps the class proportions of `strata`.

    Members of each class are shuffled, the r-th of n_c gets the key (r + 0.5) / n_c, and
    images are sorted by key (random tie-break), so classes interleave evenly.
    """
    rng = np.random.default_rng(seed)
    keys = np.empty(len(strata), dtype=np.float64)
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        shuffled = members[rng.permutation(members.size)]
        keys[shuffled] = (np.arange(members.size) + 0.5) / members.size
    tie_break = rng.random(len(strata))
    return np.lexsort((tie_break, keys))


def subset_size(fraction: float, num_images: int) -> int:
    """Return ceil(fraction x num_images), at least 1 (fractions like 0.8 x 30 round exactly)."""
    return max(1, math.ceil(round(fraction * num_images, 6)))


def label_fraction_subsets(
    train_indices: np.ndarray, strata: np.ndarray, fractions: Sequence[float], seed: int
) -> dict[float, np.ndarray]:
    """Return nested, stratified subsets of a training set, one per label fraction.

    Args:
        train_indices: int [N_train] image indices of the training set.
        strata: int [N] class of every image of the data set (indexed by image index).
        fractions: label fractions in (0, 1], for example (0.05, 0.1, 0.25, 0.5, 0.8, 1.0).
        seed: the same seed for every fraction, so smaller subsets lie inside larger ones.

    Returns:
        {fraction: int64 [ceil(fraction x N_train)] sorted image indices}.
    """
    for fraction in fractions:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"Label fraction {fraction} is outside (0, 1]; write 25% as 0.25.")

    order = train_indices[stratified_order(strata[train_indices], seed)]
    return {fraction: np.sort(order[: subset_size(fraction, len(order))]) for fraction in fractions}
