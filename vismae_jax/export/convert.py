"""Conversion between Flax SwinMAE parameters and PyTorch state_dicts with the public VIS-MAE names.

The Flax tree mirrors the PyTorch names: Flax `layers_0/blocks_1/attn/qkv/kernel` is PyTorch
`layers.0.blocks.1.attn.qkv.weight`. Dense kernels [in, out] become Linear weights [out, in],
Conv kernels [kh, kw, in, out] become Conv2d weights [out, in, kh, kw], LayerNorm `scale`
becomes `weight`. The fixed tables `pos_embed` and `relative_position_index` exist only in
PyTorch and are computed here.
"""

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
import torch
from absl import logging
from flax import traverse_util

from vismae_jax.torch import models as torch_models
from vismae_jax.torch import swin as torch_swin

PATCH_EMBED_WEIGHT = "patch_embed.proj.weight"


def torch_kwargs(model_config: ml_collections.ConfigDict, channels: int) -> dict[str, Any]:
    """Return the keyword arguments of `vismae_jax.torch.models.SwinMAE` for `model_config`."""
    return dict(
        img_size=int(model_config.image_size),
        patch_size=int(model_config.patch_size),
        in_chans=int(channels),
        embed_dim=int(model_config.embed_dim),
        depths=tuple(int(d) for d in model_config.depths),
        num_heads=tuple(int(h) for h in model_config.num_heads),
        window_size=int(model_config.window_size),
        mlp_ratio=float(model_config.mlp_ratio),
        drop_path_rate=float(model_config.drop_path_rate),
        mask_ratio=float(model_config.mask_ratio),
        norm_pix_loss=bool(model_config.norm_pix_loss),
        mask_unit=int(model_config.mask_unit),
    )


def expected_shapes(model_config: ml_collections.ConfigDict, channels: int) -> dict[str, tuple]:
    """Return {key: shape} of the PyTorch SwinMAE state_dict, in its order (no memory used)."""
    with torch.device("meta"):
        model = torch_models.SwinMAE(**torch_kwargs(model_config, channels))
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def flax_path_to_torch_key(path: tuple[str, ...]) -> str:
    """Map a Flax parameter path to its PyTorch key.

    ('layers_up_0', 'blocks_1', 'norm1', 'scale') -> 'layers_up.0.blocks.1.norm1.weight'.
    """
    *modules, leaf = path
    parts = [re.sub(r"^(.+)_(\d+)$", r"\1.\2", name) for name in modules]
    if leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*parts, leaf])


def torch_key_to_flax_path(key: str, ndim: int) -> tuple[str, ...]:
    """Invert `flax_path_to_torch_key`.

    `ndim` distinguishes a LayerNorm weight (1-D, Flax `scale`) from a kernel.
    """
    *modules, leaf = key.split(".")
    path: list[str] = []
    for name in modules:
        if name.isdigit():
            path[-1] = f"{path[-1]}_{name}"
        else:
            path.append(name)
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    return (*path, leaf)


def flax_leaf_to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    """Lay out one Flax array as PyTorch stores it."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel":
        raise ValueError(f"Unexpected {value.ndim}-D kernel; only Dense and 2-D Conv are known.")
    return value


def torch_leaf_to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    """Lay out one PyTorch array as Flax stores it (inverse of `flax_leaf_to_torch`)."""
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value


def to_numpy(value: Any) -> np.ndarray:
    """Return a host float32 copy of a JAX or NumPy array (bfloat16 parameters are widened)."""
    array = np.asarray(value)
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    return array


def convert_channels(
    state_dict: dict[str, torch.Tensor], channels_out: int
) -> dict[str, torch.Tensor]:
    """Convert the patch embedding and `decoder_pred` between 1 and C input channels.

    1 -> C is exact for gray images replicated to C channels: the patch-embedding weights are
    divided by C and copied to every channel, and each `decoder_pred` output row and bias entry
    is copied C times, channel fastest, so the prediction and the loss equal the 1-channel
    model's. C -> 1 sums the patch-embedding weights over channels (exact for replicated gray
    input) and keeps the channel-0 rows of `decoder_pred`.
    """
    channels_in = state_dict[PATCH_EMBED_WEIGHT].shape[1]
    if channels_in == channels_out:
        return dict(state_dict)
    if 1 not in (channels_in, channels_out):
        raise ValueError(
            f"Cannot convert {channels_in} input channels to {channels_out}; only conversions "
            "from or to 1 channel are defined."
        )

    converted = dict(state_dict)
    patch_weight = state_dict[PATCH_EMBED_WEIGHT]
    if channels_in == 1:
        converted[PATCH_EMBED_WEIGHT] = patch_weight.repeat(1, channels_out, 1, 1) / channels_out
        for key in ("decoder_pred.weight", "decoder_pred.bias"):
            converted[key] = state_dict[key].repeat_interleave(channels_out, dim=0)
    else:
        logging.warning(
            "Converting %d channels to 1: the patch embedding is summed over channels, and only "
            "the channel-0 outputs of decoder_pred are kept, so reconstructions of non-gray "
            "images change.",
            channels_in,
        )
        converted[PATCH_EMBED_WEIGHT] = patch_weight.sum(dim=1, keepdim=True)
        for key in ("decoder_pred.weight", "decoder_pred.bias"):
            converted[key] = state_dict[key][0::channels_in].clone()
    return converted


def fixed_tables(model_config: ml_collections.ConfigDict) -> dict[str, torch.Tensor]:
    """Return `pos_embed` and every block's `relative_position_index` for the PyTorch SwinMAE."""
    grid = model_config.image_size // model_config.patch_size
    tables = {
        "pos_embed": torch.from_numpy(
            torch_models.sincos_pos_embed(model_config.embed_dim, grid, grid)
        )[None]
    }
    index = torch_swin.relative_position_index(model_config.window_size)
    num_up = len(model_config.depths) - 1
    for s, depth in enumerate(model_config.depths):
        for j in range(depth):
            tables[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = index.clone()
    for u in range(num_up):
        for j in range(model_config.depths[num_up - 1 - u]):
            tables[f"layers_up.{u}.blocks.{j}.attn.relative_position_index"] = index.clone()
    return tables


def check_keys_and_shapes(
    state_dict: Mapping[str, Any], expected: dict[str, tuple], what: str
) -> None:
    """Raise ValueError naming every missing, unexpected or misshapen entry."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshapen = [
        f"{key} {tuple(state_dict[key].shape)} (expected {expected[key]})"
        for key in expected
        if key in state_dict and tuple(state_dict[key].shape) != expected[key]
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{what} does not match the configured SwinMAE: missing {missing}, unexpected "
            f"{unexpected}, wrong shape {misshapen}. Check that the model config (embed_dim, "
            "depths, num_heads, window_size, patch_size, image_size, channels) is the one the "
            "weights were trained with."
        )


def flax_to_torch(
    params: Mapping[str, Any], model_config: ml_collections.ConfigDict, channels_out: int
) -> dict[str, torch.Tensor]:
    """Convert Flax SwinMAE parameters into a PyTorch state_dict with the public names.

    params: the Flax parameter tree (the content of `variables["params"]`), arrays of any
    float dtype, for a model with `model_config.channels` input channels.
    channels_out: input channels of the PyTorch model (see `convert_channels`).
    Returns float32 CPU tensors (int64 for `relative_position_index`) in the order of
    `vismae_jax.torch.models.SwinMAE(...).state_dict()`, ready for `load_state_dict(strict=True)`.
    """
    if set(params) == {"params"}:
        params = params["params"]
    state_dict = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        array = flax_leaf_to_torch(path[-1], to_numpy(value))
        # A writable C-ordered copy: torch.from_numpy shares memory and warns on read-only arrays.
        state_dict[flax_path_to_torch_key(path)] = torch.from_numpy(np.array(array, order="C"))
    check_keys_and_shapes(
        state_dict | fixed_tables(model_config),
        expected_shapes(model_config, model_config.channels),
        "The Flax parameter tree",
    )

    state_dict = convert_channels(state_dict, channels_out) | fixed_tables(model_config)
    expected = expected_shapes(model_config, channels_out)
    return {key: state_dict[key].contiguous() for key in expected}


def torch_to_flax(
    state_dict: Mapping[str, torch.Tensor], model_config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Convert a PyTorch SwinMAE state_dict (ours or the public code's) into Flax parameters.

    state_dict: the public names, optionally wrapped as {"model": state_dict}, with any number
    of input channels that `convert_channels` can turn into `model_config.channels`.
    `pos_embed` is not used by the model and is dropped; every `relative_position_index` must
    be the canonical table. Returns a nested dict of NumPy arrays in `model_config.param_dtype`.
    """
    state_dict = torch_models.unwrap_state_dict(dict(state_dict))
    if PATCH_EMBED_WEIGHT not in state_dict:
        raise ValueError(f"The state_dict has no {PATCH_EMBED_WEIGHT}; is it a SwinMAE checkpoint?")
    state_dict = convert_channels(state_dict, model_config.channels)

    expected = expected_shapes(model_config, model_config.channels)
    expected.pop("pos_embed")
    state_dict = {key: value for key, value in state_dict.items() if key != "pos_embed"}
    check_keys_and_shapes(state_dict, expected, "The PyTorch state_dict")

    canonical = torch_swin.relative_position_index(model_config.window_size)
    param_dtype = jnp.dtype(model_config.param_dtype)
    flat = {}
    for key, tensor in state_dict.items():
        if key.endswith("relative_position_index"):
            if not torch.equal(tensor.to(torch.int64), canonical):
                raise ValueError(f"{key} is not the canonical relative position index table.")
            continue
        value = tensor.detach().cpu().to(torch.float32).numpy()
        path = torch_key_to_flax_path(key, value.ndim)
        flat[path] = np.ascontiguousarray(torch_leaf_to_flax(path[-1], value)).astype(param_dtype)
    return traverse_util.unflatten_dict(flat)
