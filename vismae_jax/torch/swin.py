"""Swin Transformer building blocks in PyTorch, named and computed as in the public VIS-MAE code.

Every tensor between blocks is channels-last, `[B, H, W, C]`, the layout of the public code.
Attribute names fix the state_dict keys that exported weights must match, so keep them.
"""

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-6

# Logit added between tokens of different regions in a shifted window (the public code's value,
# a large negative number rather than -inf).
SHIFT_MASK_VALUE = -100.0


def layer_norm(dim: int) -> nn.LayerNorm:
    """Return a LayerNorm over the last axis with the eps of the public code (1e-6)."""
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS)


def relative_position_index(window_size: int) -> torch.Tensor:
    """Return the int64 [N, N] index (N = window_size**2) into the relative position bias table.

    Tokens are row-major in the window. Entry (i, j) for query token i at (ri, ci) and key token
    j at (rj, cj) is (ri - rj + window_size - 1) * (2 * window_size - 1) + (ci - cj +
    window_size - 1). The values run over 0 .. (2 * window_size - 1)**2 - 1.
    """
    coords = torch.arange(window_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()

    delta_rows = rows[:, None] - rows[None, :] + window_size - 1
    delta_cols = cols[:, None] - cols[None, :] + window_size - 1
    return (delta_rows * (2 * window_size - 1) + delta_cols).to(torch.int64)


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Cut x: [B, H, W, C] into windows: [B * nW, window_size**2, C], windows row-major."""
    batch, height, width, channels = x.shape
    x = x.view(
        batch, height // window_size, window_size, width // window_size, window_size, channels
    )
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window_size * window_size, channels)


def window_reverse(
    windows: torch.Tensor, window_size: int, height: int, width: int
) -> torch.Tensor:
    """Invert `window_partition`: windows [B * nW, window_size**2, C] -> [B, H, W, C]."""
    channels = windows.shape[-1]
    rows, cols = height // window_size, width // window_size
    x = windows.view(-1, rows, cols, window_size, window_size, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, channels)


def shifted_window_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device
) -> torch.Tensor:
    """Return the additive attention mask [nW, N, N] of a map rolled by -shift_size.

    After the roll, a window can contain tokens from up to four regions of the original map
    that are not neighbours. Pairs from different regions get SHIFT_MASK_VALUE, all others 0.
    `height` and `width` are the padded map size (multiples of window_size).
    """
    region = torch.zeros(1, height, width, 1, device=device)
    bands = (
        slice(0, -window_size),
        slice(-window_size, -shift_size),
        slice(-shift_size, None),
    )
    label = 0
    for row_band in bands:
        for col_band in bands:
            region[:, row_band, col_band, :] = label
            label += 1

    region_windows = window_partition(region, window_size).squeeze(-1)
    different = region_windows[:, :, None] != region_windows[:, None, :]
    zeros = torch.zeros_like(different, dtype=torch.float32)
    return zeros.masked_fill(different, SHIFT_MASK_VALUE)


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability `drop_prob`."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = x.new_empty(shape).bernoulli_(keep_prob)
        return x * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    """Two Linear layers with exact (erf) GELU between them."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    qkv output features are ordered (q|k|v, head, head_dim); q is scaled by head_dim**-0.5.
    """

    def __init__(self, dim: int, window_size: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Width {dim} is not divisible by num_heads={num_heads}.")
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5

        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads)
        )
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within windows. x: [B * nW, N, C]; mask: [nW, N, N] additive or None."""
        windows, tokens, channels = x.shape
        head_dim = channels // self.num_heads

        qkv = self.qkv(x).view(windows, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)

        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(tokens, tokens, -1).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(-1, num_windows, self.num_heads, tokens, tokens)
            attn = attn + mask[None, :, None].to(attn.dtype)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = attn.softmax(dim=-1)

        x = (attn @ v).transpose(1, 2).reshape(windows, tokens, channels)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    """Pre-norm Swin block: x + DropPath(WindowAttention(LN(x))), then x + DropPath(MLP(LN(x))).

    A map that the window does not divide is zero-padded at the bottom and right after norm1
    (padded keys are not masked) and cropped after attention. A shifted block rolls by
    -shift_size before attention and back after, at every map size including the 7x7 one.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift_size: int,
        mlp_ratio: float,
        drop_path: float,
    ):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size={shift_size} must be in [0, window_size={window_size}).")
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = layer_norm(dim)
        self.attn = WindowAttention(dim, window_size, num_heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] -> [B, H, W, C]."""
        _, height, width, _ = x.shape
        ws, shift = self.window_size, self.shift_size

        shortcut = x
        x = self.norm1(x)
        pad_bottom, pad_right = (-height) % ws, (-width) % ws
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = x.shape[1], x.shape[2]

        mask = None
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = shifted_window_mask(padded_height, padded_width, ws, shift, x.device)

        windows = self.attn(window_partition(x, ws), mask)
        x = window_reverse(windows, ws, padded_height, padded_width)

        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = x[:, :height, :width, :]

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding: Conv2d(k=s=patch_size) then LayerNorm, NCHW -> NHWC."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = layer_norm(embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: [B, C, H, W] float -> tokens [B, H / p, W / p, embed_dim]."""
        _, _, height, width = images.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image size {height}x{width} is not a multiple of patch_size={self.patch_size}."
            )
        return self.norm(self.proj(images).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """Halve the map and double the width: 2x2 neighbours concatenated, LayerNorm(4C), Linear.

    The concatenation order is (even row, even col), (odd row, even col), (even row, odd col),
    (odd row, odd col).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = layer_norm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, C] with even H and W -> [B, H / 2, W / 2, 2C]."""
        _, height, width, _ = x.shape
        if height % 2 or width % 2:
            raise ValueError(
                f"PatchMerging needs an even token map, got {height}x{width}; use an image side "
                "that is a multiple of patch_size * 2**(number of stages - 1)."
            )
        x = torch.cat(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1
        )
        return self.reduction(self.norm(x))


class PatchExpanding(nn.Module):
    """Enlarge the map `scale` times: Linear dim -> scale**2 * out_dim, to space, LayerNorm.

    The Linear output is read as (p1, p2, c) with the row offset p1 slowest. The decoder's 2x
    step uses out_dim = dim / 2; the U-Net's final 4x step uses out_dim = dim.
    """

    def __init__(self, dim: int, scale: int, out_dim: int):
        super().__init__()
        self.scale = scale
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, scale * scale * out_dim, bias=False)
        self.norm = layer_norm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, W, dim] -> [B, scale * H, scale * W, out_dim]."""
        batch, height, width, _ = x.shape
        s = self.scale
        x = self.expand(x).view(batch, height, width, s, s, self.out_dim)
        x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height * s, width * s, self.out_dim)
        return self.norm(x)


class BasicLayer(nn.Module):
    """Encoder stage: Swin blocks (shift on odd blocks), then PatchMerging unless it is the last."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        downsample: bool,
    ):
        super().__init__()
        self.blocks = swin_blocks(dim, depth, num_heads, window_size, mlp_ratio, drop_path)
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class BasicLayerUp(nn.Module):
    """Decoder stage: Swin blocks, then a 2x PatchExpanding (`upsample`) unless it is the last."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        drop_path: list[float],
        upsample: bool,
    ):
        super().__init__()
        self.blocks = swin_blocks(dim, depth, num_heads, window_size, mlp_ratio, drop_path)
        self.upsample = PatchExpanding(dim, scale=2, out_dim=dim // 2) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


def swin_blocks(
    dim: int,
    depth: int,
    num_heads: int,
    window_size: int,
    mlp_ratio: float,
    drop_path: list[float],
) -> nn.ModuleList:
    """Return `depth` Swin blocks; odd blocks shift by window_size // 2."""
    return nn.ModuleList(
        SwinTransformerBlock(
            dim,
            num_heads,
            window_size,
            shift_size=window_size // 2 if j % 2 == 1 else 0,
            mlp_ratio=mlp_ratio,
            drop_path=drop_path[j],
        )
        for j in range(depth)
    )


def stage_drop_path_rates(depths: tuple[int, ...], drop_path_rate: float) -> list[list[float]]:
    """Split a linear 0 .. drop_path_rate ramp over all encoder blocks into one list per stage."""
    total = sum(depths)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    starts = [sum(depths[:s]) for s in range(len(depths))]
    return [rates[start : start + depth] for start, depth in zip(starts, depths, strict=True)]


def encoder_layers(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window_size: int,
    mlp_ratio: float,
    drop_path_rate: float,
) -> nn.ModuleList:
    """Return the encoder stages `layers.{s}`; stage s has width embed_dim * 2**s."""
    if len(depths) != len(num_heads):
        raise ValueError(f"depths {depths} and num_heads {num_heads} differ in length.")
    rates = stage_drop_path_rates(depths, drop_path_rate)
    last = len(depths) - 1
    return nn.ModuleList(
        BasicLayer(
            embed_dim * 2**s,
            depths[s],
            num_heads[s],
            window_size,
            mlp_ratio,
            rates[s],
            downsample=s < last,
        )
        for s in range(len(depths))
    )


def decoder_layers(
    embed_dim: int,
    depths: tuple[int, ...],
    num_heads: tuple[int, ...],
    window_size: int,
    mlp_ratio: float,
    drop_path_rate: float,
) -> nn.ModuleList:
    """Return the decoder stages `layers_up.{u}`, mirroring encoder stages last-1 .. 0.

    Decoder stage u reuses the depth, heads and drop-path rates of encoder stage
    len(depths) - 2 - u, and all but the last end with a 2x PatchExpanding.
    """
    rates = stage_drop_path_rates(depths, drop_path_rate)
    num_up = len(depths) - 1
    stages = []
    for u in range(num_up):
        s = num_up - 1 - u
        stages.append(
            BasicLayerUp(
                embed_dim * 2**s,
                depths[s],
                num_heads[s],
                window_size,
                mlp_ratio,
                rates[s],
                upsample=u < num_up - 1,
            )
        )
    return nn.ModuleList(stages)


def init_weights(module: nn.Module) -> None:
    """Initialise Linear weights truncated-normal(0.02) with zero bias and LayerNorm to identity."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
