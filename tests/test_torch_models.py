"""Tests of the PyTorch SwinMAE, SwinUNet and SwinClassifier against the public code's tensors."""

import argparse
import datetime

import numpy as np
import pytest
import safetensors.torch
import torch

from vismae_jax.torch import models, swin

GOLDEN_MODEL = dict(embed_dim=32, num_heads=(1, 2, 4, 8))
TINY = dict(embed_dim=16, num_heads=(1, 2, 2, 4), drop_path_rate=0.0)


def golden_state_dict(golden) -> dict[str, torch.Tensor]:
    prefix = "state_dict/"
    return {
        k[len(prefix) :]: torch.from_numpy(v) for k, v in golden.items() if k.startswith(prefix)
    }


def golden_mae(golden) -> models.SwinMAE:
    model = models.SwinMAE(**GOLDEN_MODEL).eval()
    model.load_state_dict(golden_state_dict(golden), strict=True)
    return model


def relative_error(actual: torch.Tensor, expected: np.ndarray) -> float:
    actual = actual.detach().numpy()
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def test_mae_golden_keys(golden):
    model = models.SwinMAE(**GOLDEN_MODEL)
    assert list(model.state_dict()) == list(golden_state_dict(golden))


def test_mae_default_key_count():
    with torch.device("meta"):
        model = models.SwinMAE()
    assert len(model.state_dict()) == 224


def test_mae_golden_outputs(golden):
    model = golden_mae(golden)
    images = torch.from_numpy(golden["expected/input_normalized_3ch"])
    mask = torch.from_numpy(golden["expected/mask"])

    with torch.no_grad():
        latent = model.forward_encoder(images, mask.bool())
        loss, pred, _ = model(images, mask)

    assert relative_error(latent, golden["expected/latent"]) < 1e-5
    assert relative_error(pred, golden["expected/pred"]) < 1e-5
    assert abs(loss.item() - golden["expected/loss"]) < 1e-5 * golden["expected/loss"]


def test_pos_embed_golden(golden):
    model = models.SwinMAE(**GOLDEN_MODEL)
    # The table is computed in float64, so it may differ from the public code's float32 sin and
    # cos by one unit in the last place.
    np.testing.assert_allclose(model.pos_embed.numpy(), golden["state_dict/pos_embed"], atol=1e-6)
    assert not model.pos_embed.requires_grad


def test_relative_position_index_canonical(golden):
    index = swin.relative_position_index(7)
    assert index.dtype == torch.int64
    assert sorted(set(index.flatten().tolist())) == list(range(169))
    # Query (0, 0) against key (1, 2): offsets (-1, -2) -> (5 * 13) + 4.
    assert index[0, 1 * 7 + 2].item() == 5 * 13 + 4

    for key, value in models.SwinMAE(**GOLDEN_MODEL).state_dict().items():
        if key.endswith("relative_position_index"):
            np.testing.assert_array_equal(value.numpy(), golden[f"state_dict/{key}"], err_msg=key)


def test_shift_mask_regions():
    mask = swin.shifted_window_mask(14, 14, 7, 3, torch.device("cpu"))
    assert mask.shape == (4, 49, 49)
    assert set(mask.unique().tolist()) == {0.0, -100.0}
    assert (mask[0] == 0).all()  # The top-left window contains one region only.
    # The bottom-right window contains 4 regions of 4x4, 4x3, 3x4 and 3x3 tokens.
    zeros_per_query = (mask[3] == 0).sum(dim=1)
    assert sorted(set(zeros_per_query.tolist())) == [9, 12, 16]


def test_unet_key_count():
    with torch.device("meta"):
        model = models.SwinUNet(num_classes=2, depths=(2, 2, 6, 2))
    assert len(model.state_dict()) == 342


def test_unet_public_names():
    with torch.device("meta"):
        state = models.SwinUNet(num_classes=4).state_dict()
    assert state["skip_connection_layers.0.weight"].shape == (384, 768, 1, 1)
    assert state["skip_connection_layers.2.bias"].shape == (96,)
    assert state["final_patch_expanding.expand.weight"].shape == (16 * 96, 96)
    assert state["head.weight"].shape == (4, 96, 1, 1)
    assert "head.bias" not in state


def test_classifier_key_count():
    with torch.device("meta"):
        state = models.SwinClassifier(num_classes=3).state_dict()
    assert len(state) == 129
    assert state["head.weight"].shape == (3, 768)
    assert state["norm.weight"].shape == (768,)


def test_unet_output_shape():
    model = models.SwinUNet(num_classes=3, **TINY).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 96))
    assert logits.shape == (2, 3, 64, 96)


def test_unet_gradients_reach_all():
    model = models.SwinUNet(num_classes=2, in_chans=1, **TINY)
    model(torch.randn(1, 1, 64, 64)).square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_classifier_output_shape():
    model = models.SwinClassifier(num_classes=5, **TINY).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 96, 64))
    assert logits.shape == (2, 5)


def test_random_mask_ratio():
    model = models.SwinMAE(img_size=(64, 96), **TINY)
    mask = model.random_mask(3, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 16 * 24)
    assert mask.dtype == torch.bool
    # 4 x 6 = 24 units, int(24 * 0.25) = 6 visible, 4 x 4 tokens per unit.
    assert mask.sum(dim=1).tolist() == [18 * 16] * 3
    units = mask.view(3, 4, 4, 6, 4).permute(0, 1, 3, 2, 4).reshape(3, 24, 16)
    assert (units.all(dim=2) | ~units.any(dim=2)).all()


def test_patchify_round_trip():
    model = models.SwinMAE(img_size=(64, 96), in_chans=3, **TINY)
    images = torch.randn(2, 3, 64, 96)
    patches = model.patchify(images)
    assert patches.shape == (2, 16 * 24, 48)
    # Token 1 is the patch at token row 0, column 1. Its element (row 1, column 1, channel 2)
    # sits at 1 * 12 + 1 * 3 + 2 = 17 in the (row in patch, column in patch, channel) order.
    assert patches[0, 1, 17] == images[0, 2, 1, 4 + 1]
    assert torch.equal(model.unpatchify(patches, 64, 96), images)


def transposed_state_dict(state: dict[str, torch.Tensor], patch_size: int) -> dict:
    """Return weights that compute the same function on transposed (H <-> W) images."""
    out = {}
    for key, value in state.items():
        if key == "patch_embed.proj.weight":
            value = value.transpose(2, 3)
        elif key.endswith("relative_position_bias_table"):
            side = int(round(value.shape[0] ** 0.5))
            value = value.view(side, side, -1).transpose(0, 1).reshape(value.shape)
        elif key.startswith("layers.") and ".downsample." in key:
            # Merged groups (even, even), (odd, even), (even, odd), (odd, odd) in (row, col):
            # transposing swaps the middle two.
            chunks = value.chunk(4, dim=-1)
            value = torch.cat([chunks[0], chunks[2], chunks[1], chunks[3]], dim=-1)
        elif key.endswith("expand.weight"):
            # Rows are (p1, p2, c): swap the row and column offsets.
            scale = patch_size if key.startswith("final_patch_expanding.") else 2
            value = value.view(scale, scale, -1, value.shape[1]).transpose(0, 1)
            value = value.reshape(state[key].shape)
        elif key.startswith("decoder_pred."):
            value = value.view(patch_size, patch_size, -1, *value.shape[1:]).transpose(0, 1)
            value = value.reshape(state[key].shape)
        out[key] = value.contiguous()
    return out


def test_mae_non_square_transpose():
    torch.manual_seed(0)
    model = models.SwinMAE(img_size=(64, 96), in_chans=2, **TINY).eval()
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    transposed = models.SwinMAE(img_size=(96, 64), in_chans=2, **TINY).eval()
    transposed.load_state_dict(
        transposed_state_dict(model.state_dict(), patch_size=4)
        | {"pos_embed": transposed.pos_embed.detach()}
    )
    images = torch.randn(2, 2, 64, 96)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(1))
    mask_t = mask.view(2, 16, 24).transpose(1, 2).reshape(2, -1)

    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        latent_t = transposed.forward_encoder(images.transpose(2, 3), mask_t)
        loss, pred, _ = model(images, mask)
        loss_t, pred_t, _ = transposed(images.transpose(2, 3), mask_t)

    torch.testing.assert_close(latent_t, latent.transpose(1, 2), rtol=0, atol=1e-5)
    assert abs(loss.item() - loss_t.item()) < 1e-5 * loss.item()
    pred_back = model.patchify(transposed.unpatchify(pred_t, 96, 64).transpose(2, 3))
    torch.testing.assert_close(pred_back, pred, rtol=0, atol=1e-5)


def test_unet_non_square_transpose():
    torch.manual_seed(0)
    model = models.SwinUNet(num_classes=3, in_chans=1, **TINY).eval()
    for parameter in model.parameters():
        parameter.data.add_(0.05 * torch.randn_like(parameter))
    transposed = models.SwinUNet(num_classes=3, in_chans=1, **TINY).eval()
    transposed.load_state_dict(transposed_state_dict(model.state_dict(), patch_size=4))
    images = torch.randn(1, 1, 64, 96)

    with torch.no_grad():
        logits = model(images)
        logits_t = transposed(images.transpose(2, 3))

    torch.testing.assert_close(logits_t.transpose(2, 3), logits, rtol=0, atol=1e-5)


def test_load_pretrained_unet_report(golden):
    state = golden_state_dict(golden)
    model = models.SwinUNet(num_classes=2, depths=(2, 2, 6, 2), **GOLDEN_MODEL)

    report = models.load_pretrained(model, state)

    # 4 encoder blocks of stage 2 and 4 decoder blocks of up stage 0 are new (14 tensors each),
    # plus 3 skip convolutions, the final 4x expansion and the head.
    assert len(report.initialised) == 8 * 14 + 6 + 3 + 1
    assert len(report.loaded) == 342 - len(report.initialised)
    assert sorted(report.unused) == [
        "decoder_pred.bias",
        "decoder_pred.weight",
        "mask_token",
        "pos_embed",
    ]
    assert "2 blocks" in report.initialised["layers.2.blocks.2.attn.qkv.weight"]
    assert "task-specific" in report.initialised["head.weight"]


def test_load_pretrained_copies_values(golden):
    state = golden_state_dict(golden)
    model = models.SwinUNet(num_classes=2, **GOLDEN_MODEL)

    models.load_pretrained(model, {"model": state})

    loaded = model.state_dict()
    for key in ("layers.3.blocks.1.attn.qkv.weight", "layers_up.2.blocks.0.mlp.fc2.bias"):
        assert torch.equal(loaded[key], state[key]), key


def test_load_pretrained_classifier(golden):
    model = models.SwinClassifier(num_classes=3, **GOLDEN_MODEL)

    report = models.load_pretrained(model, golden_state_dict(golden))

    assert sorted(report.initialised) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert len(report.loaded) == 125
    assert len(report.unused) == 224 - 125


def test_load_pretrained_shape_mismatch(golden):
    model = models.SwinUNet(num_classes=2, in_chans=1, **GOLDEN_MODEL)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with pytest.raises(ValueError, match="patch_embed.proj.weight"):
        models.load_pretrained(model, golden_state_dict(golden))

    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_read_state_dict_rejects_pickles(tmp_path):
    torch.save({"model": {}, "elapsed": datetime.timedelta(hours=1)}, tmp_path / "odd.pth")

    with pytest.raises(ValueError, match="odd.pth"):
        models.read_state_dict(tmp_path / "odd.pth")


def test_read_state_dict_formats(golden, tmp_path):
    state = golden_state_dict(golden)
    torch.save({"model": state}, tmp_path / "weights.pth")
    safetensors.torch.save_file(state, tmp_path / "weights.safetensors")
    # The layout of checkpoints written by MAE-style training scripts.
    training_checkpoint = {"model": state, "epoch": 799, "args": argparse.Namespace(lr=1e-3)}
    torch.save(training_checkpoint, tmp_path / "checkpoint-799.pth")

    for name in ("weights.pth", "weights.safetensors", "checkpoint-799.pth"):
        loaded = models.read_state_dict(tmp_path / name)
        assert sorted(loaded) == sorted(state), name
        for key, value in state.items():
            assert torch.equal(loaded[key], value), (name, key)
