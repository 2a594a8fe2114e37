"""FSDP and mesh changes: sharded parameters train like replicated ones, and a checkpoint saved
on 8 devices continues on 4 and then on 1 with the same losses.

One FSDP run on 8 devices is the reference. Its step-2 checkpoint continues for one step with
pure data parallel on 4 devices, whose checkpoint continues for one step on 1 device.
"""

import importlib.util
import pathlib
import shutil

import jax
import pytest
from absl import flags

from vismae_jax.data import demo, prepare
from vismae_jax.data.images import DecodeOptions
from vismae_jax.train import checkpoint, loop
from vismae_jax.train import state as state_lib

# Grain worker processes read absl flags, which only parse under absl.app.run.
flags.FLAGS.mark_as_parsed()

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Four steps with a checkpoint at step 2; no reconstruction pictures, to compile less.
RUN = "train.num_steps=4,log.checkpoint_every_steps=2,log.reconstruction_every_steps=0"
FSDP_8 = "mesh.data=1,mesh.fsdp=8,mesh.param_rules=(('.*','fsdp'),)"


def load_config(corpus, overrides=""):
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs" / "pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(f"test,{RUN}" + (f",{overrides}" if overrides else ""))
    config.data.corpus_dir = corpus
    return config


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("fsdp_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


@pytest.fixture(scope="module")
def fsdp(corpus, tmp_path_factory):
    """Every parameter and optimiser moment sharded over 8 devices: (summaries, workdir)."""
    workdir = tmp_path_factory.mktemp("fsdp")
    return loop.train_and_evaluate(load_config(corpus, FSDP_8), workdir), workdir


def continue_run(corpus, source_workdir, step, workdir, overrides, devices):
    """Copy the step checkpoint of `source_workdir` to `workdir` and train one more step there."""
    shutil.copytree(source_workdir / "checkpoints" / str(step), workdir / "checkpoints" / str(step))
    config = load_config(corpus, f"{overrides},train.max_steps_per_run=1")
    return loop.train_and_evaluate(config, workdir, devices=devices)


def test_fsdp_shards_state(corpus, fsdp):
    _, workdir = fsdp
    setup = loop.build_setup(load_config(corpus, FSDP_8), workdir)
    manager = checkpoint.make_manager(workdir, keep=3, keep_period=0)
    target = state_lib.with_shardings(setup.abstract_state, setup.shardings)
    state, _ = checkpoint.restore_latest(manager, target, None)
    manager.close()

    kernel = state.params["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]  # [16, 48]
    assert kernel.sharding.spec == jax.P(None, "fsdp")
    assert kernel.addressable_shards[0].data.shape == (16, 6)
    moment = state.opt_state[0].mu["layers_0"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert moment.addressable_shards[0].data.shape == (16, 6)

    # A device stores about 1/8 of the parameters: only leaves with no dimension divisible by
    # 8 (small tables, odd-sized vectors) are replicated.
    leaves = jax.tree.leaves(state.params)
    total = sum(leaf.size for leaf in leaves)
    on_one_device = sum(leaf.addressable_shards[0].data.size for leaf in leaves)
    assert on_one_device < 0.2 * total


@pytest.fixture(scope="module")
def four_then_one(corpus, fsdp, tmp_path_factory):
    """Continue the FSDP run's step-2 checkpoint on 4 devices, then on 1: (summaries, summaries)."""
    _, fsdp_workdir = fsdp
    root = tmp_path_factory.mktemp("four_then_one")
    four = continue_run(
        corpus, fsdp_workdir, 2, root / "four", "mesh.data=4", devices=jax.devices()[:4]
    )
    one = continue_run(
        corpus, root / "four", 3, root / "one", "mesh.data=1", devices=jax.devices()[:1]
    )
    return four, one


def test_data_parallel_matches_fsdp(fsdp, four_then_one):
    # From the same step-2 state, a data-parallel step on 4 devices and an FSDP step on 8
    # devices give the same loss.
    fsdp_summaries, _ = fsdp
    four, _ = four_then_one
    assert four["start_step"] == 2
    assert four["losses"][3] == pytest.approx(fsdp_summaries["losses"][3], rel=1e-4)


def test_restore_8_to_4_to_1(fsdp, four_then_one):
    fsdp_summaries, _ = fsdp
    _, one = four_then_one
    assert one["start_step"] == 3
    assert one["losses"][4] == pytest.approx(fsdp_summaries["losses"][4], rel=1e-4)
