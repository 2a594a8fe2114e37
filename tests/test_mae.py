"""Tests of the Swin MAE: parity with the public PyTorch code, loss, shapes and training hygiene."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
