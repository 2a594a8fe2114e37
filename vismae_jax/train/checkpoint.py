"""Orbax checkpoints of the train state, the Grain iterator position and progress counters.

A checkpoint step directory contains three items: `state` (parameters, optimiser state and step,
saved asynchronously from the devices), `data_iter` (one JSON file per process with its Grain
iterator state) and `meta` (JSON progress counters: step, examples seen, elapsed seconds).
"""

import errno
import pathlib
import shutil
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"


def make_manager(workdir: str | pathlib.Path, keep: int, keep_period: int) -> ocp.CheckpointManager:
    """Open (or create) the CheckpointManager under `workdir/checkpoints`.

    Keeps the newest `keep` checkpoints plus every checkpoint whose step is a multiple of
    `keep_period` (0 or less keeps only the newest). Saves are asynchronous: `save` returns once
    the arrays are copied off the devices, and the files are written in a background thread.
    """
    policies = [checkpoint_managers.LatestN(n=max(keep, 1))]
    if keep_period > 0:
        policies.append(checkpoint_managers.EveryNSteps(interval_steps=keep_period))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True,
        create=True,
    )
    directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
    item_handlers = {
        "state": state_handler(),
        "meta": ocp.JsonCheckpointHandler(),
        "data_iter": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=options, item_handlers=item_handlers)


def state_handler() -> ocp.PyTreeCheckpointHandler:
    """Return the handler of the train state: jax.Arrays written without replica-parallel slicing.

    Replica-parallel saving (Orbax's default off GPU) splits each replicated array into one
    slice per replica with eager slicing ops, which compiles one small XLA program per array
    shape and slowed a save of a 0.4M-parameter model on 8 CPU devices from under 1 s to about
    18 s. Writing each shard from its first replica avoids that.
    """
    array_handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, array_handler))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    data_iter: grain.DatasetIterator | None,
    meta: dict[str, Any],
) -> None:
    """Start saving a checkpoint for `step` (asynchronously; see `make_manager`).

    The Grain iterator state is captured before this returns, so the caller may keep drawing
    batches at once.
    """
    items = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    # Waiting first makes an error of the previous save surface here, as a clear message.
    wait_until_saved(manager)
    try:
        manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as error:
        raise_if_disk_full(manager, error)
        raise
    logging.info("Started saving checkpoint for step %d under %s.", step, manager.directory)


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
    """Block until every started save is written.

    Raises:
        OSError: with errno ENOSPC, when a save failed because the disk is full.
    """
    try:
        manager.wait_until_finished()
    except Exception as error:
        raise_if_disk_full(manager, error)
        raise


def raise_if_disk_full(manager: ocp.CheckpointManager, error: BaseException) -> None:
    """Raise OSError(ENOSPC) naming the folder and the fix if `error` comes from a full disk.

    TensorStore reports a full disk as ValueError("RESOURCE_EXHAUSTED: ... No space left on
    device"), so the message is checked as well as the errno of every chained OSError.
    """
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    full = any(
        (isinstance(item, OSError) and item.errno == errno.ENOSPC)
        or "No space left on device" in str(item)
        for item in chain
    )
    if not full:
        return

    directory = pathlib.Path(manager.directory)
    free_mib = shutil.disk_usage(directory).free / 2**20
    latest = manager.latest_step()
    raise OSError(
        errno.ENOSPC,
        f"Saving a checkpoint under {directory} failed: no space left on device "
        f"({free_mib:.1f} MiB free). Free space on that disk, lower config.log.keep_checkpoints, "
        f"or move the workdir to a larger disk; the newest complete checkpoint is step {latest}, "
        "and rerunning the same command resumes from it.",
    ) from error


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None,
) -> tuple[Any, dict[str, Any]] | None:
    """Restore the newest readable checkpoint into the shapes and shardings of `abstract_state`.

    abstract_state: pytree of `jax.ShapeDtypeStruct` with `sharding` set, so a checkpoint
    written on another mesh or device count is resharded on load. `data_iter` (if given) is
    moved in place to the saved position. Returns (state, meta), or None when there is no
    checkpoint yet.

    A checkpoint that fails to restore (a file missing, truncated or unparsable) is skipped
    with a warning, and the next older one is tried. The skipped ones are moved to
    `workdir/corrupt_checkpoints/`, so the run can save those steps again.

    Raises:
        RuntimeError: no checkpoint could be restored; the message lists each step's error.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return None

    errors: dict[int, Exception] = {}
    for step in steps:
        try:
            state, meta = restore_step(manager, step, abstract_state, data_iter)
        # Damaged files surface as OSError, ValueError, KeyError or TensorStore's plain
        # Exception, depending on which file is damaged and how.
        except Exception as error:  # noqa: BLE001
            errors[step] = error
            logging.warning(
                "Checkpoint for step %d in %s is incomplete or corrupt (%s: %s).",
                step, manager.directory, type(error).__name__, first_line(error),
            )  # fmt: skip
            continue
        if errors:
            set_aside(manager, sorted(errors))
            logging.warning(
                "Resumed from checkpoint step %d instead of the newest, step %d, which could not "
                "be restored; the unreadable checkpoints (steps %s) were moved to %s.",
                step, steps[0], sorted(errors), corrupt_dir(manager),
            )  # fmt: skip
        return state, meta

    details = "; ".join(
        f"step {step}: {type(error).__name__}: {first_line(error)}"
        for step, error in errors.items()
    )
    raise RuntimeError(
        f"No checkpoint in {manager.directory} could be restored ({details}). If the config "
        "changed since they were written (model size, optimiser), restore the old config or use "
        "a new --workdir; otherwise move the damaged step folders away and rerun."
    ) from errors[steps[0]]


def restore_step(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    data_iter: grain.DatasetIterator | None,
) -> tuple[Any, dict[str, Any]]:
    """Restore checkpoint `step` (see `restore_latest`); raises whatever Orbax raises."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
    items = {
        "state": ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
        "meta": ocp.args.JsonRestore(),
    }
    if data_iter is not None:
        items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint for step %d from %s.", step, manager.directory)
    return restored["state"], dict(restored["meta"])


def first_line(error: BaseException) -> str:
    """Return the first line of an exception's message, cut to 300 characters."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else ""


def corrupt_dir(manager: ocp.CheckpointManager) -> pathlib.Path:
    """Return the folder that unreadable checkpoints are moved to: workdir/corrupt_checkpoints."""
    return pathlib.Path(manager.directory).parent / CORRUPT_DIR


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move the step folders `steps` out of the manager's directory and reload its step list.

    Process 0 moves the folders, and every process waits for it before reloading.
    NOTE: tested on one process only; with several, every process must see the same damage
    (a shared file system), or they would resume from different steps.
    """
    if jax.process_index() == 0:
        target_dir = corrupt_dir(manager)
        target_dir.mkdir(exist_ok=True)
        for step in steps:
            source = pathlib.Path(manager.directory) / str(step)
            target = target_dir / str(step)
            suffix = 1
            while target.exists():
                target = target_dir / f"{step}.{suffix}"
                suffix += 1
            source.rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vismae_set_aside_corrupt_checkpoints")
    manager.reload()


def resolve_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """Return the step directory that `path` names: a workdir, its checkpoints/ or a step directory.

    A workdir or checkpoints/ folder resolves to its newest step.

    Raises:
        FileNotFoundError: `path` does not exist or contains no checkpoint.
    """
    path = pathlib.Path(path).absolute()
    if (path / "state").is_dir():
        return path
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    steps = (
        [child for child in path.iterdir() if child.name.isdigit() and (child / "state").is_dir()]
        if path.is_dir()
        else []
    )
    if not steps:
        raise FileNotFoundError(
            f"No Orbax checkpoint found at {path}; expected a workdir, its {CHECKPOINT_DIR}/ "
            "folder or a step directory containing state/."
        )
    return max(steps, key=lambda child: int(child.name))


def load_params(path: str | pathlib.Path, abstract_params: Any) -> Any:
    """Load only the parameters of another run's checkpoint (for `config.train.init_from`).

    abstract_params: pytree of `jax.ShapeDtypeStruct` with shardings; the checkpoint's
    parameter tree must have the same structure and shapes. The optimiser state and step of
    that run are not read.
    """
    step_dir = resolve_checkpoint_dir(path)
    target = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            step_dir / "state",
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            ),
        )
    logging.info("Loaded initial parameters from %s.", step_dir)
    return jax.tree.map(lambda x: x, restored["params"])
