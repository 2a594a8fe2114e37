"""Tests of the Swin building blocks against direct NumPy references of their definitions."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vismae_jax.models import swin

erf = np.vectorize(math.erf)


def random_params(module: nn.Module, *inputs, seed: int = 0) -> dict:
    """Return float32 parameters for `module` drawn with NumPy, far from the initialisation.

    LayerNorm scales are 1 + N(0, 0.1^2), relative position bias tables N(0, 0.5^2) and all
    other parameters N(0, 0.1^2), so that norms, biases and position biases all matter. Only
    shapes come from `module.init` (through `jax.eval_shape`, so nothing is compiled).
    """
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "relative_position_bias_table" in name:
            return 0.5 * rng.standard_normal(shape.shape, np.float32)
        value = 0.1 * rng.standard_normal(shape.shape, np.float32)
        return value + 1.0 if name.endswith("['scale']") else value

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_input(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def to_numpy(params: dict) -> dict:
    return jax.tree.map(lambda x: np.asarray(x, np.float64), params)


def layer_norm_ref(x: np.ndarray, params: dict, eps: float = 1e-6) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + eps) * params["scale"] + params["bias"]


def dense_ref(x: np.ndarray, params: dict) -> np.ndarray:
    y = x @ params["kernel"]
    return y + params["bias"] if "bias" in params else y


def gelu_erf_ref(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh_ref(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def region_ref(position: int, size: int, window: int, shift: int) -> int:
    """Region of a coordinate of the rolled map: the last `shift` rows came from the top."""
    if shift == 0 or position < size - window:
        return 0
    return 1 if position < size - shift else 2


def window_attention_ref(
    tokens: np.ndarray, params: dict, num_heads: int, window: int, shift: int
) -> np.ndarray:
    """Shifted-window attention of one sample, token by token, without partition or roll.

    tokens: [H, W, C] after norm1. The map is zero-padded to multiples of `window`. Token (a, b)
    of the padded map sits at ((a - shift) mod Hp, (b - shift) mod Wp) after the cyclic shift.
    It attends to every token whose shifted position lies in the same window. The bias comes
    from the offset of the two shifted positions, and tokens of different regions get -100.
    """
    height, width, channels = tokens.shape
    padded_height = math.ceil(height / window) * window
    padded_width = math.ceil(width / window) * window
    padded = np.zeros((padded_height, padded_width, channels))
    padded[:height, :width] = tokens

    head_dim = channels // num_heads
    qkv = dense_ref(padded, params["qkv"]).reshape(padded_height, padded_width, 3, num_heads, -1)
    table = params["relative_position_bias_table"]
    rows = (np.arange(padded_height) - shift) % padded_height
    cols = (np.arange(padded_width) - shift) % padded_width

    out = np.zeros((height, width, channels))
    for i in range(height):
        for j in range(width):
            row, col = rows[i], cols[j]
            keys = [
                (a, b)
                for a in range(padded_height)
                for b in range(padded_width)
                if rows[a] // window == row // window and cols[b] // window == col // window
            ]
            query_region = (
                region_ref(row, padded_height, window, shift),
                region_ref(col, padded_width, window, shift),
            )

            heads = []
            for h in range(num_heads):
                query = qkv[i, j, 0, h] * head_dim**-0.5
                logits = []
                for a, b in keys:
                    bias_row = (row - rows[a] + window - 1) * (2 * window - 1)
                    bias_row += col - cols[b] + window - 1
                    key_region = (
                        region_ref(rows[a], padded_height, window, shift),
                        region_ref(cols[b], padded_width, window, shift),
                    )
                    mask = 0.0 if key_region == query_region else -100.0
                    logits.append(query @ qkv[a, b, 1, h] + table[bias_row, h] + mask)
                weights = np.exp(np.array(logits) - max(logits))
                weights /= weights.sum()
                heads.append(
                    sum(w * qkv[a, b, 2, h] for w, (a, b) in zip(weights, keys, strict=True))
                )
            out[i, j] = dense_ref(np.concatenate(heads), params["proj"])
    return out


def swin_block_ref(x: np.ndarray, params: dict, num_heads: int, window: int, shift: int):
    """Swin block of a batch [B, H, W, C] in float64."""
    outputs = []
    for sample in x:
        normed = layer_norm_ref(sample, params["norm1"])
        sample = sample + window_attention_ref(normed, params["attn"], num_heads, window, shift)
        hidden = gelu_erf_ref(
            dense_ref(layer_norm_ref(sample, params["norm2"]), params["mlp"]["fc1"])
        )
        outputs.append(sample + dense_ref(hidden, params["mlp"]["fc2"]))
    return np.stack(outputs)


@pytest.mark.parametrize(
    ("height", "width", "shift"),
    [
        (7, 7, 3),  # the 7x7 bottleneck at 224: one window, shift kept
        (10, 10, 3),  # the bottleneck at 320: padded to 14x14
        (10, 10, 0),
        (14, 14, 3),  # several windows, no padding
        (9, 12, 3),  # non-square, padded to 14x14
    ],
)
def test_swin_block_matches_numpy(height, width, shift):
    x = random_input(height * width + shift, (2, height, width, 16))
    block = swin.SwinBlock(num_heads=2, window_size=7, shift_size=shift)
    params = random_params(block, x)

    actual = np.asarray(jax.jit(block.apply)({"params": params}, x))
    expected = swin_block_ref(np.asarray(x, np.float64), to_numpy(params), 2, 7, shift)

    assert np.max(np.abs(actual - expected)) < 1e-5


def test_swin_stage_shifts_second_block_at_bottleneck():
    x = random_input(1, (1, 7, 7, 16))
    stage = swin.SwinStage(depth=2, num_heads=2, window_size=7)
    params = random_params(stage, x)

    actual = np.asarray(jax.jit(stage.apply)({"params": params}, x))
    numpy_params = to_numpy(params)
    expected = swin_block_ref(np.asarray(x, np.float64), numpy_params["blocks_0"], 2, 7, 0)
    expected = swin_block_ref(expected, numpy_params["blocks_1"], 2, 7, 3)

    assert np.max(np.abs(actual - expected)) < 1e-5


def test_window_partition_reverse_non_square():
    x = jnp.arange(2 * 14 * 21 * 3, dtype=jnp.float32).reshape(2, 14, 21, 3)
    windows = swin.window_partition(x, 7)

    assert windows.shape == (2, 6, 49, 3)
    # Window 4 is window row 1, window column 1; its token 10 is row 1, column 3 of the window.
    np.testing.assert_array_equal(windows[:, 4, 10], x[:, 7 + 1, 7 + 3])
    np.testing.assert_array_equal(swin.window_reverse(windows, 7, 14, 21), x)


def test_relative_position_index_formula():
    index = swin.relative_position_index(7)

    assert index.shape == (49, 49)
    assert index[0, 0] == 6 * 13 + 6
    assert index[0, 48] == 0  # query (0, 0), key (6, 6): offset (-6, -6)
    assert index[48, 0] == 168  # offset (+6, +6)
    assert index[1, 7] == (-1 + 6) * 13 + (1 + 6)  # query (0, 1), key (1, 0)


def test_shifted_window_mask_single_window():
    mask = swin.shifted_window_mask(7, 7, 7, 3)
    region = np.zeros((7, 7), int)
    region[4:, :] += 3
    region[:, 4:] += 1
    region = region.reshape(-1)
    expected = np.where(region[:, None] == region[None, :], 0.0, -100.0)

    assert mask.shape == (1, 49, 49)
    np.testing.assert_array_equal(mask[0], expected)


def test_mlp_uses_erf_gelu():
    x = 2.0 * random_input(0, (64, 8))
    mlp = swin.Mlp(hidden_dim=32)
    params = random_params(mlp, x)
    numpy_params = to_numpy(params)

    actual = np.asarray(jax.jit(mlp.apply)({"params": params}, x))
    hidden = dense_ref(np.asarray(x, np.float64), numpy_params["fc1"])
    with_erf = dense_ref(gelu_erf_ref(hidden), numpy_params["fc2"])
    with_tanh = dense_ref(gelu_tanh_ref(hidden), numpy_params["fc2"])

    assert np.max(np.abs(actual - with_erf)) < 1e-5
    assert np.max(np.abs(with_tanh - with_erf)) > 1e-4  # so the first check can tell them apart


def test_layer_norm_epsilon():
    # Features with standard deviation 1e-3 (variance 1e-6): the epsilon moves the output.
    x = 1e-3 * random_input(0, (32, 16))
    norm = swin.layer_norm(jnp.float32, jnp.float32)
    unit = {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}
    x64 = np.asarray(x, np.float64)

    actual = np.asarray(jax.jit(norm.apply)({"params": unit}, x))

    assert np.max(np.abs(actual - layer_norm_ref(x64, unit, eps=1e-6))) < 1e-4
    assert np.max(np.abs(layer_norm_ref(x64, unit, eps=1e-5) - layer_norm_ref(x64, unit))) > 0.1


def test_patch_merging_matches_numpy():
    x = random_input(0, (2, 6, 4, 8))
    merging = swin.PatchMerging()
    params = random_params(merging, x)
    numpy_params = to_numpy(params)
    x64 = np.asarray(x, np.float64)

    actual = np.asarray(jax.jit(merging.apply)({"params": params}, x))
    quads = [x64[:, 0::2, 0::2], x64[:, 1::2, 0::2], x64[:, 0::2, 1::2], x64[:, 1::2, 1::2]]
    merged = layer_norm_ref(np.concatenate(quads, axis=-1), numpy_params["norm"])
    expected = dense_ref(merged, numpy_params["reduction"])

    assert actual.shape == (2, 3, 2, 16)
    assert np.max(np.abs(actual - expected)) < 1e-5


@pytest.mark.parametrize(("features", "scale"), [(8, 2), (16, 4)])
def test_patch_expanding_matches_numpy(features, scale):
    x = random_input(0, (2, 3, 2, 16))
    expanding = swin.PatchExpanding(features, scale)
    params = random_params(expanding, x)
    numpy_params = to_numpy(params)

    actual = np.asarray(jax.jit(expanding.apply)({"params": params}, x))
    expanded = dense_ref(np.asarray(x, np.float64), numpy_params["expand"])
    spatial = np.zeros((2, 3 * scale, 2 * scale, features))
    for row_offset in range(scale):
        for col_offset in range(scale):
            group = (row_offset * scale + col_offset) * features
            spatial[:, row_offset::scale, col_offset::scale] = expanded[
                ..., group : group + features
            ]
    expected = layer_norm_ref(spatial, numpy_params["norm"])

    assert np.max(np.abs(actual - expected)) < 1e-5


def test_drop_path_zeroes_or_scales_samples():
    x = jnp.ones((4096, 3, 2))
    out = np.asarray(swin.drop_path(x, 0.25, jax.random.key(0)))
    kept_samples = out[:, 0, 0] != 0

    assert np.all(out[kept_samples] == pytest.approx(1 / 0.75))
    assert np.all(out[~kept_samples] == 0)
    assert abs(kept_samples.mean() - 0.75) < 0.03


def test_swin_block_drop_path_uses_rng_stream():
    x = random_input(0, (8, 7, 7, 16))
    block = swin.SwinBlock(num_heads=2, window_size=7, shift_size=3, drop_path_rate=0.5)
    params = {"params": random_params(block, x)}
    apply = jax.jit(block.apply, static_argnums=2)

    first = apply(params, x, False, rngs={"drop_path": jax.random.key(2)})
    second = apply(params, x, False, rngs={"drop_path": jax.random.key(3)})

    assert not np.allclose(first, second)


def test_swin_stage_remat_same_output_and_grads():
    x = random_input(0, (2, 7, 7, 16))
    plain = swin.SwinStage(depth=2, num_heads=2, window_size=7, drop_path_rates=(0.3, 0.3))
    rematted = plain.clone(remat=True)
    params = {"params": random_params(plain, x)}
    rngs = {"drop_path": jax.random.key(4)}

    @jax.jit
    def losses_and_grads(params):
        def loss(module, params):
            return jnp.sum(module.apply(params, x, False, rngs=rngs) ** 2)

        plain_result = jax.value_and_grad(lambda p: loss(plain, p))(params)
        remat_result = jax.value_and_grad(lambda p: loss(rematted, p))(params)
        return plain_result, remat_result

    (plain_loss, plain_grads), (remat_loss, remat_grads) = losses_and_grads(params)

    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    for plain_grad, remat_grad in zip(
        jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads), strict=True
    ):
        np.testing.assert_allclose(remat_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_gelu_gradient_matches_autodiff():
    x = jnp.linspace(-6.0, 6.0, 4001, dtype=jnp.float32)
    weights = random_input(1, x.shape)

    def loss(fn, values):
        return jnp.sum(fn(values) * weights)

    expected = jax.grad(lambda v: loss(lambda u: jax.nn.gelu(u, approximate=False), v))(x)
    actual = jax.grad(lambda v: loss(swin.gelu, v))(x)

    assert np.max(np.abs(np.asarray(swin.gelu(x)) - gelu_erf_ref(np.asarray(x)))) < 1e-6
    assert np.max(np.abs(np.asarray(actual) - np.asarray(expected))) < 1e-5
