"""Pretrain the VIS-MAE Swin masked autoencoder.

  python -m vismae_jax.pretrain --config=configs/pretrain.py:demo --workdir=/tmp/vismae_demo

Rerunning the same command with the same workdir resumes from its newest checkpoint. Override
config fields with `--config.train.learning_rate=1e-3`; see configs/pretrain.py for the
variants. On several hosts, start the same command on every host with `--distributed` (under
SLURM, Open MPI or Kubernetes), or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`; launch/ has a SLURM script and a one-machine CPU launcher.
"""

import logging as logging_lib
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vismae_jax import parallel
from vismae_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and variant: configs/pretrain.py:VARIANT."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Folder for checkpoints, logs and pictures; reruns resume from it."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() first; it reads the coordinator and process ids from "
    "the cluster environment (SLURM, Open MPI, Kubernetes).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address",
    "",
    "host:port of process 0's jax.distributed coordinator; implies --distributed. Empty: read "
    "it from the cluster environment.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes",
    0,
    "Number of JAX processes of the run; implies --distributed. 0: read it from the cluster "
    "environment.",
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    -1,
    "Index of this process, 0 to num_processes - 1; implies --distributed. -1: read it from "
    "the cluster environment.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache_dir",
    "",
    "Persistent XLA compilation cache folder (shortens restarts); empty turns it off.",
)
flags.mark_flags_as_required(["config", "workdir"])


class QuietLibraryInfo(logging_lib.Filter):
    """Drop INFO records of Orbax, which logs about 30 lines per checkpoint save."""

    def filter(self, record: logging_lib.LogRecord) -> bool:
        return record.levelno > logging_lib.INFO or "/orbax/" not in record.pathname


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the command line as absl does, but name the flag and the fix for an unknown key.

    ml_collections raises AttributeError (not a flags error) for `--config.train.learning_rat`,
    which absl would print as a traceback.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"FATAL Flags parsing error: {error}\nPass --helpfull to see help on flags.")
    except (AttributeError, KeyError) as error:
        message = str(error.args[0]) if error.args else ""
        if message.startswith("Unknown config key"):
            # Raised by the config file for an inline override such as `:demo,train.lr=1`.
            sys.exit(f"{message} Check its spelling in configs/pretrain.py.")
        overrides = " ".join(arg for arg in argv[1:] if arg.startswith("--config."))
        # The message is a repr such as '\'learning_rat\'\nDid you mean "learning_rate"...'.
        names = re.findall(r"[A-Za-z_]\w*", str(error))
        suggestion = re.search(r'Did you mean "([^"]+)"', str(error))
        hint = f' Did you mean "{suggestion.group(1)}"?' if suggestion else ""
        sys.exit(
            f"Unknown config key {names[0] if names else error!r} in {overrides}: it does not "
            f"exist in the config.{hint} Every overridden key must already exist in "
            "configs/pretrain.py; check its spelling there."
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")

    logging.get_absl_handler().addFilter(QuietLibraryInfo())
    parallel.maybe_initialize_distributed(
        _DISTRIBUTED.value, _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    if _COMPILATION_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
    if jax.process_index() != 0:
        # Every process runs the same steps, so process 0's log is enough. The other processes
        # log only warnings and errors.
        logging.set_verbosity(logging.WARNING)

    summaries = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    logging.info(
        "Finished steps %d to %d; last logged metrics: %s",
        summaries["start_step"] + 1,
        summaries["final_step"],
        summaries["last_scalars"],
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
