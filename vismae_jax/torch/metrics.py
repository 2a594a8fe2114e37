"""Evaluation metrics: Dice, precision, recall (segmentation); ROC AUC, PR AUC (classification).

Segmentation metrics are computed per image and per foreground class (1..K-1) from hard label
maps, averaged over the foreground classes of the image, then averaged over images:

  Dice = 2 TP / (2 TP + FP + FN), precision = TP / (TP + FP), recall = TP / (TP + FN).

Zero denominators follow one rule. When a class is absent from both the ground truth and the
prediction of an image, Dice, precision and recall are all 1 for that class, because the
prediction agrees exactly. When only one side is empty, the undefined ratio counts as 0, the
convention of scikit-learn's `zero_division=0`. So an image without lesion where the model
predicts one scores 0 on all three, and so does an image with a lesion that the model misses.
Data sets with many empty slices therefore reward models that predict empty slices as empty.
`empty_agreement_images` in the results counts the images that scored 1 that way.

PR AUC is the average precision of scikit-learn (`average_precision_score`), the step-wise
area under the precision-recall curve.
"""

import logging

import numpy as np
from sklearn import metrics as sk_metrics
from sklearn.preprocessing import label_binarize


def confusion_counts(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """Count TP, FP and FN per image and foreground class.

    Args:
        prediction: [N, H, W] integer class ids.
        target: [N, H, W] integer class ids.
        num_classes: K, including background 0.

    Returns:
        int64 [N, K-1, 3] with (TP, FP, FN) for classes 1..K-1.
    """
    if prediction.shape != target.shape:
        raise ValueError(
            f"Prediction shape {prediction.shape} differs from target shape {target.shape}."
        )

    classes = np.arange(1, num_classes).reshape(1, -1, 1)
    predicted = prediction.reshape(prediction.shape[0], 1, -1) == classes
    actual = target.reshape(target.shape[0], 1, -1) == classes

    true_positive = np.sum(predicted & actual, axis=2)
    false_positive = np.sum(predicted & ~actual, axis=2)
    false_negative = np.sum(~predicted & actual, axis=2)
    return np.stack([true_positive, false_positive, false_negative], axis=-1).astype(np.int64)


def ratio_or_agreement(
    numerator: np.ndarray, denominator: np.ndarray, both_empty: np.ndarray
) -> np.ndarray:
    """Divide where the denominator is positive; elsewhere 1 if both masks are empty, else 0."""
    safe = np.where(denominator > 0, denominator, 1)
    return np.where(denominator > 0, numerator / safe, np.where(both_empty, 1.0, 0.0))


def segmentation_scores(
    prediction: np.ndarray, target: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """Return per-image Dice, precision and recall (float64 [N], mean over foreground classes).

    Args:
        prediction: [N, H, W] integer class ids.
        target: [N, H, W] integer class ids.
        num_classes: K, including background 0.

    Also returns `both_empty`: bool [N], True where every foreground class is absent from
    both the prediction and the target.
    """
    counts = confusion_counts(prediction, target, num_classes)
    true_positive, false_positive, false_negative = (
        counts[..., i].astype(np.float64) for i in range(3)
    )
    both_empty = (true_positive + false_positive + false_negative) == 0

    dice = ratio_or_agreement(
        2 * true_positive, 2 * true_positive + false_positive + false_negative, both_empty
    )
    precision = ratio_or_agreement(true_positive, true_positive + false_positive, both_empty)
    recall = ratio_or_agreement(true_positive, true_positive + false_negative, both_empty)
    return {
        "dice": dice.mean(axis=1),
        "precision": precision.mean(axis=1),
        "recall": recall.mean(axis=1),
        "both_empty": both_empty.all(axis=1),
    }


def segmentation_metrics(
    prediction: np.ndarray, target: np.ndarray, num_classes: int
) -> dict[str, float]:
    """Return mean Dice, precision and recall over images, and the count of empty-agreement images.

    Args:
        prediction: [N, H, W] integer class ids.
        target: [N, H, W] integer class ids.
        num_classes: K, including background 0.
    """
    scores = segmentation_scores(prediction, target, num_classes)
    return {
        "dice": float(scores["dice"].mean()),
        "precision": float(scores["precision"].mean()),
        "recall": float(scores["recall"].mean()),
        "empty_agreement_images": int(scores["both_empty"].sum()),
    }


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Return ROC AUC, PR AUC (average precision) and accuracy.

    Args:
        probabilities: [N, K] float class probabilities (rows sum to 1), K >= 2.
        labels: [N] integer class ids in [0, K).

    For K = 2 the AUCs score class 1 against class 0; for K > 2 they are one-vs-rest,
    macro-averaged over classes. An AUC is NaN (with a warning) when `labels` contains a single
    class, because it is undefined then.
    """
    num_classes = probabilities.shape[1]
    accuracy = float(np.mean(np.argmax(probabilities, axis=1) == labels))
    result = {"accuracy": accuracy, "roc_auc": float("nan"), "pr_auc": float("nan")}

    present = np.unique(labels)
    if present.size < 2:
        logging.warning(
            "ROC AUC and PR AUC are undefined: the evaluated labels hold only class %s.", present
        )
        return result

    if num_classes == 2:
        result["roc_auc"] = float(sk_metrics.roc_auc_score(labels, probabilities[:, 1]))
        result["pr_auc"] = float(sk_metrics.average_precision_score(labels, probabilities[:, 1]))
        return result

    # NOTE: scikit-learn's one-vs-rest ROC AUC needs every class present in `labels`. A
    # fold that lacks a class gets NaN, not a score over the classes it contains.
    if present.size < num_classes:
        logging.warning(
            "One-vs-rest AUCs are undefined: labels hold classes %s of %d.", present, num_classes
        )
        return result
    one_hot = label_binarize(labels, classes=np.arange(num_classes))
    result["roc_auc"] = float(
        sk_metrics.roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    )
    result["pr_auc"] = float(
        sk_metrics.average_precision_score(one_hot, probabilities, average="macro")
    )
    return result
