"""Bad settings fail early with an error that names the value and the fix."""

import errno
import gc
import importlib.util
import logging
import pathlib
import shutil
import subprocess
import sys

import pytest
from absl import flags

from vismae_jax.data import demo, prepare
from vismae_jax.data.images import DecodeOptions
from vismae_jax.train import loop

# Grain reads absl flags, which only parse under absl.app.run.
flags.FLAGS.mark_as_parsed()

# One worker runs the whole file, so the module fixtures are built once.
pytestmark = pytest.mark.xdist_group("bad_settings")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_prepare_import_defines_no_flags():
    script = (
        "from absl import flags\n"
        "from vismae_jax.data import prepare\n"
        "print(sorted(name for name in ('image_size', 'output_dir', 'input', 'demo') "
        "if name in flags.FLAGS))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    output_dir = tmp_path_factory.mktemp("settings_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


def load_config(corpus: str, overrides: str = ""):
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs/pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # The same step settings as tests/test_resume_exact.py, so the compiled step is cached.
    arg = "test,train.num_steps=8,log.every_steps=1,log.checkpoint_every_steps=1"
    config = module.get_config(arg + ",log.reconstruction_every_steps=0" + overrides)
    config.data.corpus_dir = corpus
    return config


@pytest.fixture
def tmpfs(tmp_path, request):
    """Mount a 1 MiB tmpfs with the options in request.param; skip where mounting fails."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", request.param, "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_unknown_key_override_raises():
    with pytest.raises(KeyError, match="'train.learning_rat'"):
        load_config("", ",train.learning_rat=1")


def test_unknown_key_flag_exits(tmp_path):
    completed = subprocess.run(
        [
            sys.executable, "-m", "vismae_jax.pretrain", "--config=configs/pretrain.py:test",
            "--config.train.learning_rat=1", f"--workdir={tmp_path}",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 1
    assert "Unknown config key 'learning_rat' in --config.train.learning_rat=1" in completed.stderr
    assert 'Did you mean "learning_rate"?' in completed.stderr
    assert "Traceback" not in completed.stderr


def test_batch_not_divisible_raises(corpus, tmp_path):
    config = load_config(corpus, ",train.global_batch_size=12")
    with pytest.raises(ValueError, match="Global batch size 12 is not divisible by the 8 devices"):
        loop.train_and_evaluate(config, tmp_path)


def test_image_size_invalid_raises(corpus, tmp_path):
    config = load_config(corpus, ",model.image_size=48")
    with pytest.raises(
        ValueError, match="image_size=48.*multiple of .* = 32 .*config.model.image_size"
    ):
        loop.train_and_evaluate(config, tmp_path)


def test_workdir_under_file_raises(corpus, tmp_path):
    (tmp_path / "file.txt").write_text("a regular file")
    workdir = tmp_path / "file.txt" / "run"
    with pytest.raises(OSError, match=f"Workdir {workdir} is not writable") as raised:
        loop.train_and_evaluate(load_config(corpus), workdir)
    assert raised.value.errno == errno.ENOTDIR


@pytest.mark.parametrize("tmpfs", ["ro,size=1m"], indirect=True)
def test_workdir_read_only_raises(corpus, tmpfs):
    with pytest.raises(OSError, match=f"Workdir {tmpfs} is not writable") as raised:
        loop.train_and_evaluate(load_config(corpus), tmpfs)
    assert raised.value.errno == errno.EROFS


@pytest.fixture
def quiet_asyncio():
    """Silence asyncio's "exception was never retrieved" records of Orbax's failed writes.

    The failed write tasks are logged when they are garbage collected, possibly long after
    the test, so collect them here while the logger is quiet.
    """
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    gc.collect()
    logger.setLevel(level)


@pytest.mark.parametrize("tmpfs", ["size=1m"], indirect=True)
def test_disk_full_save_raises(corpus, tmpfs, quiet_asyncio):
    # The test model's state (parameters and two AdamW moments) takes about 5 MB.
    with pytest.raises(
        OSError, match=f"Saving a checkpoint under {tmpfs}/checkpoints failed: no space left"
    ) as raised:
        loop.train_and_evaluate(load_config(corpus), tmpfs)
    assert raised.value.errno == errno.ENOSPC
