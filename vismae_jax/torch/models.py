"""PyTorch SwinMAE, SwinUNet and SwinClassifier with the parameter names of the public VIS-MAE code.

Weights exported from vismae-jax load into these modules with `load_state_dict(strict=True)`
(SwinMAE) or through `load_pretrained` (U-Net and classifier initialised from MAE weights).
Images are NCHW float tensors, normalised with the pretraining mean and std.
"""

import argparse
import collections
import dataclasses
import logging
import pathlib
import pickle
import re

import numpy as np
import safetensors.torch
import torch
from torch import nn

from vismae_jax.torch import swin

logger = logging.getLogger(__name__)


def to_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """Return (height, width) from an int side or a pair."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def check_image_size(image_size: tuple[int, int], patch_size: int, num_stages: int) -> None:
    """Raise ValueError unless every side is a multiple of patch_size * 2**(num_stages - 1)."""
    multiple = patch_size * 2 ** (num_stages - 1)
    height, width = image_size
    if height % multiple or width % multiple:
        raise ValueError(
            f"Image size {height}x{width} is not a multiple of {multiple} (patch_size "
            f"{patch_size} times 2**{num_stages - 1} for {num_stages} stages)."
        )


def sincos_pos_embed(embed_dim: int, grid_height: int, grid_width: int) -> np.ndarray:
    """Return the fixed 2-D sin-cos table float32 [grid_height * grid_width, embed_dim].

    Tokens are row-major. Dims 0 .. D/2-1 encode the column and dims D/2 .. D-1 the row; each
    half is sin then cos of position * omega_k with omega_k = 1 / 10000**(k / (D/4)),
    k = 0 .. D/4-1. It is computed in float64 and rounded to float32 once.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be a multiple of 4 for a 2-D sin-cos table.")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    rows, cols = np.meshgrid(np.arange(grid_height), np.arange(grid_width), indexing="ij")
    halves = []
    for position in (cols.reshape(-1), rows.reshape(-1)):
        angles = position[:, None].astype(np.float64) * omega[None, :]
        halves += [np.sin(angles), np.cos(angles)]
    return np.concatenate(halves, axis=1).astype(np.float32)


def run_encoder(layers: nn.ModuleList, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the encoder stages on tokens x: [B, h, w, D].

    Returns the output of the last stage [B, h / 2**(S-1), w / 2**(S-1), 2**(S-1) * D] and the
    input of every stage (what the U-Net's skip connections take).
    """
    stage_inputs = []
    for layer in layers:
        stage_inputs.append(x)
        x = layer(x)
    return x, stage_inputs


class SwinMAE(nn.Module):
    """Swin masked autoencoder: masked tokens replaced by `mask_token`, full-grid Swin U-shape.

    No skip connections and no positional embedding is added. `pos_embed` is the public
    code's unused fixed sin-cos table, kept as a non-trainable parameter so that public
    checkpoints load strictly.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = False,
        mask_unit: int = 16,
    ):
        super().__init__()
        self.img_size = to_pair(img_size)
        check_image_size(self.img_size, patch_size, len(depths))
        if mask_unit % patch_size or any(side % mask_unit for side in self.img_size):
            raise ValueError(
                f"mask_unit={mask_unit} must be a multiple of patch_size={patch_size} and "
                f"divide the image size {self.img_size}."
            )
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.mask_unit = mask_unit
        self.norm_pix_loss = norm_pix_loss
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)

        table = sincos_pos_embed(embed_dim, *self.grid_size)
        self.pos_embed = nn.Parameter(torch.from_numpy(table)[None], requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        self.patch_embed = swin.PatchEmbed(patch_size, in_chans, embed_dim)
        stage_args = (embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate)
        self.layers = swin.encoder_layers(*stage_args)
        bottleneck = embed_dim * 2 ** (len(depths) - 1)
        self.first_patch_expanding = swin.PatchExpanding(bottleneck, 2, bottleneck // 2)
        self.layers_up = swin.decoder_layers(*stage_args)
        self.norm_up = swin.layer_norm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size * patch_size * in_chans)

        self.apply(swin.init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """Cut images: [B, C, H, W] into patch vectors [B, L, p*p*C].

        Vectors are ordered (row in patch, column in patch, channel); tokens are row-major.
        """
        batch, channels, height, width = images.shape
        p = self.patch_size
        x = images.reshape(batch, channels, height // p, p, width // p, p)
        x = x.permute(0, 2, 4, 3, 5, 1)
        return x.reshape(batch, (height // p) * (width // p), p * p * channels)

    def unpatchify(self, patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Invert `patchify`: [B, L, p*p*C] -> images [B, C, height, width]."""
        batch = patches.shape[0]
        p = self.patch_size
        x = patches.reshape(batch, height // p, width // p, p, p, -1)
        x = x.permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, -1, height, width)

    def random_mask(
        self, batch_size: int, image_size: tuple[int, int] | None = None, generator=None
    ) -> torch.Tensor:
        """Draw a window mask bool [B, L] (True = masked token), independently per sample.

        The image is cut into mask units of mask_unit x mask_unit pixels; int(units *
        (1 - mask_ratio)) units stay visible and the rest are masked.
        """
        height, width = image_size or self.img_size
        unit_rows, unit_cols = height // self.mask_unit, width // self.mask_unit
        num_units = unit_rows * unit_cols
        num_visible = int(num_units * (1 - self.mask_ratio))

        noise = torch.rand(batch_size, num_units, generator=generator)
        rank = noise.argsort(dim=1).argsort(dim=1)
        unit_mask = (rank >= num_visible).view(batch_size, unit_rows, unit_cols)

        tokens_per_unit = self.mask_unit // self.patch_size
        token_mask = unit_mask.repeat_interleave(tokens_per_unit, dim=1)
        token_mask = token_mask.repeat_interleave(tokens_per_unit, dim=2)
        return token_mask.reshape(batch_size, -1).to(self.mask_token.device)

    def forward_encoder(self, images: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Encode images: [B, C, H, W] with mask: [B, L] bool (True = masked) or None.

        Masked tokens are replaced by `mask_token` after the patch-embedding LayerNorm.
        Returns the latent [B, H/32, W/32, 8 * embed_dim] after the last stage (no final norm).
        """
        x = self.patch_embed(images)
        if mask is not None:
            batch, height, width, dim = x.shape
            if mask.shape != (batch, height * width):
                raise ValueError(
                    f"mask has shape {tuple(mask.shape)}; expected {(batch, height * width)}."
                )
            masked = mask.to(torch.bool).view(batch, height, width, 1)
            x = torch.where(masked, self.mask_token.view(1, 1, 1, dim).to(x.dtype), x)
        latent, _ = run_encoder(self.layers, x)
        return latent

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """Decode latent: [B, h, w, 8D] into pixel predictions [B, L, p*p*C]."""
        x = self.first_patch_expanding(latent)
        for layer in self.layers_up:
            x = layer(x)
        x = self.decoder_pred(self.norm_up(x))
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def forward_loss(
        self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mean squared error per patch vector, averaged over the masked tokens of the batch.

        With norm_pix_loss, each target patch is normalised by its mean and unbiased variance
        (eps 1e-6) first.
        """
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_token = ((pred - target) ** 2).mean(dim=-1)
        weights = mask.to(per_token.dtype)
        return (per_token * weights).sum() / weights.sum()

    def forward(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct images: [B, C, H, W] float from the tokens that `mask` leaves visible.

        mask: [B, L] bool or 0/1, True = masked, L row-major over the token grid; None draws one
        with `random_mask`. Returns (loss scalar, pred [B, L, p*p*C], mask [B, L] bool).
        """
        if mask is None:
            mask = self.random_mask(images.shape[0], tuple(images.shape[-2:]))
        mask = mask.to(torch.bool)
        pred = self.forward_decoder(self.forward_encoder(images, mask))
        return self.forward_loss(images, pred, mask), pred, mask


class SwinUNet(nn.Module):
    """Swin U-Net for segmentation: the MAE's encoder and decoder joined by skip connections.

    Before decoder stage u, its input is concatenated (decoder features first) with the input
    of encoder stage S-2-u and reduced from 2d to d channels by the 1x1 Conv2d
    `skip_connection_layers.u`. Then `norm_up`, a 4x PatchExpanding to pixel resolution, and a
    1x1 Conv2d head without bias. depths=(2, 2, 2, 2) matches the pretrained MAE; the public
    fine-tuning code uses (2, 2, 6, 2), whose extra blocks start from random weights.
    """

    def __init__(
        self,
        num_classes: int,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.num_stages = len(depths)

        self.patch_embed = swin.PatchEmbed(patch_size, in_chans, embed_dim)
        stage_args = (embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate)
        self.layers = swin.encoder_layers(*stage_args)
        bottleneck = embed_dim * 2 ** (len(depths) - 1)
        self.first_patch_expanding = swin.PatchExpanding(bottleneck, 2, bottleneck // 2)
        self.layers_up = swin.decoder_layers(*stage_args)
        self.skip_connection_layers = nn.ModuleList(
            nn.Conv2d(2 * embed_dim * 2**s, embed_dim * 2**s, kernel_size=1)
            for s in reversed(range(len(depths) - 1))
        )
        self.norm_up = swin.layer_norm(embed_dim)
        self.final_patch_expanding = swin.PatchExpanding(embed_dim, patch_size, embed_dim)
        self.head = nn.Conv2d(embed_dim, num_classes, kernel_size=1, bias=False)

        self.apply(swin.init_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Segment images: [B, C, H, W] float -> logits [B, num_classes, H, W].

        H and W must be multiples of patch_size * 2**(stages - 1) (32 for the defaults).
        """
        check_image_size(tuple(images.shape[-2:]), self.patch_size, self.num_stages)
        x, stage_inputs = run_encoder(self.layers, self.patch_embed(images))

        x = self.first_patch_expanding(x)
        for u, layer in enumerate(self.layers_up):
            skip = stage_inputs[self.num_stages - 2 - u]
            x = torch.cat([x, skip], dim=-1).permute(0, 3, 1, 2)
            x = self.skip_connection_layers[u](x).permute(0, 2, 3, 1)
            x = layer(x)

        x = self.final_patch_expanding(self.norm_up(x))
        return self.head(x.permute(0, 3, 1, 2))


class SwinClassifier(nn.Module):
    """Swin encoder, LayerNorm `norm`, global average pool over tokens, Linear `head`."""

    def __init__(
        self,
        num_classes: int,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 2, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.num_stages = len(depths)
        self.num_features = embed_dim * 2 ** (len(depths) - 1)

        self.patch_embed = swin.PatchEmbed(patch_size, in_chans, embed_dim)
        self.layers = swin.encoder_layers(
            embed_dim, depths, num_heads, window_size, mlp_ratio, drop_path_rate
        )
        self.norm = swin.layer_norm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

        self.apply(swin.init_weights)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float -> pooled features [B, 8 * embed_dim]."""
        check_image_size(tuple(images.shape[-2:]), self.patch_size, self.num_stages)
        x, _ = run_encoder(self.layers, self.patch_embed(images))
        return self.norm(x).mean(dim=(1, 2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Classify images: [B, C, H, W] float -> logits [B, num_classes]."""
        return self.head(self.forward_features(images))


@dataclasses.dataclass
class LoadReport:
    """Outcome of `load_pretrained` for each state_dict key.

    loaded: keys copied from the checkpoint. initialised: keys of the module that the
    checkpoint lacks (they keep their fresh initialisation), mapped to the reason.
    unused: checkpoint keys that the module has no place for.
    """

    loaded: list[str]
    initialised: dict[str, str]
    unused: list[str]

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} tensors from the checkpoint."]
        lines.append(f"Newly initialised: {len(self.initialised)}.")
        by_reason: dict[str, list[str]] = collections.defaultdict(list)
        for key, reason in self.initialised.items():
            by_reason[reason].append(key)
        for reason, keys in by_reason.items():
            lines.append(f"  {summarise_keys(keys)}: {reason}")
        lines.append(f"Unused checkpoint entries: {len(self.unused)}.")
        if self.unused:
            lines.append(f"  {summarise_keys(self.unused)}")
        return "\n".join(lines)


def summarise_keys(keys: list[str]) -> str:
    """Group keys by top-level module: 'head (1), layers.2 (28)'."""
    counts: dict[str, int] = collections.Counter()
    for key in keys:
        match = re.match(r"(layers(?:_up)?\.\d+|[^.]+)", key)
        counts[match.group(1)] += 1
    return ", ".join(f"{prefix} ({count})" for prefix, count in counts.items())


def missing_key_reason(key: str, checkpoint_keys: set[str]) -> str:
    """Explain why a module key has no counterpart in the checkpoint."""
    block = re.match(r"(layers(?:_up)?\.\d+)\.blocks\.(\d+)\.", key)
    if block:
        stage = block.group(1)
        depth = len({k.split(".")[3] for k in checkpoint_keys if k.startswith(f"{stage}.blocks.")})
        return f"the checkpoint's stage {stage} has only {depth} blocks"
    top = key.split(".")[0]
    if not any(k.split(".")[0] == top for k in checkpoint_keys):
        return f"task-specific layer, the checkpoint has no '{top}'"
    return "missing from the checkpoint"


def unwrap_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """Return the state_dict inside {"model": ...}, or `checkpoint` itself if it is one."""
    if "model" in checkpoint and isinstance(checkpoint["model"], dict):
        return checkpoint["model"]
    return checkpoint


def read_state_dict(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Read a .pth ({"model": state_dict} or a bare state_dict) or .safetensors file on CPU.

    .pth files are unpickled with `weights_only=True`, which also admits the
    argparse.Namespace that training scripts often store next to the weights.
    """
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(str(path))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} contains objects other than tensors, so it was not unpickled "
            f"(weights_only=True): {error}. If you trust the file, re-save only its weights: "
            "torch.save({'model': checkpoint['model']}, 'weights.pth')."
        ) from error
    return unwrap_state_dict(checkpoint)


def load_pretrained(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> LoadReport:
    """Initialise `module` (SwinUNet, SwinClassifier or SwinMAE) from pretrained MAE weights.

    Every module key present in `state_dict` is copied; the rest keep their initialisation.
    Raises ValueError on any shape mismatch or on a non-canonical `relative_position_index`,
    before anything is copied. Logs and returns the report.
    """
    state_dict = unwrap_state_dict(state_dict)
    target = module.state_dict()
    checkpoint_keys = set(state_dict)

    mismatches = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)}, model {tuple(value.shape)}"
        for key, value in target.items()
        if key in state_dict and state_dict[key].shape != value.shape
    ]
    if mismatches:
        hint = ""
        if any(m.startswith("patch_embed.proj.weight") for m in mismatches):
            hint = (
                " The input channels differ: build the model with the checkpoint's in_chans, "
                "or export with the matching --channels."
            )
        raise ValueError(
            "Shape mismatch loading pretrained weights: " + "; ".join(mismatches) + hint
        )

    for key, value in target.items():
        if key.endswith("relative_position_index") and key in state_dict:
            if not torch.equal(state_dict[key].to(value.dtype), value):
                raise ValueError(f"{key} in the checkpoint is not the canonical index table.")

    merged = dict(target)
    loaded, initialised = [], {}
    for key in target:
        if key in state_dict:
            merged[key] = state_dict[key].to(target[key].dtype)
            loaded.append(key)
        else:
            initialised[key] = missing_key_reason(key, checkpoint_keys)
    module.load_state_dict(merged, strict=True)

    unused = [key for key in state_dict if key not in target]
    report = LoadReport(loaded=loaded, initialised=initialised, unused=unused)
    logger.info("Pretrained weights for %s:\n%s", type(module).__name__, report)
    return report
