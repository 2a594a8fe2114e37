"""Segmentation loss for fine-tuning: 0.4 x cross-entropy + 0.6 x soft Dice over foreground classes.

Both terms are computed in float32 whatever the dtype of the logits. Under bfloat16 or float16
autocast, a sum of probabilities over a 32 x 320 x 320 batch (3.3 million pixels) would lose
precision, or overflow the float16 maximum of 65504.
"""

import torch
import torch.nn.functional as F

CE_WEIGHT = 0.4
DICE_WEIGHT = 0.6


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5
) -> torch.Tensor:
    """Return 1 - mean soft Dice over the foreground classes 1..K-1, as a float32 scalar.

    Each class's Dice is pooled over the whole batch (sums over images and pixels), then the
    classes are averaged: Dice_k = (2 sum(p_k g_k) + smooth) / (sum(p_k) + sum(g_k) + smooth),
    with p_k the softmax probability and g_k the one-hot target. A class absent from the
    target and predicted with probability near 0 everywhere has Dice near 1.

    Args:
        logits: [B, K, H, W] float of any dtype, K >= 2 (class 0 is background).
        target: [B, H, W] integer class ids in [0, K).
        smooth: added to numerator and denominator so empty classes stay finite.
    """
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(
            f"Soft Dice needs at least 2 classes (background + foreground), got {num_classes}."
        )

    probabilities = torch.softmax(logits.float(), dim=1)[:, 1:]
    one_hot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2)[:, 1:].float()

    sum_dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dim=sum_dims)
    denominator = probabilities.sum(dim=sum_dims) + one_hot.sum(dim=sum_dims)
    dice_per_class = (2.0 * intersection + smooth) / (denominator + smooth)
    return 1.0 - dice_per_class.mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return 0.4 x cross-entropy + 0.6 x soft Dice as a float32 scalar.

    Args:
        logits: [B, K, H, W] float of any dtype.
        target: [B, H, W] integer class ids in [0, K).
    """
    cross_entropy = F.cross_entropy(logits.float(), target.long())
    return CE_WEIGHT * cross_entropy + DICE_WEIGHT * soft_dice_loss(logits, target)


def classification_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy as a float32 scalar; logits: [B, K], target: [B] int."""
    return F.cross_entropy(logits.float(), target.long())
