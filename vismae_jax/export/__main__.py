"""Export pretrained SwinMAE weights to PyTorch, or import PyTorch weights for pretraining.

python -m vismae_jax.export --workdir=DIR [--step=N] [--channels=1|3]
    reads DIR/config.json and the Orbax checkpoint DIR/checkpoints/N (the newest by
    default) and writes DIR/export/vismae_mae.pth ({"model": state_dict}),
    vismae_mae.safetensors and config.json (the SwinMAE constructor arguments).

python -m vismae_jax.export --from-torch=FILE.pth --workdir=DIR --config=configs/pretrain.py:VARIANT
    converts PyTorch SwinMAE weights (the public code's or ours) to the config's model and
    writes them to DIR/from_torch; continue with --config.train.init_from=DIR/from_torch.
"""

from absl import app, flags
from ml_collections import config_flags

from vismae_jax.export import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Pretraining workdir to export from or import into."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export; the newest if unset.")
_CHANNELS = flags.DEFINE_enum(
    "channels",
    None,
    ["1", "3"],
    "Input channels of the written model. Export: default 3, the public code's layout (exact "
    "for gray images replicated to 3 channels). Import: default config.model.channels.",
)
_VERIFY = flags.DEFINE_bool(
    "verify",
    True,
    "Before writing an export, compare JAX and PyTorch predictions on a random image (float32 "
    "on CPU; about 20 s for the full-size model on 2 busy CPU cores).",
)
_FROM_TORCH = flags.DEFINE_string(
    "from-torch", None, "PyTorch SwinMAE weights (.pth or .safetensors) to import."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Import only: pretraining config whose model the weights are converted to."
)
flags.mark_flag_as_required("workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")

    if _FROM_TORCH.value:
        if _CONFIG.value is None:
            raise app.UsageError("--from-torch needs --config=configs/pretrain.py:VARIANT.")
        model_config = _CONFIG.value.model
        if _CHANNELS.value is not None:
            model_config.channels = int(_CHANNELS.value)
        target = workdir_lib.import_torch(_FROM_TORCH.value, _WORKDIR.value, model_config)
        print(f"Wrote {target}; start pretraining with --config.train.init_from={target}")
        return

    channels = int(_CHANNELS.value or 3)
    out_dir = workdir_lib.export_workdir(_WORKDIR.value, _STEP.value, channels, _VERIFY.value)
    print(f"Wrote {out_dir}")


if __name__ == "__main__":
    app.run(main)
