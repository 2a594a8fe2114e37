"""Tests of the Flax <-> PyTorch SwinMAE conversion: exact round trips and numerical parity."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import safetensors.torch
import torch
from flax import traverse_util

from configs import pretrain
from vismae_jax import masking
from vismae_jax.export import convert
from vismae_jax.export import workdir as workdir_lib
from vismae_jax.models import mae
from vismae_jax.torch import models
from vismae_jax.train import checkpoint
from vismae_jax.train import state as state_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Parity tolerance: max abs difference relative to the max abs value of the JAX output.
TOLERANCE = 1e-5

# Unoptimised XLA code compiles about 4x faster on CPU (19 s -> 4 s for one case, measured on
# 2 shared CPU cores). It runs the same float32 operations, so parity at this level tests the
# conversion equally well.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def small_config(image_size: int, channels: int, embed_dim: int = 16, num_heads=(2, 2, 4, 4)):
    """Architecture of the public code (4 stages of 2 blocks, window 7) at a small width."""
    config = pretrain.get_config("test").model
    config.image_size = image_size
    config.channels = channels
    config.embed_dim = embed_dim
    config.num_heads = num_heads
    config.depths = (2, 2, 2, 2)
    config.window_size = 7
    config.dtype = "float32"
    config.param_dtype = "float32"
    return config


def golden_config():
    return small_config(224, channels=3, embed_dim=32, num_heads=(1, 2, 4, 8))


def golden_state_dict(golden) -> dict[str, torch.Tensor]:
    prefix = "state_dict/"
    return {
        k[len(prefix) :]: torch.from_numpy(v) for k, v in golden.items() if k.startswith(prefix)
    }


def abstract_params(config):
    return cached_abstract_params(config.to_json())


@functools.cache
def cached_abstract_params(config_json: str):
    config = ml_collections.ConfigDict(json.loads(config_json))
    model = mae.SwinMAE.from_config(config)
    side, channels = config.image_size, config.channels
    tokens = (side // config.patch_size) ** 2
    images = jax.ShapeDtypeStruct((1, side, side, channels), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, tokens), jnp.bool_)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, mask)
    return variables["params"]


def random_params(config, seed: int):
    """Random parameters of the Flax model's shapes, drawn with NumPy (nothing to compile).

    Kernels are N(0, 1/fan_in), LayerNorm scales 1 + N(0, 0.05^2), biases N(0, 0.05^2) and
    position-bias tables N(0, 0.5^2), so that norms, biases and tables all change the output.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in traverse_util.flatten_dict(abstract_params(config)).items():
        name, shape = path[-1], leaf.shape
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
        elif name == "scale":
            value = 1.0 + rng.normal(0.0, 0.05, shape)
        elif name == "relative_position_bias_table":
            value = rng.normal(0.0, 0.5, shape)
        else:
            value = rng.normal(0.0, 0.05, shape)
        params[path] = value.astype(leaf.dtype)
    return traverse_util.unflatten_dict(params)


@functools.cache
def jax_case(image_size: int, channels: int) -> dict:
    """Random weights, inputs and mask, and the Flax model's latent, prediction and loss."""
    config = small_config(image_size, channels)
    params = random_params(config, seed=image_size + channels)
    images = jax.random.normal(jax.random.key(7), (2, image_size, image_size, channels))
    mask = masking.window_mask(jax.random.key(8), 2, image_size)

    model = mae.SwinMAE.from_config(config)

    def forward(params, images, mask):
        def encode_decode(module, images, mask):
            latent = module.encode(images, mask)
            return module.decode(latent), latent

        pred, latent = model.apply({"params": params}, images, mask, method=encode_decode)
        target = mae.patchify(images, config.patch_size)
        return pred, latent, mae.reconstruction_loss(pred, target, mask)

    compiled = jax.jit(forward).lower(params, images, mask).compile(FAST_COMPILE)
    pred, latent, loss = compiled(params, images, mask)
    target = mae.patchify(images, config.patch_size)
    loss_norm_pix = mae.reconstruction_loss(pred, target, mask, norm_pix_loss=True)
    return dict(
        config=config,
        params=params,
        images=np.asarray(images),
        mask=np.asarray(mask),
        pred=np.asarray(pred),
        latent=np.asarray(latent),
        loss=float(loss),
        loss_norm_pix=float(loss_norm_pix),
    )


def torch_outputs(case: dict, state_dict: dict, channels: int) -> dict:
    """Run the PyTorch SwinMAE with `state_dict` on the case's images.

    Gray images are replicated when the PyTorch model takes more channels.
    """
    model = models.SwinMAE(**convert.torch_kwargs(case["config"], channels)).eval()
    model.load_state_dict(state_dict, strict=True)
    images = torch.from_numpy(np.array(case["images"])).permute(0, 3, 1, 2)
    images = images.expand(-1, channels, -1, -1) if images.shape[1] != channels else images
    mask = torch.from_numpy(np.array(case["mask"]))
    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        loss, pred, _ = model(images, mask)
        model.norm_pix_loss = True
        loss_norm_pix = model.forward_loss(images, pred, mask)
    return dict(
        pred=pred.numpy(),
        latent=latent.numpy(),
        loss=loss.item(),
        loss_norm_pix=loss_norm_pix.item(),
    )


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def assert_trees_identical(actual, expected) -> None:
    flat_actual = traverse_util.flatten_dict(actual)
    flat_expected = traverse_util.flatten_dict(expected)
    assert sorted(flat_actual) == sorted(flat_expected)
    for path, value in flat_expected.items():
        assert flat_actual[path].dtype == value.dtype, path
        np.testing.assert_array_equal(flat_actual[path], value, err_msg=str(path))


@pytest.mark.parametrize("image_size", [224, 320])
@pytest.mark.parametrize("channels", [1, 3])
def test_parity_jax_torch(image_size, channels):
    case = jax_case(image_size, channels)
    state_dict = convert.flax_to_torch(case["params"], case["config"], channels)

    out = torch_outputs(case, state_dict, channels)

    assert relative_error(out["pred"], case["pred"]) < TOLERANCE
    assert relative_error(out["latent"], case["latent"]) < TOLERANCE
    assert abs(out["loss"] - case["loss"]) < TOLERANCE * case["loss"]
    assert abs(out["loss_norm_pix"] - case["loss_norm_pix"]) < TOLERANCE * case["loss_norm_pix"]


def test_parity_gray_to_three_channels():
    case = jax_case(224, 1)
    state_dict = convert.flax_to_torch(case["params"], case["config"], channels_out=3)

    out = torch_outputs(case, state_dict, channels=3)

    assert state_dict["patch_embed.proj.weight"].shape[1] == 3
    for channel in range(3):
        assert relative_error(out["pred"][..., channel::3], case["pred"]) < TOLERANCE, channel
    assert relative_error(out["latent"], case["latent"]) < TOLERANCE
    assert abs(out["loss"] - case["loss"]) < TOLERANCE * case["loss"]


def test_parity_catches_untransposed_weight():
    case = jax_case(224, 1)
    state_dict = convert.flax_to_torch(case["params"], case["config"], channels_out=1)
    key = "layers.0.blocks.1.attn.proj.weight"
    assert state_dict[key].shape[0] == state_dict[key].shape[1]
    state_dict[key] = state_dict[key].T.contiguous()

    out = torch_outputs(case, state_dict, channels=1)

    assert relative_error(out["pred"], case["pred"]) > 100 * TOLERANCE


@pytest.mark.parametrize("channels", [1, 3])
def test_round_trip_jax_torch_jax(channels):
    config = small_config(64, channels)
    params = random_params(config, seed=3)

    state_dict = convert.flax_to_torch(params, config, channels)
    assert_trees_identical(convert.torch_to_flax(state_dict, config), params)


def test_round_trip_golden_torch_flax_torch(golden):
    state_dict = golden_state_dict(golden)

    params = convert.torch_to_flax(state_dict, golden_config())
    back = convert.flax_to_torch(params, golden_config(), channels_out=3)

    assert list(back) == list(state_dict)
    for key, value in state_dict.items():
        assert back[key].dtype == value.dtype, key
        if key == "pos_embed":
            # Recomputed in float64 rather than copied, so equal to a float32 rounding.
            torch.testing.assert_close(back[key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(back[key], value), key


def test_golden_tree_matches_flax_model(golden):
    params = convert.torch_to_flax(golden_state_dict(golden), golden_config())

    expected = abstract_params(golden_config())

    assert jax.tree.structure(params) == jax.tree.structure(expected)
    shapes = jax.tree.map(lambda a, b: a.shape == b.shape, params, expected)
    assert all(jax.tree.leaves(shapes))


def test_golden_three_to_one_channel(golden):
    # Summing the patch embedding over channels is exact for gray images replicated to 3
    # channels, and the kept channel-0 rows of decoder_pred give the channel-0 prediction.
    state_dict = convert.convert_channels(golden_state_dict(golden), channels_out=1)
    model = models.SwinMAE(in_chans=1, embed_dim=32, num_heads=(1, 2, 4, 8)).eval()
    model.load_state_dict(state_dict, strict=True)
    images = torch.from_numpy(golden["expected/input_normalized_3ch"][:, :1])
    mask = torch.from_numpy(golden["expected/mask"])

    with torch.no_grad():
        latent = model.forward_encoder(images, mask)
        _, pred, _ = model(images, mask)

    assert relative_error(latent.numpy(), golden["expected/latent"]) < TOLERANCE
    assert relative_error(pred.numpy(), golden["expected/pred"][..., 0::3]) < TOLERANCE


def test_torch_to_flax_wrong_config(golden):
    config = golden_config()
    config.num_heads = (2, 2, 4, 8)

    with pytest.raises(ValueError, match="relative_position_bias_table"):
        convert.torch_to_flax(golden_state_dict(golden), config)


def test_torch_to_flax_bad_index(golden):
    state_dict = golden_state_dict(golden)
    key = "layers.1.blocks.0.attn.relative_position_index"
    state_dict[key] = state_dict[key].T.contiguous()

    with pytest.raises(ValueError, match=key):
        convert.torch_to_flax(state_dict, golden_config())


def test_flax_to_torch_bfloat16_params():
    config = small_config(64, channels=1)
    config.param_dtype = "bfloat16"
    params = random_params(config, seed=5)

    state_dict = convert.flax_to_torch(params, config, channels_out=1)

    assert state_dict["decoder_pred.weight"].dtype == torch.float32
    assert_trees_identical(convert.torch_to_flax(state_dict, config), params)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A workdir with the trainer's config.json and Orbax checkpoints at steps 3 and 7."""
    workdir = tmp_path_factory.mktemp("run")
    config = pretrain.get_config("test")
    config.model = small_config(64, channels=1)
    # The same file as the pretraining loop writes.
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2, sort_keys=True))

    params_by_step = {3: random_params(config.model, seed=3), 7: random_params(config.model, 7)}
    manager = checkpoint.make_manager(workdir, keep=3, keep_period=0)
    for step, params in params_by_step.items():
        params = jax.tree.map(jnp.asarray, params)
        state = state_lib.TrainState(
            step=jnp.asarray(step, jnp.int32),
            params=params,
            opt_state=optax.adamw(1e-3).init(params),
        )
        meta = {"step": step, "examples_seen": 8 * step, "elapsed_seconds": 1.0}
        checkpoint.save(manager, step, state, None, meta)
    manager.wait_until_finished()
    manager.close()
    return workdir, config, params_by_step


def test_export_workdir_files(trained_workdir):
    workdir, config, params_by_step = trained_workdir

    out_dir = workdir_lib.export_workdir(workdir, channels=3)

    description = json.loads((out_dir / "config.json").read_text())
    assert description["step"] == 7
    assert description["kwargs"]["in_chans"] == 3
    state_dict = torch.load(out_dir / "vismae_mae.pth", weights_only=True)["model"]
    assert len(state_dict) == 224
    model = models.SwinMAE(**description["kwargs"])
    model.load_state_dict(state_dict, strict=True)
    expected = convert.flax_to_torch(params_by_step[7], config.model, channels_out=3)
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key
    from_safetensors = safetensors.torch.load_file(out_dir / "vismae_mae.safetensors")
    for key, value in state_dict.items():
        assert torch.equal(from_safetensors[key], value), key


def test_verify_export_rejects_transposed(trained_workdir):
    _, config, params_by_step = trained_workdir
    state_dict = convert.flax_to_torch(params_by_step[7], config.model, channels_out=3)
    key = "layers.2.blocks.0.attn.proj.weight"
    state_dict[key] = state_dict[key].T.contiguous()

    with pytest.raises(ValueError, match="disagrees"):
        workdir_lib.verify_export(params_by_step[7], config.model, state_dict, channels_out=3)


def test_export_workdir_step(trained_workdir):
    workdir, config, params_by_step = trained_workdir

    out_dir = workdir_lib.export_workdir(workdir, step=3, channels=1, verify=False)

    state_dict = torch.load(out_dir / "vismae_mae.pth", weights_only=True)["model"]
    expected = convert.flax_to_torch(params_by_step[3], config.model, channels_out=1)
    for key, value in expected.items():
        assert torch.equal(state_dict[key], value), key


def test_export_workdir_missing_step(trained_workdir):
    workdir, _, _ = trained_workdir

    with pytest.raises(FileNotFoundError, match=r"\[3, 7\]"):
        workdir_lib.export_workdir(workdir, step=5)


def test_import_torch_round_trip(trained_workdir, tmp_path):
    workdir, config, params_by_step = trained_workdir
    state_dict = convert.flax_to_torch(params_by_step[7], config.model, channels_out=1)
    torch.save({"model": state_dict}, tmp_path / "weights.pth")

    target = workdir_lib.import_torch(tmp_path / "weights.pth", tmp_path / "new_run", config.model)
    restored = checkpoint.load_params(target, workdir_lib.abstract_params(config.model))

    assert_trees_identical(jax.tree.map(np.asarray, restored), params_by_step[7])


def test_export_cli(trained_workdir, tmp_path):
    workdir, _, _ = trained_workdir
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, "-m", "vismae_jax.export", f"--workdir={workdir}", "--channels=1"]

    result = subprocess.run(
        [*command, "--noverify"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stderr[-3000:]
    description = json.loads((workdir / "export" / "config.json").read_text())
    assert description["kwargs"]["in_chans"] == 1
