"""Analytic FLOP counts of the Swin MAE and a Swin classifier, and device peaks for MFU.

Counts are 2 FLOPs per multiply-accumulate over every matrix product of the forward pass:
patch embedding, qkv, window-attention QK^T and AV, attention output projection, MLP, patch
merging and expanding, and the prediction head. Elementwise work (LayerNorm, softmax, GELU,
residual adds, relative position bias) is left out, as is usual for MFU. Two choices follow
what the compiled program really computes: tokens padded up to a whole number of windows are
counted in qkv, attention and the projection, and masked tokens are counted everywhere because
the MAE keeps the full token grid. A training step costs 3 forward passes (forward, and the
backward pass's two products per forward product).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

FLOPS_PER_MAC = 2
TRAIN_FLOPS_PER_FORWARD_FLOP = 3

# Dense (no structured sparsity) bfloat16 matrix peaks in FLOP/s, keyed by a substring of
# `jax.Device.device_kind`. Checked in order, so specific variants come before their family.
# Variants whose peak differs from the SXM part (H100/H200 NVL) map to None: no MFU, no guess.
_PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 NVL", None),
    ("H200 NVL", None),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # "NVIDIA H100 80GB HBM3" (SXM5).
    ("H200", 989e12),  # "NVIDIA H200"; also matches "NVIDIA GH200 ...", the same Hopper peak.
    ("A100", 312e12),  # "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe".
)


@dataclasses.dataclass(frozen=True)
class _Arch:
    """The numbers of a Swin MAE or classifier that decide its matmul sizes."""

    image_size: int
    patch_size: int
    channels: int
    embed_dim: int
    depths: tuple[int, ...]
    window_size: int
    mlp_ratio: float

    @property
    def grid(self) -> int:
        """Token grid side after patch embedding."""
        return self.image_size // self.patch_size

    def stage_grid(self, stage: int) -> int:
        """Token grid side of encoder stage `stage` (halved by each patch merging)."""
        return self.grid // 2**stage

    def stage_dim(self, stage: int) -> int:
        """Token width of encoder stage `stage` (doubled by each patch merging)."""
        return self.embed_dim * 2**stage


def _arch(
    image_size: int,
    patch_size: int,
    channels: int,
    embed_dim: int,
    depths: Sequence[int],
    window_size: int,
    mlp_ratio: float,
) -> _Arch:
    """Check that the stages divide the token grid and return the sizes as an `_Arch`."""
    arch = _Arch(
        int(image_size),
        int(patch_size),
        int(channels),
        int(embed_dim),
        tuple(int(d) for d in depths),
        int(window_size),
        float(mlp_ratio),
    )
    merges = len(arch.depths) - 1
    if arch.image_size % arch.patch_size or arch.grid % 2**merges:
        raise ValueError(
            f"Invalid image_size={arch.image_size} for patch_size={arch.patch_size}: the "
            f"{arch.grid}x{arch.grid} token grid cannot be halved exactly by {merges} patch "
            f"mergings. Use an image_size divisible by {arch.patch_size * 2**merges}."
        )
    return arch


def _from_config(model_config: Any) -> _Arch:
    """Read the architecture from `config.model` or any object with the same attribute names."""
    return _arch(
        model_config.image_size,
        model_config.patch_size,
        model_config.channels,
        model_config.embed_dim,
        model_config.depths,
        model_config.window_size,
        model_config.mlp_ratio,
    )


def _swin_block_macs(grid: int, dim: int, window_size: int, mlp_ratio: float) -> dict[str, int]:
    """Count the multiply-accumulates of one Swin block on a `grid` x `grid` x `dim` token map."""
    tokens = grid * grid
    padded_grid = math.ceil(grid / window_size) * window_size
    padded_tokens = padded_grid * padded_grid
    window_tokens = window_size * window_size
    hidden = int(dim * mlp_ratio)
    return {
        "qkv": padded_tokens * dim * 3 * dim,
        "attention": 2 * padded_tokens * window_tokens * dim,  # QK^T and AV, all heads together.
        "proj": padded_tokens * dim * dim,
        "mlp": 2 * tokens * dim * hidden,
    }


def _add(total: dict[str, int], part: dict[str, int], times: int = 1) -> None:
    """Add `times` x `part` to `total`, key by key."""
    for key, value in part.items():
        total[key] = total.get(key, 0) + times * value


def _encoder_macs(arch: _Arch) -> dict[str, int]:
    """Count the multiply-accumulates of patch embedding, encoder stages and patch mergings."""
    macs = {"patch_embed": arch.grid**2 * arch.patch_size**2 * arch.channels * arch.embed_dim}
    last = len(arch.depths) - 1
    for stage, depth in enumerate(arch.depths):
        grid, dim = arch.stage_grid(stage), arch.stage_dim(stage)
        _add(macs, _swin_block_macs(grid, dim, arch.window_size, arch.mlp_ratio), times=depth)
        if stage < last:
            # Concatenated 2x2 neighbours (4*dim) go through Linear 4*dim -> 2*dim.
            _add(macs, {"merging": (grid // 2) ** 2 * 4 * dim * 2 * dim})
    return macs


def _mae_decoder_macs(arch: _Arch) -> dict[str, int]:
    """Count the multiply-accumulates of the MAE decoder: expansions, blocks and `decoder_pred`."""
    macs: dict[str, int] = {}
    last = len(arch.depths) - 1
    bottleneck_grid, bottleneck_dim = arch.stage_grid(last), arch.stage_dim(last)
    _add(macs, {"expanding": bottleneck_grid**2 * bottleneck_dim * 2 * bottleneck_dim})

    # Decoder stage k runs at encoder stage (last - 1 - k)'s size with that stage's depth.
    for stage in reversed(range(last)):
        grid, dim = arch.stage_grid(stage), arch.stage_dim(stage)
        _add(
            macs,
            _swin_block_macs(grid, dim, arch.window_size, arch.mlp_ratio),
            times=arch.depths[stage],
        )
        if stage > 0:
            _add(macs, {"expanding": grid**2 * dim * 2 * dim})

    _add(macs, {"head": arch.grid**2 * arch.embed_dim * arch.patch_size**2 * arch.channels})
    return macs


def mae_forward_flops_breakdown(model_config: Any) -> dict[str, int]:
    """Count the FLOPs per image of one Swin MAE forward pass, split by kind of matmul.

    Args:
      model_config: `config.model` (image_size, patch_size, channels, embed_dim, depths,
        window_size, mlp_ratio); `num_heads` does not change the count.

    Returns:
      {"patch_embed", "qkv", "attention", "proj", "mlp", "merging", "expanding", "head"}: int
      FLOPs (2 per multiply-accumulate); their sum is `mae_forward_flops(model_config)`.
    """
    arch = _from_config(model_config)
    macs = _encoder_macs(arch)
    _add(macs, _mae_decoder_macs(arch))
    return {key: FLOPS_PER_MAC * value for key, value in macs.items()}


def mae_forward_flops(model_config: Any) -> int:
    """Count the FLOPs per image of one Swin MAE forward pass (2 per multiply-accumulate).

    The default configuration (224, patch 4, embed 96, depths (2, 2, 2, 2), 3 channels) is
    5.45 GMAC, 10.9 GFLOP; with 1 channel 5.43 GMAC.
    """
    return sum(mae_forward_flops_breakdown(model_config).values())


def train_flops_per_image(model_config: Any) -> int:
    """Count the FLOPs per image of one training step: forward plus backward, 3 x the forward."""
    return TRAIN_FLOPS_PER_FORWARD_FLOP * mae_forward_flops(model_config)


def swin_classifier_forward_flops(
    image_size: int = 224,
    patch_size: int = 4,
    channels: int = 3,
    embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 6, 2),
    window_size: int = 7,
    mlp_ratio: float = 4.0,
    num_classes: int = 1000,
) -> int:
    """Count the FLOPs per image of a Swin encoder with average pooling and a linear head.

    The defaults are Swin-T for ImageNet-1k: 4.49 GMAC, listed as 4.5G FLOPs in the Swin
    model tables, which count multiply-accumulates.
    """
    arch = _arch(image_size, patch_size, channels, embed_dim, depths, window_size, mlp_ratio)
    macs = sum(_encoder_macs(arch).values()) + arch.stage_dim(len(arch.depths) - 1) * num_classes
    return FLOPS_PER_MAC * macs


def peak_flops_per_device(device_kind: str) -> float | None:
    """Return the dense bfloat16 peak FLOP/s of a `jax.Device.device_kind`, or None if unknown.

    None for devices without a known peak (CPUs, unlisted GPUs): callers then log no MFU.
    Float32 runs are measured against the same bfloat16 peak, so their MFU reads low.
    """
    for pattern, peak in _PEAK_BF16_FLOPS:
        if pattern.lower() in device_kind.lower():
            return peak
    return None


def model_flops_utilization(
    flops_per_step: float, step_seconds: float, num_devices: int, device_kind: str
) -> float | None:
    """Return MFU = analytic step FLOPs / (step time x devices x peak FLOP/s), or None.

    Args:
      flops_per_step: analytic FLOPs of the whole step over all devices, e.g.
        `train_flops_per_image(config.model) * global_batch_size`.
      step_seconds: wall time of one step.
      num_devices: devices that ran the step.
      device_kind: `jax.devices()[0].device_kind`.
    """
    peak = peak_flops_per_device(device_kind)
    if peak is None or step_seconds <= 0:
        return None
    return flops_per_step / (step_seconds * num_devices * peak)


def _dot_general_macs(equation: Any) -> int:
    """Count the multiply-accumulates of one `dot_general` equation."""
    lhs, rhs = (var.aval.shape for var in equation.invars[:2])
    (_, rhs_contract), (_, rhs_batch) = equation.params["dimension_numbers"]
    rhs_free = [size for dim, size in enumerate(rhs) if dim not in (*rhs_contract, *rhs_batch)]
    return math.prod(lhs) * math.prod(rhs_free)


def _conv_macs(equation: Any) -> int:
    """Count the multiply-accumulates of one `conv_general_dilated` equation."""
    out = equation.outvars[0].aval.shape
    kernel = equation.invars[1].aval.shape
    out_features = kernel[equation.params["dimension_numbers"].rhs_spec[0]]
    return math.prod(out) * math.prod(kernel) // out_features


def _sub_jaxprs(value: Any) -> list[Any]:
    """Return the jaxprs inside one equation parameter (a jaxpr, closed jaxpr, or tuple of them)."""
    values = value if isinstance(value, tuple | list) else (value,)
    found = []
    for item in values:
        inner = getattr(item, "jaxpr", item)
        if hasattr(inner, "eqns"):
            found.append(inner)
    return found


def _jaxpr_macs(jaxpr: Any) -> int:
    """Count the multiply-accumulates of every matrix product in `jaxpr`, nested calls included."""
    total = 0
    for equation in jaxpr.eqns:
        name = equation.primitive.name
        if name == "dot_general":
            total += _dot_general_macs(equation)
        elif name == "conv_general_dilated":
            total += _conv_macs(equation)
        repeats = equation.params.get("length", 1) if name == "scan" else 1
        for value in equation.params.values():
            for inner in _sub_jaxprs(value):
                total += repeats * _jaxpr_macs(inner)
    return total


def traced_matmul_flops(function: Any, *args: Any) -> int:
    """Count the matmul FLOPs (2 per multiply-accumulate) that `function(*args)` traces to.

    Counts `dot_general` and `conv_general_dilated` in the jaxpr, including nested jitted,
    rematerialised and custom-derivative calls and scan bodies (times their length), so it checks
    the analytic counts against what a model really computes. Arguments may be arrays or
    `jax.ShapeDtypeStruct`s; nothing is compiled or run.

    NOTE: every branch of a `cond` is counted and a `while` body once, so programs with data-
    dependent control flow get an upper or lower bound; the Swin MAE has none.
    """
    import jax  # Imported here so that the analytic counts above need no JAX.

    closed = jax.make_jaxpr(function)(*args)
    return FLOPS_PER_MAC * _jaxpr_macs(closed.jaxpr)
