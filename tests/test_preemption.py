"""Preemption across JAX processes: SIGTERM to one process makes all of them save one step.

Two trainer processes on loopback share a 2-device mesh through `jax.distributed` (CPU
collectives over gloo). Only process 1 receives SIGTERM; JAX's preemption sync point must make
both finish the same step, save it and exit 0.
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

# One trainer process: joins the distributed runtime, then runs the real training loop.
TRAINER = """
import importlib.util, sys
import jax
process_id, address, corpus, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_compilation_cache_dir", sys.argv[5])
jax.distributed.initialize(address, num_processes=2, process_id=process_id)
from absl import flags, logging
flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.INFO)
from vismae_jax.train import loop
spec = importlib.util.spec_from_file_location("config", "configs/pretrain.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(sys.argv[6])
config.data.corpus_dir = corpus
loop.train_and_evaluate(config, workdir)
"""
CONFIG_ARG = (
    f"test,train.num_steps={NUM_STEPS},log.every_steps=1,log.checkpoint_every_steps=1000,"
    "log.reconstruction_every_steps=0"
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
    cache = str(REPO_ROOT / ".cache" / "jax")
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                TRAINER,
                str(index),
                address,
                corpus,
                str(tmp_path),
                cache,
                CONFIG_ARG,
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

    # Process 0's log is read in a thread so that its pipe never fills up.
    logs = [[], []]
    reader = threading.Thread(target=lambda: logs[0].extend(processes[0].stderr))
    reader.start()
    for line in processes[1].stderr:
        logs[1].append(line)
        if re.search(r"step 3/\d+ \|", line):
            processes[1].send_signal(signal.SIGTERM)
            break
    logs[1].extend(processes[1].stderr)
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
