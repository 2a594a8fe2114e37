"""Multi-process pretraining: 2 JAX processes x 4 CPU devices behave like 1 process x 8 devices.

The two processes are subprocesses of the test, joined by `jax.distributed` on a free
loopback port. Run as a script (`python tests/test_multihost.py PROCESS_ID PORT WORKDIR CORPUS
OUTPUT`), this file is one such process: it trains the `test` configuration and writes its
summaries as JSON to OUTPUT.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 4
WORKER_TIMEOUT_SECONDS = 600


def load_config(corpus, overrides=""):
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs" / "pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("test" + (f",{overrides}" if overrides else ""))
    config.data.corpus_dir = corpus
    return config


def run_worker(process_id, port, workdir, corpus, output):
    """Train as process `process_id` of NUM_PROCESSES and write the summaries to `output`."""
    sys.path.insert(0, str(REPO_ROOT))
    import jax
    from absl import flags

    from vismae_jax import parallel
    from vismae_jax.train import loop

    # Grain reads absl flags, which only parse under absl.app.run.
    flags.FLAGS.mark_as_parsed()
    # Only process 0 writes the persistent compilation cache and so loads programs that process
    # 1 must compile. The trainer waits for all processes before running a new program.
    jax.config.update("jax_compilation_cache_dir", str(REPO_ROOT / ".cache" / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    parallel.maybe_initialize_distributed(
        True,
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=NUM_PROCESSES,
        process_id=process_id,
        initialization_timeout_seconds=120,
    )
    summaries = loop.train_and_evaluate(load_config(corpus), workdir)
    summary_json = {
        "process_index": jax.process_index(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
        "final_step": summaries["final_step"],
        "losses": {str(step): loss for step, loss in summaries["losses"].items()},
        "reconstruction_paths": [str(path) for path in summaries["reconstruction_paths"]],
        "checkpoint_steps": summaries["checkpoint_steps"],
    }
    pathlib.Path(output).write_text(json.dumps(summary_json))


if __name__ == "__main__":
    # The worker's devices must be set before JAX is imported. Compiling, not running,
    # dominates these tiny steps, so XLA's CPU backend skips its slower LLVM optimisations.
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
    _, process_id, port, workdir, corpus, output = sys.argv
    run_worker(int(process_id), int(port), workdir, corpus, output)
    sys.exit(0)


import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from vismae_jax import parallel  # noqa: E402
from vismae_jax.data import demo, pipeline, prepare  # noqa: E402
from vismae_jax.data.images import DecodeOptions  # noqa: E402
from vismae_jax.train import loop  # noqa: E402

flags.FLAGS.mark_as_parsed()


def free_loopback_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("multihost_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


@pytest.fixture(scope="module")
def two_processes(corpus, tmp_path_factory):
    """Train on 2 processes x 4 devices: (per-process summaries, shared workdir)."""
    root = tmp_path_factory.mktemp("two_processes")
    workdir = root / "workdir"
    port = free_loopback_port()
    env = dict(os.environ)
    # Keep the coordinator on loopback (JAX binds it to all interfaces by default).
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
    env.pop("XLA_FLAGS", None)

    workers = []
    for process_id in range(NUM_PROCESSES):
        output = root / f"summaries_{process_id}.json"
        log = open(root / f"log_{process_id}.txt", "w")  # noqa: SIM115 (closed below)
        command = [sys.executable, __file__, str(process_id), str(port), str(workdir), corpus]
        workers.append(
            (subprocess.Popen([*command, str(output)], env=env, stdout=log, stderr=log), log)
        )

    failures = []
    for process_id, (worker, log) in enumerate(workers):
        try:
            returncode = worker.wait(timeout=WORKER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            worker.kill()
            returncode = "timeout"
        log.close()
        if returncode != 0:
            tail = (root / f"log_{process_id}.txt").read_text()[-3000:]
            failures.append(f"process {process_id} exited with {returncode}:\n{tail}")
    if failures:
        pytest.fail("\n\n".join(failures))

    summaries = [
        json.loads((root / f"summaries_{process_id}.json").read_text())
        for process_id in range(NUM_PROCESSES)
    ]
    return summaries, workdir


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The same run on this process's 8 devices: summaries."""
    return loop.train_and_evaluate(load_config(corpus), tmp_path_factory.mktemp("one_process"))


def test_process_batches_stack_to_global(corpus):
    config = load_config(corpus)
    options = dict(image_size=64, channels=1, seed=0)
    single = pipeline.make_train_iterator(config.data, batch_size=8, **options)
    per_process = [
        pipeline.make_train_iterator(
            config.data, batch_size=4, process_index=index, process_count=2, **options
        )
        for index in range(2)
    ]
    for step in range(9):  # 72 images: crosses the end of the 59-image epoch.
        stacked = np.concatenate([next(iterator)["image"] for iterator in per_process])
        np.testing.assert_array_equal(stacked, next(single)["image"], err_msg=f"step {step}")


def test_two_processes_see_all_devices(two_processes):
    summaries, _ = two_processes
    assert [summary["process_index"] for summary in summaries] == [0, 1]
    assert all(summary["local_devices"] == DEVICES_PER_PROCESS for summary in summaries)
    assert all(summary["devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS for summary in summaries)


def test_two_processes_run_all_steps(two_processes):
    summaries, _ = two_processes
    assert [summary["final_step"] for summary in summaries] == [6, 6]
    assert [summary["checkpoint_steps"] for summary in summaries] == [[3, 6], [3, 6]]


def test_two_processes_match_one(two_processes, one_process):
    summaries, _ = two_processes
    for summary in summaries:
        for step in range(1, 7):
            assert summary["losses"][str(step)] == pytest.approx(
                one_process["losses"][step], rel=1e-5
            ), (summary["process_index"], step)


def test_only_process_zero_writes(two_processes):
    summaries, workdir = two_processes
    assert len(summaries[0]["reconstruction_paths"]) == 2
    assert summaries[1]["reconstruction_paths"] == []
    assert sorted(path.name for path in (workdir / "reconstructions").iterdir()) == [
        "step_00000003.png",
        "step_00000006.png",
    ]
    assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
    assert (workdir / "config.json").is_file()


def test_checkpoint_keeps_each_iterator(two_processes):
    _, workdir = two_processes
    iterator_files = {path.name for path in (workdir / "checkpoints/6/data_iter").iterdir()}
    assert "process_0-of-2.json" in iterator_files
    assert "process_1-of-2.json" in iterator_files


def test_initialize_rejects_bad_process_id():
    with pytest.raises(ValueError, match="Invalid process id 2 for 2 processes"):
        parallel.maybe_initialize_distributed(
            True, coordinator_address="127.0.0.1:1", num_processes=2, process_id=2
        )


def test_initialize_off_by_default():
    parallel.maybe_initialize_distributed(False)
    assert jax.process_count() == 1


def test_cli_rejects_bad_process_id(tmp_path):
    command = [
        sys.executable, "-m", "vismae_jax.pretrain", "--config=configs/pretrain.py:test",
        f"--workdir={tmp_path}", "--coordinator_address=127.0.0.1:1", "--num_processes=2",
        "--process_id=5",
    ]  # fmt: skip
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode != 0
    assert "Invalid process id 5 for 2 processes" in result.stderr
