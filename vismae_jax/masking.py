"""Window masking for the Swin MAE: random square units of tokens, drawn on device.

A mask unit is a square of `mask_unit` x `mask_unit` pixels, that is (mask_unit // patch_size)**2
tokens. Every sample draws its own random permutation of the units and keeps the first
int(num_units * (1 - mask_ratio)) units visible. All tokens of the other units are masked.
"""

import jax
import jax.numpy as jnp


def check_mask_geometry(image_size: int, patch_size: int, mask_unit: int) -> None:
    """Raise ValueError unless mask units tile both the image and the token grid exactly."""
    if mask_unit <= 0 or mask_unit % patch_size != 0:
        raise ValueError(
            f"Invalid mask_unit={mask_unit}: it must be a positive multiple of "
            f"patch_size={patch_size}, so that every unit covers whole tokens."
        )
    if image_size <= 0 or image_size % mask_unit != 0:
        raise ValueError(
            f"Invalid image_size={image_size}: window masking needs a positive multiple of "
            f"mask_unit={mask_unit} pixels; resize or crop the images to such a size."
        )


def num_kept_units(image_size: int, mask_unit: int = 16, mask_ratio: float = 0.75) -> int:
    """Return the number of mask units kept visible per sample: int(num_units * (1 - ratio))."""
    units_per_side = image_size // mask_unit
    return int(units_per_side**2 * (1 - mask_ratio))


def window_mask(
    key: jax.Array,
    batch_size: int,
    image_size: int,
    patch_size: int = 4,
    mask_unit: int = 16,
    mask_ratio: float = 0.75,
) -> jax.Array:
    """Draw one window mask per sample.

    Args:
      key: a JAX PRNG key; the same key gives the same masks.
      batch_size: number of samples B.
      image_size: side of the square image in pixels, a multiple of `mask_unit`.
      patch_size: side of a token in pixels.
      mask_unit: side of a mask unit in pixels, a multiple of `patch_size`.
      mask_ratio: fraction of units to mask, in [0, 1].

    Returns:
      bool [B, L] with L = (image_size // patch_size)**2 over the row-major token grid;
      True marks a masked token.
    """
    check_mask_geometry(image_size, patch_size, mask_unit)
    if not 0.0 <= mask_ratio <= 1.0:
        raise ValueError(f"Invalid mask_ratio={mask_ratio}: it must lie in [0, 1].")

    units_per_side = image_size // mask_unit
    tokens_per_unit_side = mask_unit // patch_size
    num_keep = num_kept_units(image_size, mask_unit, mask_ratio)

    # The rank of each unit's noise within its sample is a uniform random permutation, drawn
    # independently per sample; the num_keep lowest ranks stay visible. Ranks are distinct,
    # so exactly num_keep units per sample are kept even if two noise values tie.
    noise = jax.random.uniform(key, (batch_size, units_per_side**2))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    unit_masked = (ranks >= num_keep).reshape(batch_size, units_per_side, 1, units_per_side, 1)

    # Expand each unit to its square of tokens: axes (unit row, token row in unit, unit column,
    # token column in unit) flatten to the row-major token grid.
    token_masked = jnp.broadcast_to(
        unit_masked,
        (batch_size, units_per_side, tokens_per_unit_side, units_per_side, tokens_per_unit_side),
    )
    return token_masked.reshape(batch_size, (units_per_side * tokens_per_unit_side) ** 2)
