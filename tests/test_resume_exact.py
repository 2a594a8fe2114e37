"""Interrupted pretraining resumes exactly: SIGKILL, SIGTERM and damaged checkpoints.

Real `python -m vismae_jax.pretrain` processes train the `test` variant on the 8 simulated CPU
devices of tests/conftest.py, with a checkpoint after every step. Each interrupted run, once
rerun to the end, must hold parameters and optimiser state bit-identical to a run never
interrupted.
"""

import importlib.util
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags

from vismae_jax.data import demo, prepare
from vismae_jax.data.images import DecodeOptions
from vismae_jax.train import loop, preemption

# Grain reads absl flags, which only parse under absl.app.run.
flags.FLAGS.mark_as_parsed()

# One worker runs the whole file, so the module fixtures are built once.
pytestmark = pytest.mark.xdist_group("resume_exact")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 8
# Every step logs and saves, so a kill can land at any step; no reconstruction pictures.
OVERRIDES = {
    "train.num_steps": NUM_STEPS,
    "log.every_steps": 1,
    "log.checkpoint_every_steps": 1,
    "log.reconstruction_every_steps": 0,
}
RUN_TIMEOUT_S = 300
STEP_LINE = re.compile(r"\] step (\d+)/\d+ \|")
RESUME_LINE = re.compile(r"Resuming at step (\d+)")


def load_config(corpus: str):
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs/pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test," + ",".join(f"{k}={v}" for k, v in OVERRIDES.items()))
    config.data.corpus_dir = corpus
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    output_dir = tmp_path_factory.mktemp("resume_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> pathlib.Path:
    """Workdir of an uninterrupted run to NUM_STEPS, in this process."""
    workdir = tmp_path_factory.mktemp("reference")
    loop.train_and_evaluate(load_config(corpus), workdir)
    return workdir


def saved_state(workdir: pathlib.Path, step: int) -> dict:
    """Return the saved train state of `step` as a tree of numpy arrays."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(step) / "state")


def assert_bit_identical(workdir: pathlib.Path, reference: pathlib.Path) -> None:
    expected = saved_state(reference, NUM_STEPS)
    actual = saved_state(workdir, NUM_STEPS)
    paths_and_leaves, _ = jax.tree_util.tree_flatten_with_path(expected)
    actual_leaves = jax.tree.leaves(actual)
    assert len(actual_leaves) == len(paths_and_leaves)
    for (path, want), got in zip(paths_and_leaves, actual_leaves, strict=True):
        name = jax.tree_util.keystr(path)
        assert np.asarray(got).dtype == np.asarray(want).dtype, name
        assert np.array_equal(np.asarray(got), np.asarray(want)), name


class TrainerProcess:
    """A `python -m vismae_jax.pretrain` subprocess whose log is read line by line."""

    def __init__(self, corpus: str, workdir: pathlib.Path):
        command = [
            sys.executable, "-m", "vismae_jax.pretrain",
            "--config=configs/pretrain.py:test",
            f"--config.data.corpus_dir={corpus}",
            f"--workdir={workdir}",
            f"--compilation_cache_dir={REPO_ROOT / '.cache' / 'jax'}",
            *(f"--config.{key}={value}" for key, value in OVERRIDES.items()),
        ]  # fmt: skip
        env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        # Kill a hung run so that the test fails instead of waiting forever.
        self._watchdog = threading.Timer(RUN_TIMEOUT_S, self.process.kill)
        self._watchdog.start()

    def read_until_step(self, step: int) -> int:
        """Read the log until it reports a step >= `step`; return that step (-1 at exit)."""
        for line in self.process.stderr:
            self.lines.append(line)
            match = STEP_LINE.search(line)
            if match and int(match.group(1)) >= step:
                return int(match.group(1))
        return -1

    def finish(self) -> int:
        """Read the rest of the log, wait for the exit and return the exit code."""
        self.lines.extend(self.process.stderr)
        code = self.process.wait()
        self._watchdog.cancel()
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def resumed_step(self) -> int | None:
        match = RESUME_LINE.search(self.log)
        return int(match.group(1)) if match else None


@pytest.mark.slow
def test_sigkill_resume_bit_identical(corpus, reference, tmp_path):
    kill_steps = sorted(random.Random(20261204).sample(range(2, NUM_STEPS), 2))
    resumed = []
    for kill_step in kill_steps:
        trainer = TrainerProcess(corpus, tmp_path)
        reached = trainer.read_until_step(kill_step)
        trainer.process.send_signal(signal.SIGKILL)
        assert trainer.finish() == -signal.SIGKILL, trainer.log[-3000:]
        assert reached >= kill_step, trainer.log[-3000:]
        resumed.append(trainer.resumed_step())

    trainer = TrainerProcess(corpus, tmp_path)
    assert trainer.finish() == 0, trainer.log[-3000:]
    resumed.append(trainer.resumed_step())

    assert resumed[0] is None
    assert 0 < resumed[1] < NUM_STEPS, trainer.log[-3000:]
    assert resumed[1] <= resumed[2] < NUM_STEPS
    assert_bit_identical(tmp_path, reference)


@pytest.mark.slow
def test_sigterm_saves_and_resumes(corpus, reference, tmp_path):
    trainer = TrainerProcess(corpus, tmp_path)
    trainer.read_until_step(2)
    trainer.process.send_signal(signal.SIGTERM)
    assert trainer.finish() == 0, trainer.log[-3000:]

    stopped = re.search(r"Stopping after step (\d+) on a preemption notice", trainer.log)
    assert "Received SIGTERM" in trainer.log
    assert stopped is not None, trainer.log[-3000:]
    stop_step = int(stopped.group(1))
    assert stop_step < NUM_STEPS
    saved = sorted(int(path.name) for path in (tmp_path / "checkpoints").iterdir())
    assert saved[-1] == stop_step

    rerun = TrainerProcess(corpus, tmp_path)
    assert rerun.finish() == 0, rerun.log[-3000:]
    assert rerun.resumed_step() == stop_step
    assert_bit_identical(tmp_path, reference)


def test_watcher_turns_sigint_into_stop():
    before = signal.getsignal(signal.SIGINT)
    with preemption.PreemptionWatcher() as watcher:
        assert not watcher.should_stop(1)
        signal.raise_signal(signal.SIGINT)
        assert watcher.should_stop(1)
        assert watcher.received == "SIGINT"
        # The first signal restores the previous handler, so a second one interrupts.
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGINT) is before


def damage_truncate_data(step_dir: pathlib.Path) -> None:
    largest = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)


def damage_delete_meta(step_dir: pathlib.Path) -> None:
    (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("damage", [damage_truncate_data, damage_delete_meta])
def test_corrupt_checkpoint_falls_back(corpus, reference, tmp_path, caplog, damage):
    workdir = tmp_path / "workdir"
    shutil.copytree(reference, workdir)
    damage(workdir / "checkpoints" / str(NUM_STEPS))
    config = load_config(corpus)
    config.train.num_steps = NUM_STEPS

    with caplog.at_level(logging.WARNING):
        summaries = loop.train_and_evaluate(config, workdir)

    assert summaries["start_step"] == NUM_STEPS - 1
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert (
        f"Resumed from checkpoint step {NUM_STEPS - 1} instead of the newest, step {NUM_STEPS}"
        in warnings
    )
    assert (workdir / "corrupt_checkpoints" / str(NUM_STEPS)).is_dir()
    assert_bit_identical(workdir, reference)
