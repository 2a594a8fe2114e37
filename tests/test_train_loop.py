"""End-to-end pretraining on a real demo corpus with the `test` config on 8 simulated CPU devices.

One full reference run is shared: resuming, a 1-device mesh and resuming on an FSDP mesh must
reproduce its per-step losses.
"""

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from absl import flags

from vismae_jax import parallel
from vismae_jax.data import demo, pipeline, prepare
from vismae_jax.data.images import DecodeOptions
from vismae_jax.models import mae
from vismae_jax.train import loop, optim
from vismae_jax.train import state as state_lib
from vismae_jax.train import step as step_lib

# Grain worker processes read absl flags, which only parse under absl.app.run.
flags.FLAGS.mark_as_parsed()

pytestmark = pytest.mark.xdist_group("train_loop")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config_module():
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs" / "pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("train_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(sources, str(output_dir), DecodeOptions(image_size=64), progress=False)
    return str(output_dir)


def make_config(corpus, overrides=""):
    arg = "test" + (f",{overrides}" if overrides else "")
    config = load_config_module().get_config(arg)
    config.data.corpus_dir = corpus
    return config


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Six steps on 8 devices in one call: (summaries, workdir)."""
    workdir = tmp_path_factory.mktemp("reference")
    return loop.train_and_evaluate(make_config(corpus), workdir), workdir


def test_loop_runs_all_steps(reference):
    summaries, _ = reference
    assert summaries["start_step"] == 0
    assert summaries["final_step"] == 6
    assert sorted(summaries["losses"]) == [1, 2, 3, 4, 5, 6]


def test_loop_traces_step_once(reference):
    summaries, _ = reference
    assert summaries["train_step_traces"] == 1


def test_loop_writes_checkpoints(reference):
    summaries, workdir = reference
    assert summaries["checkpoint_steps"] == [3, 6]
    assert sorted(
        path.name for path in (workdir / "checkpoints").iterdir() if path.name.isdigit()
    ) == ["3", "6"]
    meta = json.loads((workdir / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["examples_seen"] == 48


def test_loop_writes_pictures_and_events(reference):
    summaries, workdir = reference
    assert [path.name for path in summaries["reconstruction_paths"]] == [
        "step_00000003.png",
        "step_00000006.png",
    ]
    assert all(path.is_file() for path in summaries["reconstruction_paths"])
    assert list(workdir.glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["variant"] == "test"


def test_resume_matches_reference(corpus, reference, tmp_path):
    reference_losses = reference[0]["losses"]
    config = make_config(corpus, "train.max_steps_per_run=3")

    first = loop.train_and_evaluate(config, tmp_path)
    second = loop.train_and_evaluate(config, tmp_path)

    assert first["final_step"] == 3
    assert second["start_step"] == 3
    assert second["final_step"] == 6
    for step in (1, 2, 3):
        assert first["losses"][step] == pytest.approx(reference_losses[step], rel=1e-6), step
    for step in (4, 5, 6):
        assert second["losses"][step] == pytest.approx(reference_losses[step], rel=1e-6), step


def test_one_device_matches_reference(corpus, reference, tmp_path):
    reference_losses = reference[0]["losses"]
    summaries = loop.train_and_evaluate(
        make_config(corpus, "mesh.data=1"), tmp_path, devices=jax.devices()[:1]
    )
    for step in range(1, 7):
        assert summaries["losses"][step] == pytest.approx(reference_losses[step], rel=1e-4), step


def test_fsdp_resume_matches_reference(corpus, reference, tmp_path):
    # Resume the data-parallel reference's step-3 checkpoint on a mesh that shards every
    # parameter and optimiser moment over a 4-device fsdp axis.
    reference_summaries, reference_workdir = reference
    shutil.copytree(reference_workdir / "checkpoints" / "3", tmp_path / "checkpoints" / "3")
    config = make_config(corpus, "mesh.data=2,mesh.fsdp=4,mesh.param_rules=(('.*','fsdp'),)")

    summaries = loop.train_and_evaluate(config, tmp_path)

    assert summaries["start_step"] == 3
    for step in (4, 5, 6):
        assert summaries["losses"][step] == pytest.approx(
            reference_summaries["losses"][step], rel=1e-4
        ), step


def saved_params(workdir, step):
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(workdir / "checkpoints" / str(step) / "state")["params"]


# Restoring without a target reads the shardings saved with the checkpoint; the devices match.
@pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")
def test_init_from_loads_weights(corpus, reference, tmp_path):
    _, reference_workdir = reference
    config = make_config(corpus, f"train.init_from={reference_workdir},train.max_steps_per_run=1")

    summaries = loop.train_and_evaluate(config, tmp_path)

    assert summaries["start_step"] == 0
    assert summaries["final_step"] == 1
    # The first AdamW step moves each parameter p by at most lr * (1 + weight_decay * |p|), so
    # the saved step-1 parameters stay that close to the reference's final ones.
    started_from = jax.tree.leaves(saved_params(reference_workdir, 6))
    after_one_step = jax.tree.leaves(saved_params(tmp_path, 1))
    learning_rate, weight_decay = config.train.learning_rate, config.train.weight_decay
    for before, after in zip(started_from, after_one_step, strict=True):
        bound = learning_rate * (1 + weight_decay * np.abs(np.asarray(before))) + 1e-6
        assert np.all(np.abs(np.asarray(after) - np.asarray(before)) <= bound)


def test_overfit_real_batch(corpus):
    config = make_config(
        corpus, "data.flip_probability=0.0,train.learning_rate=3e-3,train.grad_clip_norm=1.0"
    )
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    model = mae.SwinMAE.from_config(config.model)
    schedule = optax.constant_schedule(config.train.learning_rate)
    tx = optim.make_optimizer(config.train, schedule)
    init_params = state_lib.model_init_fn(model, config.model)
    shardings = state_lib.state_shardings(state_lib.abstract_train_state(init_params, tx), mesh, ())
    state = state_lib.create_train_state(init_params, tx, jax.random.key(0), shardings)
    train_step = jax.jit(step_lib.make_train_step(model, tx, schedule, config), donate_argnums=0)

    iterator = pipeline.make_train_iterator(
        config.data, batch_size=2, image_size=64, channels=1, seed=0
    )
    batch = parallel.make_global_batch(next(iterator), parallel.batch_sharding(mesh))
    losses = []
    for _ in range(50):
        # Step 0 every time: the same mask, so the model can memorise the masked patches.
        state, metrics = train_step(state.replace(step=jnp.zeros_like(state.step)), batch)
        losses.append(float(metrics["loss"]))

    assert np.mean(losses[-5:]) <= 0.5 * losses[0]
