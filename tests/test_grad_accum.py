"""Gradient accumulation: k micro-batches of b images make the same step as one batch of k x b."""

import importlib.util
import pathlib

import jax
import ml_collections
import numpy as np
import optax
import pytest

from vismae_jax import parallel
from vismae_jax.models import mae
from vismae_jax.train import optim
from vismae_jax.train import state as state_lib
from vismae_jax.train import step as step_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 32  # 4 micro-batches of 8: one image per device and micro-batch on 8 devices.


def load_config(overrides=""):
    spec = importlib.util.spec_from_file_location(
        "pretrain_config", REPO_ROOT / "configs" / "pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("test" + (f",{overrides}" if overrides else ""))


def make_parts(config, abstract_only=False):
    """Return (jitted step, state, batch sharding) on all 8 devices.

    With `abstract_only` the state contains ShapeDtypeStructs, for tracing without compiling.
    """
    mesh = parallel.make_mesh(config.mesh)
    model = mae.SwinMAE.from_config(config.model)
    schedule = optax.constant_schedule(config.train.learning_rate)
    tx = optim.make_optimizer(config.train, schedule)
    init_params = state_lib.model_init_fn(model, config.model)
    abstract = state_lib.abstract_train_state(init_params, tx)
    shardings = state_lib.state_shardings(abstract, mesh, config.mesh.param_rules)
    if abstract_only:
        state = state_lib.with_shardings(abstract, shardings)
    else:
        state = state_lib.create_train_state(init_params, tx, jax.random.key(0), shardings)
    batch_sharding = parallel.batch_sharding(mesh)
    train_step = step_lib.make_train_step(model, tx, schedule, config, batch_sharding)
    return jax.jit(train_step), state, batch_sharding


def random_batches(count, side=64):
    rng = np.random.default_rng(0)
    return [
        {"image": rng.integers(0, 256, (GLOBAL_BATCH, side, side, 1), dtype=np.uint8)}
        for _ in range(count)
    ]


def run_steps(train_step, state, batch_sharding, batches):
    """Run one step per batch: (metrics per step, final params)."""
    history = []
    for local_batch in batches:
        state, metrics = train_step(state, parallel.make_global_batch(local_batch, batch_sharding))
        history.append(jax.device_get(metrics))
    return history, jax.device_get(state.params)


@pytest.fixture(scope="module")
def full_and_accumulated():
    batches = random_batches(2)
    full_step, state, batch_sharding = make_parts(
        load_config(f"train.global_batch_size={GLOBAL_BATCH}")
    )
    accumulating_step, _, _ = make_parts(
        load_config(f"train.global_batch_size={GLOBAL_BATCH},train.grad_accum_steps=4"),
        abstract_only=True,
    )
    # Both runs start from the same state, which the steps do not donate.
    full = run_steps(full_step, state, batch_sharding, batches)
    accumulated = run_steps(accumulating_step, state, batch_sharding, batches)
    return full, accumulated


def test_accum_same_loss(full_and_accumulated):
    (full, _), (accumulated, _) = full_and_accumulated
    for step in range(2):
        assert accumulated[step]["loss"] == pytest.approx(full[step]["loss"], rel=1e-5), step


def test_accum_same_grad_norm(full_and_accumulated):
    (full, _), (accumulated, _) = full_and_accumulated
    for step in range(2):
        assert accumulated[step]["grad_norm"] == pytest.approx(full[step]["grad_norm"], rel=1e-4), (
            step
        )


def test_accum_same_params(full_and_accumulated):
    (_, full_params), (_, accumulated_params) = full_and_accumulated
    # An Adam step moves each parameter by at most about the learning rate (1e-3), so 1e-5
    # bounds the effect of float rounding while still catching a wrong gradient.
    full_leaves = jax.tree_util.tree_leaves_with_path(full_params)
    accumulated_leaves = jax.tree.leaves(accumulated_params)
    for (path, full_leaf), accumulated_leaf in zip(full_leaves, accumulated_leaves, strict=True):
        np.testing.assert_allclose(
            accumulated_leaf, full_leaf, atol=1e-5, err_msg=parallel.path_name(path)
        )


def test_micro_batches_take_strided_rows():
    rows = np.arange(8)
    np.testing.assert_array_equal(
        step_lib.split_micro_batches(rows, 4), [[0, 4], [1, 5], [2, 6], [3, 7]]
    )


def test_accum_rejects_uneven_split():
    config = load_config("train.global_batch_size=32,train.grad_accum_steps=3")
    train_step, state, _ = make_parts(config, abstract_only=True)
    batch = {"image": jax.ShapeDtypeStruct((32, 64, 64, 1), np.uint8)}
    with pytest.raises(ValueError, match="does not split into 3 equal micro-batches"):
        jax.eval_shape(train_step, state, batch)


def test_batch_check_counts_micro_batches():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    assert parallel.check_batch_size(32, mesh, grad_accum_steps=4) == 32
    with pytest.raises(ValueError, match="8 devices of the mesh x 8 gradient-accumulation"):
        parallel.check_batch_size(32, mesh, grad_accum_steps=8)
