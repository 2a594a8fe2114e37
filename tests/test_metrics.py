"""Segmentation and classification metrics against hand-computed and scikit-learn values."""

import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from vismae_jax.torch import metrics


def test_dice_precision_recall_hand_computed():
    # One 2 x 4 image: TP = 2, FP = 1, FN = 3.
    target = np.array([[[1, 1, 1, 1], [1, 0, 0, 0]]])
    prediction = np.array([[[1, 1, 0, 0], [0, 0, 1, 0]]])

    result = metrics.segmentation_metrics(prediction, target, num_classes=2)

    assert result["dice"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 3))
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 5)


def test_metrics_empty_cases():
    target = np.zeros((3, 2, 2), dtype=np.int64)
    prediction = np.zeros((3, 2, 2), dtype=np.int64)
    prediction[1, 0, 0] = 1  # empty ground truth, one false-positive pixel
    target[2, 1, 1] = 1  # lesion missed entirely

    scores = metrics.segmentation_scores(prediction, target, num_classes=2)

    np.testing.assert_array_equal(scores["dice"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["precision"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["recall"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores["both_empty"], [True, False, False])


def test_metrics_average_per_image_then_classes():
    # Image 0: class 1 perfect, class 2 absent in both (counts 1). Image 1: class 1 Dice 2/3,
    # class 2 predicted but absent (counts 0).
    target = np.array([[[1, 0]], [[1, 1]]])
    prediction = np.array([[[1, 0]], [[1, 2]]])

    result = metrics.segmentation_metrics(prediction, target, num_classes=3)

    assert result["dice"] == pytest.approx(((1 + 1) / 2 + (2 / 3 + 0) / 2) / 2)
    assert result["empty_agreement_images"] == 0


def test_binary_auc_matches_sklearn():
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9, 0.6, 0.7])
    probabilities = np.stack([1 - scores, scores], axis=1)

    result = metrics.classification_metrics(probabilities, labels)

    # Hand count: 13 of the 16 (positive, negative) pairs are ordered correctly.
    assert result["roc_auc"] == pytest.approx(13 / 16)
    assert result["pr_auc"] == pytest.approx(sk_metrics.average_precision_score(labels, scores))
    assert result["accuracy"] == pytest.approx(6 / 8)


def test_multiclass_auc_one_vs_rest_macro():
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2] * 6)
    probabilities = rng.dirichlet(np.ones(3), size=labels.size)
    one_vs_rest_roc = [sk_metrics.roc_auc_score(labels == k, probabilities[:, k]) for k in range(3)]
    one_vs_rest_pr = [
        sk_metrics.average_precision_score(labels == k, probabilities[:, k]) for k in range(3)
    ]

    result = metrics.classification_metrics(probabilities, labels)

    assert result["roc_auc"] == pytest.approx(np.mean(one_vs_rest_roc))
    assert result["pr_auc"] == pytest.approx(np.mean(one_vs_rest_pr))


def test_auc_single_class_is_nan():
    probabilities = np.array([[0.3, 0.7], [0.6, 0.4]])

    result = metrics.classification_metrics(probabilities, np.array([1, 1]))

    assert np.isnan(result["roc_auc"])
    assert np.isnan(result["pr_auc"])
