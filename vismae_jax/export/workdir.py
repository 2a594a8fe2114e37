"""Export a pretraining workdir's Orbax checkpoint to PyTorch files, and import PyTorch weights.

Export writes WORKDIR/export/{vismae_mae.pth, vismae_mae.safetensors, config.json}. Import
writes an Orbax checkpoint holding only parameters, which `config.train.init_from` accepts.
"""

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import safetensors.torch
import torch
from absl import logging

from vismae_jax import masking
from vismae_jax.export import convert
from vismae_jax.models import mae
from vismae_jax.torch import models as torch_models
from vismae_jax.train import checkpoint
from vismae_jax.train import state as state_lib

EXPORT_DIR = "export"
PTH_NAME = "vismae_mae.pth"
SAFETENSORS_NAME = "vismae_mae.safetensors"
CONFIG_NAME = "config.json"
IMPORT_DIR = "from_torch"

# XLA options for the one-off export check: unoptimised code compiles several times faster on
# CPU and runs the same float32 operations.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Max abs difference between the JAX and PyTorch predictions, relative to the prediction's max
# abs value, that the export check accepts. Float32 on CPU gives about 2e-6 to 3e-6, both at
# embed_dim 16 (tests/test_export.py) and at full size.
VERIFY_TOLERANCE = 1e-4


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """Read WORKDIR/config.json, written by the pretraining loop, into a ConfigDict."""
    path = pathlib.Path(workdir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; export needs the config.json that `python -m vismae_jax.pretrain` "
            "writes into its workdir."
        )
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.model.depths = tuple(config.model.depths)
    config.model.num_heads = tuple(config.model.num_heads)
    return config


def step_dir(workdir: str | pathlib.Path, step: int | None) -> pathlib.Path:
    """Return the checkpoint directory of `step`, or of the newest step when None."""
    if step is None:
        return checkpoint.resolve_checkpoint_dir(workdir)
    path = pathlib.Path(workdir).absolute() / checkpoint.CHECKPOINT_DIR / str(step)
    if not (path / "state").is_dir():
        available = sorted(
            int(child.name)
            for child in path.parent.glob("*")
            if child.name.isdigit() and (child / "state").is_dir()
        )
        raise FileNotFoundError(
            f"No checkpoint for step {step} at {path}; steps saved: {available}."
        )
    return path


def abstract_params(model_config: ml_collections.ConfigDict) -> Any:
    """Return the Flax parameters' shapes and dtypes, placed on the first local device."""
    model = mae.SwinMAE.from_config(model_config)
    shapes = jax.eval_shape(state_lib.model_init_fn(model, model_config), jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes
    )


def verify_export(
    params: Any,
    model_config: ml_collections.ConfigDict,
    state_dict: dict[str, torch.Tensor],
    channels_out: int,
    seed: int = 0,
) -> float:
    """Compare the JAX model and the exported PyTorch model on random gray images.

    Both run in float32 on CPU with the same window mask, and each model gets the gray images
    replicated to its channel count. Returns the max abs difference of the channel-0
    predictions relative to their max abs value, and raises ValueError above VERIFY_TOLERANCE.
    """
    side, channels = model_config.image_size, model_config.channels
    float32_config = ml_collections.ConfigDict(model_config.to_dict())
    float32_config.dtype = "float32"
    model = mae.SwinMAE.from_config(float32_config)

    images = jax.random.normal(jax.random.key(seed), (1, side, side, 1)).repeat(channels, axis=-1)
    mask = masking.window_mask(
        jax.random.key(seed + 1),
        1,
        side,
        model_config.patch_size,
        model_config.mask_unit,
        model_config.mask_ratio,
    )
    cpu = jax.devices("cpu")[0]
    variables = {"params": jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params)}
    variables, images, mask = jax.device_put((variables, images, mask), cpu)
    apply = jax.jit(model.apply).lower(variables, images, mask).compile(FAST_COMPILE)
    expected = np.asarray(apply(variables, images, mask))

    torch_model = torch_models.SwinMAE(**convert.torch_kwargs(model_config, channels_out)).eval()
    torch_model.load_state_dict(state_dict, strict=True)
    torch_images = torch.from_numpy(np.array(images[..., :1])).permute(0, 3, 1, 2)
    torch_images = torch_images.expand(-1, channels_out, -1, -1)
    with torch.no_grad():
        _, pred, _ = torch_model(torch_images, torch.from_numpy(np.array(mask)))
    actual = pred.numpy()[..., 0::channels_out]
    reference = expected[..., 0::channels]

    error = float(np.abs(actual - reference).max() / np.abs(reference).max())
    if error > VERIFY_TOLERANCE:
        raise ValueError(
            f"The exported PyTorch model disagrees with the JAX model: relative error {error:.2e} "
            f"> {VERIFY_TOLERANCE:.0e}. The conversion is wrong for this configuration."
        )
    logging.info("Export check: PyTorch and JAX predictions agree to %.2e (relative).", error)
    return error


def export_workdir(
    workdir: str | pathlib.Path,
    step: int | None = None,
    channels: int = 3,
    verify: bool = True,
) -> pathlib.Path:
    """Export the checkpoint of `step` (newest if None) to WORKDIR/export; returns that folder.

    channels: input channels of the exported PyTorch model; 3 is the public code's layout
    (exact for gray images replicated to 3 channels, see `convert.convert_channels`).
    verify: run `verify_export` before writing.
    """
    workdir = pathlib.Path(workdir)
    config = read_config(workdir)
    source = step_dir(workdir, step)
    logging.info("Exporting %s with %d input channels.", source, channels)

    params = checkpoint.load_params(source, abstract_params(config.model))
    state_dict = convert.flax_to_torch(params, config.model, channels)
    if verify:
        verify_export(params, config.model, state_dict, channels)

    out_dir = workdir / EXPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state_dict}, out_dir / PTH_NAME)
    safetensors.torch.save_file(state_dict, str(out_dir / SAFETENSORS_NAME))
    description = {
        "model_class": "vismae_jax.torch.models.SwinMAE",
        "kwargs": convert.torch_kwargs(config.model, channels),
        "pixel_mean": config.data.pixel_mean,
        "pixel_std": config.data.pixel_std,
        "trained_channels": config.model.channels,
        "step": int(source.name),
        "checkpoint": str(source.absolute()),
    }
    (out_dir / CONFIG_NAME).write_text(json.dumps(description, indent=2) + "\n")
    logging.info("Wrote %s, %s and %s to %s.", PTH_NAME, SAFETENSORS_NAME, CONFIG_NAME, out_dir)
    return out_dir


def import_torch(
    path: str | pathlib.Path,
    workdir: str | pathlib.Path,
    model_config: ml_collections.ConfigDict,
) -> pathlib.Path:
    """Convert a PyTorch SwinMAE checkpoint into an Orbax parameter checkpoint.

    path: a .pth ({"model": state_dict} or a bare state_dict) or .safetensors file with the
    public names. The weights are converted to `model_config` (channels included) and saved as
    {"params": ...} under WORKDIR/from_torch/state; pass WORKDIR/from_torch as
    `config.train.init_from`. Returns that folder.
    """
    state_dict = torch_models.read_state_dict(path)
    params = convert.torch_to_flax(state_dict, model_config)

    target = pathlib.Path(workdir).absolute() / IMPORT_DIR
    if target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another --workdir.")
    target.mkdir(parents=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(target / "state", args=ocp.args.PyTreeSave({"params": params}))
    (target / CONFIG_NAME).write_text(model_config.to_json_best_effort(indent=2) + "\n")
    logging.info("Wrote the parameters of %s to %s.", path, target)
    return target
