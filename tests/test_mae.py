"""Tests of the Swin MAE: parity with the public PyTorch code, loss, shapes and training hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from vismae_jax import masking
from vismae_jax.models import mae

GOLDEN_MODEL = mae.SwinMAE(
    image_size=224,
    patch_size=4,
    channels=3,
    embed_dim=32,
    depths=(2, 2, 2, 2),
    num_heads=(1, 2, 4, 8),
    window_size=7,
    mlp_ratio=4.0,
    drop_path_rate=0.1,
    dtype=jnp.float32,
)


def params_from_state_dict(state_dict: dict[str, np.ndarray]) -> dict:
    """Convert a public-code PyTorch SwinMAE state_dict (NumPy arrays) into Flax params.

    `layers.0.blocks.1.attn.qkv.weight` becomes params["layers_0"]["blocks_1"]["attn"]["qkv"]
    ["kernel"]; Linear weights are transposed, Conv weights go [out, in, kh, kw] -> [kh, kw, in,
    out], LayerNorm weights become `scale`. The fixed tables `pos_embed` and
    `relative_position_index` have no Flax counterpart.
    """
    params: dict = {}
    for name, value in state_dict.items():
        if name == "pos_embed" or name.endswith("relative_position_index"):
            continue

        path: list[str] = []
        for part in name.split("."):
            if part.isdigit():
                path[-1] = f"{path[-1]}_{part}"
            else:
                path.append(part)

        leaf = path.pop()
        if leaf == "weight" and value.ndim == 4:
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        elif leaf == "weight" and value.ndim == 2:
            leaf, value = "kernel", value.T
        elif leaf == "weight":
            leaf = "scale"

        node = params
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(value)
    return params


def golden_inputs(golden: dict[str, np.ndarray]) -> tuple[dict, jax.Array, jax.Array]:
    state_dict = {
        key.removeprefix("state_dict/"): value
        for key, value in golden.items()
        if key.startswith("state_dict/")
    }
    images = jnp.asarray(golden["expected/input_normalized_3ch"].transpose(0, 2, 3, 1))
    mask = jnp.asarray(golden["expected/mask"].astype(bool))
    return params_from_state_dict(state_dict), images, mask


@pytest.fixture(scope="module")
def golden_outputs(golden):
    """Latent, prediction and loss of the Flax model on the golden weights, inputs and mask."""
    params, images, mask = golden_inputs(golden)

    def forward(params, images, mask):
        def encode_decode(module, images, mask):
            latent = module.encode(images, mask)
            return latent, module.decode(latent)

        latent, pred = GOLDEN_MODEL.apply({"params": params}, images, mask, method=encode_decode)
        loss = mae.reconstruction_loss(pred, mae.patchify(images, 4), mask)
        return latent, pred, loss

    latent, pred, loss = jax.jit(forward)(params, images, mask)
    return {"latent": np.asarray(latent), "pred": np.asarray(pred), "loss": np.asarray(loss)}


def assert_close_to_scale(actual: np.ndarray, expected: np.ndarray, relative: float) -> None:
    """Assert max |actual - expected| <= relative * max |expected|."""
    assert actual.shape == expected.shape
    scale = float(np.max(np.abs(expected)))
    error = float(np.max(np.abs(actual - expected)))
    assert error <= relative * scale, f"max abs error {error:.3g} at scale {scale:.3g}"


def test_golden_param_tree_matches(golden):
    params, images, mask = golden_inputs(golden)
    initialised = jax.eval_shape(GOLDEN_MODEL.init, jax.random.key(0), images, mask)["params"]

    assert jax.tree.structure(params) == jax.tree.structure(initialised)
    shapes = jax.tree.map(lambda x: x.shape, params)
    assert shapes == jax.tree.map(lambda x: x.shape, initialised)


def test_golden_latent(golden, golden_outputs):
    assert_close_to_scale(golden_outputs["latent"], golden["expected/latent"], 1e-5)


def test_golden_pred(golden, golden_outputs):
    assert_close_to_scale(golden_outputs["pred"], golden["expected/pred"], 1e-5)


def test_golden_loss(golden, golden_outputs):
    np.testing.assert_allclose(golden_outputs["loss"], golden["expected/loss"], rtol=1e-5)


@pytest.mark.parametrize(("channels", "expected"), [(3, 26_635_860), (1, 26_629_684)])
def test_param_count_default(channels, expected):
    model_config = pretrain.get_config("generic").model
    model_config.channels = channels
    model = mae.SwinMAE.from_config(model_config)
    images = jax.ShapeDtypeStruct((1, 224, 224, channels), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 3136), jnp.bool_)

    shapes = jax.eval_shape(model.init, jax.random.key(0), images, mask)["params"]

    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected


def test_from_config_fields():
    model_config = pretrain.get_config("generic").model
    model = mae.SwinMAE.from_config(model_config)

    assert model.image_size == 224
    assert model.channels == 1
    assert model.depths == (2, 2, 2, 2)
    assert model.num_heads == (3, 6, 12, 24)
    assert model.dtype == jnp.bfloat16
    assert model.param_dtype == jnp.float32


@pytest.mark.parametrize("image_size", [240, 200, 0])
def test_invalid_image_size(image_size):
    model = mae.SwinMAE(image_size=image_size, embed_dim=8, num_heads=(1, 1, 1, 1))
    images = jax.ShapeDtypeStruct((1, 224, 224, 1), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 3136), jnp.bool_)

    with pytest.raises(ValueError, match=rf"image_size={image_size}\b.*multiple of .* = 32"):
        jax.eval_shape(model.init, jax.random.key(0), images, mask)


def test_images_shape_mismatch():
    model = mae.SwinMAE(image_size=64, embed_dim=8, num_heads=(1, 1, 1, 1))
    images = jax.ShapeDtypeStruct((1, 224, 224, 1), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, 3136), jnp.bool_)

    with pytest.raises(ValueError, match=r"Expected images \[B, 64, 64, 1\].*\(1, 224, 224, 1\)"):
        jax.eval_shape(model.init, jax.random.key(0), images, mask)


def test_patchify_order():
    # Pixel value encodes (row, column, channel) as 10000 * row + 100 * column + channel.
    rows, cols, channels = np.meshgrid(np.arange(8), np.arange(12), np.arange(3), indexing="ij")
    images = (10000 * rows + 100 * cols + channels)[None].astype(np.float32)

    patches = np.asarray(mae.patchify(jnp.asarray(images), 4))

    assert patches.shape == (1, 6, 48)
    # Token 4 is patch row 1, patch column 1; vector index 21 is (row 1, column 3, channel 0).
    assert patches[0, 4, 21] == 10000 * (4 + 1) + 100 * (4 + 3) + 0
    np.testing.assert_array_equal(patches[0, 0, :3], [0, 1, 2])


def test_unpatchify_inverts_patchify():
    images = np.random.default_rng(0).standard_normal((2, 16, 16, 3), np.float32)
    patches = mae.patchify(jnp.asarray(images), 4)

    np.testing.assert_array_equal(mae.unpatchify(patches, 4, 3), images)


def loss_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    target = rng.standard_normal((2, 16, 12), np.float32)
    mask = np.zeros((2, 16), bool)
    mask[0, :4] = True
    mask[1, 3:15] = True
    return target, mask


def test_loss_zero_when_masked_exact():
    target, mask = loss_inputs()
    pred = np.where(mask[..., None], target, 100.0)

    assert mae.reconstruction_loss(pred, target, mask) == 0.0


def test_loss_constant_error():
    target, mask = loss_inputs()

    loss = mae.reconstruction_loss(target + 0.5, target, mask)

    np.testing.assert_allclose(loss, 0.25, rtol=1e-6)


def test_loss_averages_over_batch_tokens():
    # 4 masked tokens with squared error 1 and 12 with squared error 9: (4 + 108) / 16 = 7.
    target, mask = loss_inputs()
    error = np.where(np.arange(2)[:, None, None] == 0, 1.0, 3.0).astype(np.float32)

    loss = mae.reconstruction_loss(target + error, target, mask)

    np.testing.assert_allclose(loss, 7.0, rtol=1e-6)


def test_loss_norm_pix():
    target, mask = loss_inputs()
    mean = target.mean(axis=-1, keepdims=True)
    std = np.sqrt(target.var(axis=-1, keepdims=True, ddof=1) + 1e-6)
    scaled_target = 3.0 * target + 5.0

    exact = mae.reconstruction_loss((target - mean) / std, scaled_target, mask, norm_pix_loss=True)
    off_by_one = mae.reconstruction_loss((target - mean) / std + 1.0, target, mask, True)

    assert float(exact) < 1e-5
    np.testing.assert_allclose(off_by_one, 1.0, rtol=1e-5)


def test_loss_no_masked_tokens():
    target, mask = loss_inputs()

    assert mae.reconstruction_loss(target + 1.0, target, np.zeros_like(mask)) == 0.0


def tiny_model(**overrides) -> mae.SwinMAE:
    """The `test` config's model (64 px, width 16) with drop-path on and float32 compute."""
    model_config = pretrain.get_config("test").model
    model_config.update({"drop_path_rate": 0.1, "dtype": "float32", **overrides})
    return mae.SwinMAE.from_config(model_config)


def tiny_images(batch_size: int = 2) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch_size, 64, 64, 1), np.float32)


@pytest.fixture(scope="module")
def tiny_params():
    """Random float32 parameters for `tiny_model()`: LayerNorm scales 1 + N(0, 0.1^2), others
    N(0, 0.05^2). Drawn with NumPy on the `jax.eval_shape` of init, which compiles nothing."""
    mask = np.zeros((2, 256), bool)
    shapes = jax.eval_shape(tiny_model().init, jax.random.key(0), tiny_images(), mask)["params"]
    rng = np.random.default_rng(0)

    def draw(path, shape):
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return 1.0 + 0.1 * rng.standard_normal(shape.shape, np.float32)
        return 0.05 * rng.standard_normal(shape.shape, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def train_step():
    """A jitted train-style step (mask, forward with drop-path, loss, grads) and its trace log."""
    model = tiny_model()
    traces = []

    @jax.jit
    def step(params, images, key):
        traces.append(images.shape)
        mask_key, drop_path_key = jax.random.split(key)
        mask = masking.window_mask(mask_key, images.shape[0], model.image_size)

        def loss_fn(params):
            pred = model.apply(
                {"params": params},
                images,
                mask,
                deterministic=False,
                rngs={"drop_path": drop_path_key},
            )
            target = mae.patchify(images, model.patch_size)
            return mae.reconstruction_loss(pred, target, mask, model.norm_pix_loss)

        return jax.value_and_grad(loss_fn)(params)

    return step, traces


def test_gradient_reaches_every_param(tiny_params, train_step):
    step, _ = train_step
    loss, grads = step(tiny_params, tiny_images(), jax.random.key(1))

    assert np.isfinite(loss)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        assert np.any(grad != 0), jax.tree_util.keystr(path)


def test_train_step_compiles_once(tiny_params, train_step):
    step, traces = train_step
    losses = []
    for seed in range(3):
        loss, _ = step(tiny_params, tiny_images(), jax.random.key(10 + seed))
        losses.append(float(loss))

    assert len(traces) == 1
    assert len(set(losses)) == 3  # new masks and drop-path draws at every step


def test_bfloat16_forward_close_to_float32(tiny_params):
    images = tiny_images()
    mask = masking.window_mask(jax.random.key(2), 2, 64)

    def forward(model):
        return np.asarray(jax.jit(model.apply)({"params": tiny_params}, images, mask))

    pred32 = forward(tiny_model())
    pred16 = forward(tiny_model(dtype="bfloat16"))

    assert pred16.dtype == np.float32
    assert np.all(np.isfinite(pred16))
    relative_error = np.linalg.norm(pred16 - pred32) / np.linalg.norm(pred32)
    assert relative_error < 0.05, relative_error


def count_primitives(jaxpr, name: str) -> int:
    """Count equations of primitive `name` in a jaxpr, including nested jaxprs (jit, remat)."""
    count = 0
    for equation in jaxpr.eqns:
        count += equation.primitive.name == name
        for value in equation.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    count += count_primitives(inner, name)
    return count


def test_forward_gathers_only_bias_tables(tiny_params):
    # Windows, shifts, padding, merging and expanding are reshapes, transposes, slices and
    # concatenations; the only gather per block reads its relative position bias table.
    model = tiny_model()
    mask = np.zeros((2, 256), bool)
    jaxpr = jax.make_jaxpr(model.apply)({"params": tiny_params}, tiny_images(), mask).jaxpr
    num_blocks = sum(model.depths) + sum(model.depths[:-1])

    assert count_primitives(jaxpr, "gather") == num_blocks
    assert count_primitives(jaxpr, "sort") == 0


@pytest.mark.parametrize("image_size", [96, 320])
def test_forward_shapes(image_size):
    # 96 and 320 leave stages that the 7x7 window does not divide, so those blocks pad.
    model = mae.SwinMAE(image_size=image_size, channels=3, embed_dim=8, num_heads=(1, 1, 2, 2))
    num_tokens = (image_size // 4) ** 2
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, num_tokens), jnp.bool_)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, mask)

    latent = jax.eval_shape(
        lambda v, x, m: model.apply(v, x, m, method=mae.SwinMAE.encode), variables, images, mask
    )
    pred = jax.eval_shape(model.apply, variables, images, mask)

    assert latent.shape == (2, image_size // 32, image_size // 32, 64)
    assert latent.dtype == jnp.bfloat16
    assert pred.shape == (2, num_tokens, 48)
    assert pred.dtype == jnp.float32
