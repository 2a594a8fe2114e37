"""Reconstruction pictures: original, masked input and reconstruction, one row per image.

The reconstruction shows the model's prediction on masked patches with the visible patches
of the original pasted back, as MAE papers present it. Masks come from a fixed key, so the
pictures of successive steps show the same masks.
"""

import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from PIL import Image

from vismae_jax.models import mae
from vismae_jax.train import step as step_lib

RECONSTRUCTION_DIR = "reconstructions"
MASKED_FILL = 0.5  # Grey level in [0, 1] that marks masked patches in the masked-input column.


def patch_to_pixel_mask(mask: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Expand a token mask bool [B, L] to pixels bool [B, H, W, C]."""
    patches = jnp.broadcast_to(mask[:, :, None], (*mask.shape, patch_size * patch_size * channels))
    return mae.unpatchify(patches.astype(jnp.float32), patch_size, channels) > 0.5


def make_reconstruct_fn(
    model: nn.Module,
    config: ml_collections.ConfigDict,
    num_images: int,
    out_sharding: NamedSharding,
) -> Callable[[dict, jax.Array], dict[str, jax.Array]]:
    """Build a jitted (params, images) -> pictures function for the first `num_images` images.

    images: uint8 [B, H, W, C] with B >= num_images. Returns float32 [num_images, H, W, C]
    arrays in [0, 1] (pixel scale before normalisation), replicated on every device:
    "original", "masked" (masked patches grey) and "reconstruction" (predicted masked
    patches, original visible patches).
    """
    model_config, data_config = config.model, config.data
    patch_size, channels = model_config.patch_size, model_config.channels

    def reconstruct(params, images):
        images = step_lib.normalize(images[:num_images], data_config)
        key = step_lib.stream_key(config.seed, step_lib.RECONSTRUCTION_STREAM)
        mask = step_lib.make_mask(key, num_images, model_config)
        pred = model.apply({"params": params}, images, mask, deterministic=True)

        if model_config.norm_pix_loss:
            # The model predicts each patch normalised by its own mean and variance; undo that
            # with the statistics of the original patch, as the loss defines them.
            target = mae.patchify(images, patch_size)
            mean = target.mean(axis=-1, keepdims=True)
            variance = target.var(axis=-1, keepdims=True, ddof=1)
            pred = pred * jnp.sqrt(variance + mae.NORM_PIX_EPSILON) + mean

        predicted = mae.unpatchify(pred, patch_size, channels)
        pixel_mask = patch_to_pixel_mask(mask, patch_size, channels)

        def to_unit_range(x):
            return jnp.clip(x * data_config.pixel_std + data_config.pixel_mean, 0.0, 1.0)

        original = to_unit_range(images)
        return {
            "original": original,
            "masked": jnp.where(pixel_mask, MASKED_FILL, original),
            "reconstruction": jnp.where(pixel_mask, to_unit_range(predicted), original),
        }

    return jax.jit(reconstruct, out_shardings=out_sharding)


def make_grid(pictures: dict[str, np.ndarray]) -> np.ndarray:
    """Tile the pictures into one RGB image: uint8 [N * H, 3 * W, 3].

    Row n shows image n; columns are original, masked input, reconstruction.
    """
    columns = [np.asarray(pictures[name]) for name in ("original", "masked", "reconstruction")]
    rows = np.concatenate(columns, axis=2)  # [N, H, 3W, C]
    grid = np.concatenate(list(rows), axis=0)  # [N * H, 3W, C]
    if grid.shape[-1] == 1:
        grid = np.repeat(grid, 3, axis=-1)
    return np.round(grid * 255.0).astype(np.uint8)


def write_png(grid: np.ndarray, workdir: str | pathlib.Path, step: int) -> pathlib.Path:
    """Write `grid` to workdir/reconstructions/step_NNNNNNNN.png and return the path."""
    directory = pathlib.Path(workdir) / RECONSTRUCTION_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.png"
    Image.fromarray(grid).save(path)
    return path
