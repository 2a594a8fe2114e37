"""Preemption across JAX processes: SIGTERM to one process makes all of them save one step.

Two `python -m vismae_jax.pretrain` processes on loopback share a 2-device mesh through
`jax.distributed` (CPU collectives over gloo). Only process 1 receives SIGTERM. JAX's
preemption sync point must make both finish the same step, save it and exit 0.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

from vismae_jax.data import demo, prepare
from vismae_jax.data.images import DecodeOptions

# One worker runs the whole file, so the module fixtures are built once.
pytestmark = pytest.mark.xdist_group("preemption")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 400
NUM_STEPS = 40

OVERRIDES = (
    f"--config.train.num_steps={NUM_STEPS}",
    "--config.log.every_steps=1",
    "--config.log.checkpoint_every_steps=1000",
    "--config.log.reconstruction_every_steps=0",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    output_dir = tmp_path_factory.mktemp("preemption_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


@pytest.mark.slow
def test_sigterm_one_process_stops_all(corpus, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vismae_jax.pretrain",
                "--config=configs/pretrain.py:test",
                f"--config.data.corpus_dir={corpus}",
                *OVERRIDES,
                f"--workdir={tmp_path}",
                f"--coordinator_address={address}",
                "--num_processes=2",
                f"--process_id={index}",
                f"--compilation_cache_dir={REPO_ROOT / '.cache' / 'jax'}",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index in range(2)
    ]
    watchdogs = [threading.Timer(RUN_TIMEOUT_S, process.kill) for process in processes]
    for watchdog in watchdogs:
        watchdog.start()

    # Only process 0 logs the steps. Process 1's log is read in a thread so that its pipe never
    # fills up, and only process 1 receives SIGTERM.
    logs = [[], []]
    reader = threading.Thread(target=lambda: logs[1].extend(processes[1].stderr))
    reader.start()
    for line in processes[0].stderr:
        logs[0].append(line)
        if re.search(r"step 3/\d+ \|", line):
            processes[1].send_signal(signal.SIGTERM)
            break
    logs[0].extend(processes[0].stderr)
    codes = [process.wait() for process in processes]
    reader.join()
    for watchdog in watchdogs:
        watchdog.cancel()
    texts = ["".join(log) for log in logs]

    assert codes == [0, 0], "\n".join(text[-3000:] for text in texts)
    stopped = [re.findall(r"Stopping after step (\d+) on a preemption notice", t) for t in texts]
    assert len(stopped[0]) == 1, texts[0][-3000:]
    assert stopped[0] == stopped[1]
    stop_step = int(stopped[0][0])
    assert 3 <= stop_step < NUM_STEPS
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == [str(stop_step)]
