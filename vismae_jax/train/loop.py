"""The pretraining loop: set up mesh, data, state and checkpoints, then train, log and save.

`train_and_evaluate(config, workdir)` is the whole job. Rerunning it with the same workdir
resumes from the newest checkpoint: train state, Grain iterator position and progress counters.
"""

import dataclasses
import os
import pathlib
import socket
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from vismae_jax import masking, parallel
from vismae_jax.data import pipeline
from vismae_jax.models import flops, mae
from vismae_jax.train import checkpoint, hooks, metrics, optim, preemption, reconstruction
from vismae_jax.train import state as state_lib
from vismae_jax.train import step as step_lib

DEFAULT_CORPUS_SUBDIR = "corpus"
NUM_RECONSTRUCTION_IMAGES = 4


@dataclasses.dataclass
class Setup:
    """Everything the loop needs, built once before the first step."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    steps: optim.ScheduleSteps
    data_iter: Any
    model: mae.SwinMAE
    schedule: Any
    tx: Any
    abstract_state: state_lib.TrainState
    shardings: state_lib.TrainState


def resolve_corpus_dir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """Return config.data.corpus_dir, or WORKDIR/corpus when it is empty."""
    corpus_dir = config.data.corpus_dir or str(workdir / DEFAULT_CORPUS_SUBDIR)
    path = pathlib.Path(corpus_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Corpus folder {path} not found. Prepare one with `python -m vismae_jax.data.prepare "
            f"--input=DIR --output_dir={path}` (or `--demo` for the demo corpus), or set "
            "config.data.corpus_dir."
        )
    return path


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
    """Raise ValueError, naming the value and the fix, if the model cannot take its image size.

    Checked before the corpus, whose own size check would otherwise suggest preparing it at
    the invalid size.
    """
    try:
        mae.check_image_size(
            model_config.image_size, model_config.patch_size, len(model_config.depths)
        )
        masking.check_mask_geometry(
            model_config.image_size, model_config.patch_size, model_config.mask_unit
        )
    except ValueError as error:
        raise ValueError(
            f"{error} Set config.model.image_size to such a size, and prepare the corpus with "
            "the same --image_size."
        ) from error


def prepare_workdir(workdir: pathlib.Path) -> None:
    """Create `workdir` and check that a file can be written in it.

    Raises:
        OSError: the folder cannot be created or written; the message names it and the fix.
    """
    probe = workdir / f".write_test.{socket.gethostname()}.{os.getpid()}"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OSError(
            error.errno,
            f"Workdir {workdir} is not writable ({error.strerror or error}). Pass a --workdir "
            "that you can create and write, on a disk with room for checkpoints.",
        ) from error


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Write the run's config to workdir/config.json (process 0 only)."""
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(
            config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
        )


def build_setup(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    devices: Sequence[jax.Device] | None = None,
) -> Setup:
    """Build the mesh, the data iterator, the model, the optimiser and the state's layout."""
    mesh = parallel.make_mesh(config.mesh, devices)
    logging.info(
        "Mesh %s over %d devices (%s), %d processes.",
        dict(mesh.shape),
        mesh.devices.size,
        jax.devices()[0].device_kind,
        jax.process_count(),
    )

    data_config = ml_collections.ConfigDict(config.data.to_dict())
    data_config.corpus_dir = str(resolve_corpus_dir(config, workdir))
    corpus_size = pipeline.corpus_size(data_config.corpus_dir, data_config.modality)
    steps = optim.schedule_steps(config.train, corpus_size)
    per_process_batch = parallel.check_batch_size(
        config.train.global_batch_size, mesh, config.train.grad_accum_steps
    )
    logging.info(
        "Corpus %s: %d images (modality %s), %.1f steps per epoch; %d steps, %d warmup steps.",
        data_config.corpus_dir,
        corpus_size,
        data_config.modality,
        steps.steps_per_epoch,
        steps.total_steps,
        steps.warmup_steps,
    )
    data_iter = pipeline.make_train_iterator(
        data_config,
        batch_size=per_process_batch,
        image_size=config.model.image_size,
        channels=config.model.channels,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )

    model = mae.SwinMAE.from_config(config.model)
    schedule = optim.make_schedule(config.train, steps)
    tx = optim.make_optimizer(config.train, schedule)
    abstract_state = state_lib.abstract_train_state(
        state_lib.model_init_fn(model, config.model), tx
    )
    shardings = state_lib.state_shardings(abstract_state, mesh, config.mesh.param_rules)
    return Setup(
        config, workdir, mesh, steps, data_iter, model, schedule, tx, abstract_state, shardings
    )


def initial_state(setup: Setup, manager) -> tuple[state_lib.TrainState, dict[str, Any]]:
    """Restore the newest checkpoint of the workdir, or initialise (from `init_from` if set)."""
    target = state_lib.with_shardings(setup.abstract_state, setup.shardings)
    restored = checkpoint.restore_latest(manager, target, setup.data_iter)
    if restored is not None:
        state, meta = restored
        logging.info("Resuming at step %d (%d examples seen).", meta["step"], meta["examples_seen"])
        return state, meta

    init_params = state_lib.model_init_fn(setup.model, setup.config.model)
    params = None
    if setup.config.train.init_from:
        params_target = state_lib.with_shardings(
            setup.abstract_state.params, setup.shardings.params
        )
        params = checkpoint.load_params(setup.config.train.init_from, params_target)
    key = step_lib.stream_key(setup.config.seed, step_lib.INIT_STREAM)
    state = state_lib.create_train_state(init_params, setup.tx, key, setup.shardings, params=params)
    return state, {"step": 0, "examples_seen": 0, "elapsed_seconds": 0.0}


def log_model_size(setup: Setup) -> int:
    """Log and return the number of model parameters."""
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(setup.abstract_state.params))
    logging.info("Swin MAE with %.2fM parameters.", count / 1e6)
    return count


def make_progress(setup: Setup) -> hooks.Progress:
    """Build the progress hook with the model's analytic FLOPs and the device's peak."""
    config = setup.config
    return hooks.Progress(
        total_steps=setup.steps.total_steps,
        global_batch_size=config.train.global_batch_size,
        num_devices=setup.mesh.devices.size,
        train_flops_per_image=flops.train_flops_per_image(config.model),
        peak_flops_per_device=flops.peak_flops_per_device(jax.devices()[0].device_kind),
    )


class Reporter:
    """Logs metric intervals, writes TensorBoard events and collects the run's summaries."""

    def __init__(self, setup: Setup, writer: metrics.MetricWriter, progress: hooks.Progress):
        self.setup = setup
        self.writer = writer
        self.progress = progress
        self.losses: dict[int, float] = {}
        self.last_scalars: dict[str, float] = {}

    def report(self, buffer: metrics.MetricBuffer) -> None:
        """Fetch `buffer` (blocks until its newest step is done), check it, log and write it."""
        if not len(buffer):
            return
        fetched = buffer.fetch()
        for step, step_metrics in fetched:
            self.losses[step] = step_metrics["loss"]
        step = fetched[-1][0]
        scalars = metrics.summarize(fetched) | self.progress.report(step)
        metrics.log_scalars(step, self.setup.steps.total_steps, scalars)
        self.writer.write_scalars(step, scalars)
        self.last_scalars = scalars


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Pretrain the Swin MAE with `config`, writing everything under `workdir`.

    The mesh spans `devices` (default: all devices of all processes).

    Returns the run's summaries: start_step and final_step of this call, losses (every step's
    loss, by step, for the steps run in this call), last_scalars (the last logged interval),
    checkpoint_steps, reconstruction_paths, num_parameters, train_step_traces and preempted
    (True when a preemption notice stopped the call early).

    Raises:
        FloatingPointError: the loss became NaN or infinite (the message names the step).
    """
    workdir = pathlib.Path(workdir).absolute()
    check_model_config(config.model)
    prepare_workdir(workdir)
    write_config(config, workdir)
    setup = build_setup(config, workdir, devices)
    num_parameters = log_model_size(setup)

    manager = checkpoint.make_manager(workdir, config.log.keep_checkpoints, config.log.keep_period)
    writer = metrics.MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        with preemption.PreemptionWatcher() as watcher:
            summaries = run(setup, manager, writer, watcher)
    finally:
        try:
            checkpoint.wait_until_saved(manager)
        finally:
            manager.close()
            writer.close()
    summaries["num_parameters"] = num_parameters
    return summaries


def run(
    setup: Setup,
    manager,
    writer: metrics.MetricWriter,
    watcher: preemption.PreemptionWatcher | None = None,
) -> dict[str, Any]:
    """Run the steps from the restored (or initial) state to the end, or to max_steps_per_run.

    When `watcher` reports a preemption notice, the current step is finished and saved, and
    the run returns early with `preempted` set in its summaries.
    """
    config = setup.config
    total_steps = setup.steps.total_steps
    batch_sharding = parallel.batch_sharding(setup.mesh)
    state, meta = initial_state(setup, manager)
    start_step = int(meta["step"])
    end_step = total_steps
    if config.train.max_steps_per_run > 0:
        end_step = min(total_steps, start_step + config.train.max_steps_per_run)

    traces = []

    def traced_step(state, batch):
        traces.append(1)  # Runs once per trace, never per step.
        return train_step(state, batch)

    train_step = step_lib.make_train_step(
        setup.model, setup.tx, setup.schedule, config, batch_sharding
    )
    per_process_batch = config.train.global_batch_size // jax.process_count()
    side, channels = config.model.image_size, config.model.channels
    abstract_batch = {
        "image": jax.ShapeDtypeStruct(
            (config.train.global_batch_size, side, side, channels), np.uint8
        )
    }
    compiled_step = step_lib.compile_train_step(
        traced_step,
        setup.abstract_state,
        setup.shardings,
        abstract_batch,
        batch_sharding,
        parallel.replicated(setup.mesh),
    )
    reconstruct = reconstruction.make_reconstruct_fn(
        setup.model,
        config,
        min(NUM_RECONSTRUCTION_IMAGES, config.train.global_batch_size),
        parallel.replicated(setup.mesh),
    )

    progress = make_progress(setup)
    reporter = Reporter(setup, writer, progress)
    buffer = metrics.MetricBuffer()
    pending = metrics.MetricBuffer()
    reconstruction_images = None
    reconstruction_paths = []
    checkpoint_steps = []
    session_start = time.perf_counter()
    elapsed_before = float(meta.get("elapsed_seconds", 0.0))
    logging.info(
        "Training steps %d to %d of %d, %d images per process per step.",
        start_step + 1,
        end_step,
        total_steps,
        per_process_batch,
    )
    progress.start(start_step)
    preempted = False
    previous_metrics = None

    for step in range(start_step + 1, end_step + 1):
        fetch_start = time.perf_counter()
        local_batch = next(setup.data_iter)
        batch = parallel.make_global_batch(local_batch, batch_sharding)
        progress.add_data_wait(time.perf_counter() - fetch_start)
        if reconstruction_images is None:
            reconstruction_images = batch["image"]

        with jax.transfer_guard("disallow"):
            state, step_metrics = compiled_step(state, batch)
        buffer.append(step, step_metrics)

        # Keep at most two steps in flight. Waiting for the previous step (no transfer to the
        # host) bounds how far the host runs ahead, so a preemption notice stops the run
        # within about one step instead of after every queued step.
        if previous_metrics is not None:
            jax.block_until_ready(previous_metrics)
        previous_metrics = step_metrics

        # Metrics of the previous logging step are fetched only now, after this step is
        # queued, so the devices have work while the host waits for them and logs.
        reporter.report(pending)

        # Log the first step of each call too: it shows the starting loss and that the
        # compiled step runs.
        # A preemption notice makes this step the last one of the call.
        preempted = watcher is not None and watcher.should_stop(step)
        is_last = step == end_step or preempted
        is_first = step == start_step + 1
        if hooks.is_due(step, config.log.every_steps, total_steps) or is_last or is_first:
            pending = buffer
            buffer = metrics.MetricBuffer()

        if hooks.is_due(step, config.log.reconstruction_every_steps, total_steps):
            # Wait for the step first, so that only the picture's own time is left out of
            # the throughput measures.
            jax.block_until_ready(step_metrics)
            picture_start = time.perf_counter()
            path = write_reconstruction(
                setup, writer, reconstruct, state.params, reconstruction_images, step
            )
            if path is not None:
                reconstruction_paths.append(path)
            progress.exclude(time.perf_counter() - picture_start)

        if hooks.is_due(step, config.log.checkpoint_every_steps, total_steps) or is_last:
            # Check every step up to this one for a non-finite loss before saving it.
            reporter.report(pending)
            reporter.report(buffer)
            meta = {
                "step": step,
                "examples_seen": step * config.train.global_batch_size,
                "elapsed_seconds": elapsed_before + time.perf_counter() - session_start,
                "total_steps": total_steps,
            }
            save_start = time.perf_counter()
            checkpoint.save(manager, step, state, setup.data_iter, meta)
            checkpoint_steps.append(step)
            progress.exclude(time.perf_counter() - save_start)

        if preempted:
            logging.warning(
                "Stopping after step %d on a preemption notice; its checkpoint is saved. Rerun "
                "the same command to resume.",
                step,
            )
            end_step = step
            break

    reporter.report(pending)
    reporter.report(buffer)
    writer.flush()
    return {
        "start_step": start_step,
        "final_step": end_step,
        "losses": reporter.losses,
        "last_scalars": reporter.last_scalars,
        "checkpoint_steps": checkpoint_steps,
        "reconstruction_paths": reconstruction_paths,
        "train_step_traces": len(traces),
        "preempted": preempted,
    }


def write_reconstruction(setup, writer, reconstruct, params, images, step) -> pathlib.Path | None:
    """Compute the reconstruction grid of `step`; process 0 writes it as PNG and to TensorBoard."""
    # The first call compiles `reconstruct`, at a different pace on each process.
    parallel.wait_for_all_processes(f"reconstruction_{step}")
    pictures = jax.device_get(reconstruct(params, images))
    if jax.process_index() != 0:
        return None
    grid = reconstruction.make_grid(pictures)
    path = reconstruction.write_png(grid, setup.workdir, step)
    writer.write_image(step, "reconstruction", grid)
    logging.info("Wrote reconstruction grid %s.", path)
    return path
