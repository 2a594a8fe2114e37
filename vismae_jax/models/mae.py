"""The VIS-MAE Swin masked autoencoder: encoder, decoder, patchify and reconstruction loss.

Masked tokens are replaced in place by a learned mask token after the patch-embedding
LayerNorm, so the full token grid flows through the Swin encoder and the decoder. The decoder
predicts every patch, and the loss counts the masked patches only. There are no skip
connections and no positional embedding (the public PyTorch code keeps an unused fixed
`pos_embed`).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vismae_jax.models import swin

NORM_PIX_EPSILON = 1e-6


def check_image_size(image_size: int, patch_size: int, num_stages: int) -> None:
    """Raise ValueError unless image_size is a multiple of patch_size * 2**(num_stages - 1).

    Below that, some PatchMerging would receive an odd token map, and the decoder's
    PatchExpanding layers could not restore the input grid.
    """
    multiple = patch_size * 2 ** (num_stages - 1)
    if image_size <= 0 or image_size % multiple != 0:
        raise ValueError(
            f"Invalid image_size={image_size}: the Swin MAE with patch_size={patch_size} and "
            f"{num_stages} stages needs a multiple of patch_size * 2**(stages - 1) = {multiple} "
            f"pixels (e.g. {max(multiple, image_size // multiple * multiple)}) so that every "
            "patch merging halves an even token map."
        )


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """Cut images [B, H, W, C] into patch vectors [B, L, p*p*C].

    Tokens follow the row-major grid of patches; each vector is ordered (row in patch, column
    in patch, channel).
    """
    batch, height, width, channels = images.shape
    rows, cols = height // patch_size, width // patch_size
    x = images.reshape(batch, rows, patch_size, cols, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, rows * cols, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, channels: int) -> jax.Array:
    """Inverse of `patchify` for a square grid: [B, L, p*p*C] -> [B, H, W, C]."""
    batch, num_tokens, _ = patches.shape
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"unpatchify needs a square token grid, got L={num_tokens}.")

    x = patches.reshape(batch, side, side, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, side * patch_size, side * patch_size, channels)


def reconstruction_loss(
    pred: jax.Array, target: jax.Array, mask: jax.Array, norm_pix_loss: bool = False
) -> jax.Array:
    """Mean squared error per patch vector, averaged over the masked tokens of the whole batch.

    Args:
      pred: [B, L, P] predicted patches.
      target: [B, L, P] patches of the normalised input (`patchify`).
      mask: [B, L] bool or 0/1, True (1) = masked.
      norm_pix_loss: if True, normalise each target patch by its own mean and unbiased
        variance (eps 1e-6) first.

    Returns:
      float32 scalar; 0 when no token is masked.
    """
    pred = pred.astype(jnp.float32)
    target = target.astype(jnp.float32)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        variance = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(variance + NORM_PIX_EPSILON)

    per_token = jnp.mean(jnp.square(pred - target), axis=-1)
    weights = mask.astype(jnp.float32)
    return jnp.sum(per_token * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[tuple[float, ...]]:
    """Spread `rate` linearly from 0 over all encoder blocks; returns the rates per stage."""
    rates = np.linspace(0.0, rate, sum(depths))
    bounds = np.cumsum((0, *depths))
    return [
        tuple(float(r) for r in rates[start:end])
        for start, end in zip(bounds[:-1], bounds[1:], strict=True)
    ]


class SwinMAE(nn.Module):
    """Swin masked autoencoder on square images [B, H, W, C].

    Encoder stage s has depth depths[s], num_heads[s] heads and width embed_dim * 2**s, with
    PatchMerging after every stage but the last. The decoder opens with PatchExpanding of the
    bottleneck. Decoder stage u then takes the depth, heads and drop-path rates of encoder stage
    (n - 2 - u) and ends with PatchExpanding, except the last one. LayerNorm `norm_up` and the
    linear `decoder_pred` map every token to p*p*C values.
    """

    image_size: int = 224
    patch_size: int = 4
    channels: int = 1
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 2, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    norm_pix_loss: bool = False
    dtype: Any = jnp.bfloat16
    param_dtype: Any = jnp.float32
    remat: bool = False

    @classmethod
    def from_config(cls, model_config: ml_collections.ConfigDict) -> "SwinMAE":
        """Build the model from `config.model`; the masking fields are not model fields."""
        return cls(
            image_size=model_config.image_size,
            patch_size=model_config.patch_size,
            channels=model_config.channels,
            embed_dim=model_config.embed_dim,
            depths=tuple(model_config.depths),
            num_heads=tuple(model_config.num_heads),
            window_size=model_config.window_size,
            mlp_ratio=model_config.mlp_ratio,
            drop_path_rate=model_config.drop_path_rate,
            norm_pix_loss=model_config.norm_pix_loss,
            dtype=jnp.dtype(model_config.dtype),
            param_dtype=jnp.dtype(model_config.param_dtype),
            remat=model_config.remat,
        )

    def setup(self):
        num_stages = len(self.depths)
        if num_stages < 2 or len(self.num_heads) != num_stages:
            raise ValueError(
                f"Invalid depths={tuple(self.depths)} and num_heads={tuple(self.num_heads)}: "
                "give one depth and one head count per stage, at least two stages."
            )
        check_image_size(self.image_size, self.patch_size, num_stages)
        for stage, heads in enumerate(self.num_heads):
            if (self.embed_dim * 2**stage) % heads:
                raise ValueError(
                    f"Invalid num_heads[{stage}]={heads}: it must divide the stage width "
                    f"{self.embed_dim * 2**stage}."
                )

        dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        rates = drop_path_rates(self.drop_path_rate, self.depths)

        def stage(index: int, **resample) -> swin.SwinStage:
            return swin.SwinStage(
                depth=self.depths[index],
                num_heads=self.num_heads[index],
                window_size=self.window_size,
                mlp_ratio=self.mlp_ratio,
                drop_path_rates=rates[index],
                remat=self.remat,
                dtype=dtype,
                param_dtype=param_dtype,
                **resample,
            )

        self.patch_embed = swin.PatchEmbed(self.patch_size, self.embed_dim, dtype, param_dtype)
        self.mask_token = self.param(
            "mask_token", nn.initializers.normal(0.02), (1, 1, self.embed_dim), param_dtype
        )
        self.layers = [stage(s, downsample=s < num_stages - 1) for s in range(num_stages)]

        self.first_patch_expanding = swin.PatchExpanding(
            self.embed_dim * 2 ** (num_stages - 2), dtype=dtype, param_dtype=param_dtype
        )
        self.layers_up = [
            stage(num_stages - 2 - u, upsample=u < num_stages - 2) for u in range(num_stages - 1)
        ]
        self.norm_up = swin.layer_norm(dtype, param_dtype)
        self.decoder_pred = nn.Dense(
            self.patch_size * self.patch_size * self.channels,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=swin.dense_init,
        )

    def encode(self, images: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Encode masked images.

        Args:
          images: [B, H, W, C] normalised float, H = W = image_size, C = channels.
          mask: [B, L] bool (or 0/1), True = masked, over the row-major (H/p) x (W/p) grid.
          deterministic: False turns drop-path on (needs the "drop_path" RNG stream).

        Returns:
          latent [B, h, w, embed_dim * 2**(stages - 1)] in `dtype` (h = H / (p * 2**(stages-1))),
          the output of the last encoder stage without a final norm.
        """
        expected = (self.image_size, self.image_size, self.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"Expected images [B, {expected[0]}, {expected[1]}, {expected[2]}] (NHWC), got "
                f"shape {tuple(images.shape)}; resize the batch or set image_size/channels."
            )

        x = self.patch_embed(images)
        batch, rows, cols, _ = x.shape
        if mask.shape != (batch, rows * cols):
            raise ValueError(f"Expected mask [{batch}, {rows * cols}], got shape {mask.shape}.")

        token_masked = mask.astype(bool).reshape(batch, rows, cols, 1)
        mask_token = self.mask_token.reshape(1, 1, 1, self.embed_dim).astype(x.dtype)
        x = jnp.where(token_masked, mask_token, x)

        for layer in self.layers:
            x = layer(x, deterministic)
        return x

    def decode(self, latent: jax.Array, deterministic: bool = True) -> jax.Array:
        """Decode latent [B, h, w, D_bottleneck] into predicted patches float32 [B, L, p*p*C]."""
        x = self.first_patch_expanding(latent)
        for layer in self.layers_up:
            x = layer(x, deterministic)
        x = self.norm_up(x)

        batch, rows, cols, channels = x.shape
        pred = self.decoder_pred(x.reshape(batch, rows * cols, channels))
        return pred.astype(jnp.float32)

    def __call__(self, images: jax.Array, mask: jax.Array, deterministic: bool = True) -> jax.Array:
        """Predict every patch: images [B, H, W, C], mask bool [B, L] -> float32 [B, L, p*p*C]."""
        return self.decode(self.encode(images, mask, deterministic), deterministic)
