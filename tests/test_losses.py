"""Segmentation and classification losses against hand-computed values."""

import math

import pytest
import torch

from vismae_jax.torch import losses


def logits_from_probabilities(probabilities: list[list[float]]) -> torch.Tensor:
    """Build [1, K, 1, P] logits whose softmax over K gives `probabilities` ([K][P])."""
    return torch.log(torch.tensor(probabilities, dtype=torch.float64)).reshape(
        1, len(probabilities), 1, -1
    )


def test_soft_dice_hand_computed():
    # Three classes on four pixels. Foreground class 1: p = (0.6, 0.2, 0.1, 0.1),
    # g = (1, 0, 0, 0); class 2: p = (0.2, 0.7, 0.8, 0.1), g = (0, 1, 1, 0).
    logits = logits_from_probabilities(
        [[0.2, 0.1, 0.1, 0.8], [0.6, 0.2, 0.1, 0.1], [0.2, 0.7, 0.8, 0.1]]
    )
    target = torch.tensor([[[1, 2, 2, 0]]])
    dice_1 = (2 * 0.6) / (1.0 + 1.0)
    dice_2 = (2 * (0.7 + 0.8)) / (1.8 + 2.0)

    loss = losses.soft_dice_loss(logits, target, smooth=0.0)

    assert loss.item() == pytest.approx(1 - (dice_1 + dice_2) / 2, abs=1e-6)


def test_soft_dice_empty_target():
    # No foreground in the target; the model puts probability 0.25 on class 1 at four pixels.
    logits = logits_from_probabilities([[0.75] * 4, [0.25] * 4])
    target = torch.zeros(1, 1, 4, dtype=torch.long)
    smooth = 1e-5

    loss = losses.soft_dice_loss(logits, target, smooth=smooth)

    assert loss.item() == pytest.approx(1 - smooth / (1.0 + smooth), abs=1e-6)


def test_soft_dice_empty_target_and_prediction():
    logits = torch.tensor([30.0, -30.0]).reshape(1, 2, 1, 1).expand(1, 2, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)

    loss = losses.soft_dice_loss(logits, target)

    assert loss.item() == pytest.approx(0.0, abs=1e-4)


def test_segmentation_loss_float16_large_batch():
    # 2 x 256 x 256 = 131072 pixels, so the probability sum (65536) overflows float16.
    logits = torch.zeros(2, 2, 256, 256, dtype=torch.float16)
    target = torch.zeros(2, 256, 256, dtype=torch.long)
    target[:, :128] = 1
    # p = 0.5 everywhere: intersection N/4, sum p = N/2, sum g = N/2, so Dice = 0.5.
    expected = 0.4 * math.log(2) + 0.6 * 0.5

    loss = losses.segmentation_loss(logits, target)

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_segmentation_loss_weights():
    logits = logits_from_probabilities([[0.7, 0.4], [0.3, 0.6]])
    target = torch.tensor([[[0, 1]]])
    cross_entropy = -(math.log(0.7) + math.log(0.6)) / 2
    dice = (2 * 0.6 + 1e-5) / (0.9 + 1.0 + 1e-5)

    loss = losses.segmentation_loss(logits, target)

    assert loss.item() == pytest.approx(0.4 * cross_entropy + 0.6 * (1 - dice), abs=1e-6)


def test_classification_loss_float16():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float16)
    target = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))) / 2

    loss = losses.classification_loss(logits, target)

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, abs=1e-6)
