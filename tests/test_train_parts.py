"""Unit tests of the trainer's parts that need no model: optimiser, mesh, checkpoints, hooks."""

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vismae_jax import parallel
from vismae_jax.train import checkpoint, hooks, metrics, optim
from vismae_jax.train import state as state_lib


def toy_init(key):
    """A small parameter tree with a kernel, a bias, a norm scale, a table and a mask token."""
    return {
        "dense": {"kernel": jax.random.normal(key, (16, 8)), "bias": jnp.zeros(8)},
        "norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
        "attn": {"relative_position_bias_table": jnp.zeros((9, 2))},
        "mask_token": jnp.zeros((1, 1, 8)),
    }


def train_config(**overrides):
    config = ml_collections.ConfigDict(
        dict(
            global_batch_size=8,
            num_epochs=2.0,
            num_steps=-1,
            warmup_epochs=1.0,
            learning_rate=1e-3,
            b1=0.9,
            b2=0.95,
            weight_decay=0.05,
            grad_clip_norm=0.0,
        )
    )
    config.update(overrides)
    return config


def test_decay_mask_kernels_only():
    mask = optim.weight_decay_mask(toy_init(jax.random.key(0)))
    assert mask["dense"]["kernel"] is True
    assert mask["dense"]["bias"] is False
    assert mask["norm"]["scale"] is False
    assert mask["attn"]["relative_position_bias_table"] is False
    assert mask["mask_token"] is False


def test_decay_skips_masked_leaves():
    params = toy_init(jax.random.key(0))
    tx = optim.make_optimizer(
        train_config(learning_rate=1.0, weight_decay=0.5), optax.constant_schedule(1.0)
    )
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)

    # With zero gradients the Adam part is 0, so the update is -lr * wd * param on decayed leaves.
    np.testing.assert_allclose(
        updates["dense"]["kernel"], -0.5 * params["dense"]["kernel"], rtol=1e-6
    )
    np.testing.assert_array_equal(updates["norm"]["scale"], np.zeros(8))


def test_schedule_steps_from_epochs():
    steps = optim.schedule_steps(train_config(), corpus_size=100)
    assert steps.steps_per_epoch == 12.5
    assert steps.total_steps == 25
    assert steps.warmup_steps == 12


def test_schedule_steps_override():
    steps = optim.schedule_steps(train_config(num_steps=7, warmup_epochs=100.0), corpus_size=100)
    assert steps.total_steps == 7
    assert steps.warmup_steps == 7


def test_schedule_rejects_empty_corpus():
    with pytest.raises(ValueError, match="0 images"):
        optim.schedule_steps(train_config(), corpus_size=0)


def test_schedule_warmup_cosine():
    steps = optim.ScheduleSteps(total_steps=20, warmup_steps=10, steps_per_epoch=10.0)
    schedule = optim.make_schedule(train_config(), steps)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(15)), 5e-4, rtol=1e-5)
    assert float(schedule(20)) == 0.0


def test_clipping_limits_gradient():
    params = {"w": jnp.ones((4, 4))}
    grads = {"w": jnp.full((4, 4), 100.0)}
    tx = optim.make_optimizer(train_config(grad_clip_norm=1.0), optax.constant_schedule(1.0))
    _, opt_state = tx.update(grads, tx.init(params), params)

    # The first moment after one step is (1 - b1) x the gradient that reached AdamW.
    first_moment = opt_state[1][0].mu["w"]
    assert float(optax.tree.norm(first_moment)) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize(
    ("data", "fsdp", "expected"),
    [(-1, 1, (8, 1)), (2, -1, (2, 4)), (-1, 8, (1, 8)), (4, 2, (4, 2))],
)
def test_mesh_shape_fills(data, fsdp, expected):
    config = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp))
    assert parallel.mesh_shape(config, 8) == expected


@pytest.mark.parametrize(("data", "fsdp"), [(-1, -1), (3, -1), (4, 4), (0, 8)])
def test_mesh_shape_rejects(data, fsdp):
    with pytest.raises(ValueError):
        parallel.mesh_shape(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)), 8)


def test_mesh_axes_are_auto():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=-1)))
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


def test_rules_first_match_wins():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    abstract = jax.eval_shape(toy_init, jax.random.key(0))
    rules = (("dense/bias", "replicate"), (".*", "fsdp"))
    specs = jax.tree.map(lambda s: s.spec, parallel.tree_shardings(abstract, mesh, rules))
    assert specs["dense"]["kernel"] == jax.P("fsdp", None)
    assert specs["dense"]["bias"] == jax.P()
    assert specs["norm"]["scale"] == jax.P("fsdp")
    # No dimension of [9, 2] is divisible by 4, so the table stays whole.
    assert specs["attn"]["relative_position_bias_table"] == jax.P()


def test_rules_reject_unknown():
    with pytest.raises(ValueError, match="Unknown sharding rule"):
        parallel.validate_rules(((".*", "shard_everything"),))


def test_global_batch_sharded():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=2)))
    local = {"image": np.arange(8 * 4 * 4, dtype=np.uint8).reshape(8, 4, 4, 1)}
    batch = parallel.make_global_batch(local, parallel.batch_sharding(mesh))
    assert batch["image"].shape == (8, 4, 4, 1)
    assert len(batch["image"].addressable_shards) == 8
    assert batch["image"].addressable_shards[0].data.shape == (1, 4, 4, 1)
    np.testing.assert_array_equal(np.asarray(batch["image"]), local["image"])


def test_state_created_sharded():
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    tx = optax.adamw(1e-3, mask=optim.weight_decay_mask)
    abstract = state_lib.abstract_train_state(toy_init, tx)
    shardings = state_lib.state_shardings(abstract, mesh, ((".*", "fsdp"),))
    state = state_lib.create_train_state(toy_init, tx, jax.random.key(0), shardings)
    kernel = state.params["dense"]["kernel"]
    assert kernel.sharding.spec == jax.P("fsdp", None)
    assert kernel.addressable_shards[0].data.shape == (4, 8)
    mu = state.opt_state[0].mu["dense"]["kernel"]
    assert mu.sharding.spec == jax.P("fsdp", None)


def make_toy_iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).to_iter_dataset().batch(4))


def test_checkpoint_round_trip(tmp_path):
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    tx = optax.adamw(1e-3, mask=optim.weight_decay_mask)
    abstract = state_lib.abstract_train_state(toy_init, tx)
    shardings = state_lib.state_shardings(abstract, mesh, ((".*", "fsdp"),))
    state = state_lib.create_train_state(toy_init, tx, jax.random.key(0), shardings)
    data_iter = make_toy_iterator()
    next(data_iter)

    manager = checkpoint.make_manager(tmp_path, keep=2, keep_period=10)
    checkpoint.save(manager, 1, state, data_iter, {"step": 1, "examples_seen": 4})
    expected_next_batch = next(data_iter)
    manager.wait_until_finished()

    fresh_iter = make_toy_iterator()
    target = state_lib.with_shardings(abstract, shardings)
    restored, meta = checkpoint.restore_latest(manager, target, fresh_iter)
    manager.close()

    assert meta == {"step": 1, "examples_seen": 4}
    np.testing.assert_array_equal(next(fresh_iter), expected_next_batch)
    np.testing.assert_array_equal(
        restored.params["dense"]["kernel"], state.params["dense"]["kernel"]
    )
    assert restored.params["dense"]["kernel"].sharding == shardings.params["dense"]["kernel"]


def test_checkpoint_restore_other_mesh(tmp_path):
    tx = optax.adamw(1e-3, mask=optim.weight_decay_mask)
    abstract = state_lib.abstract_train_state(toy_init, tx)
    fsdp_mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
    fsdp_shardings = state_lib.state_shardings(abstract, fsdp_mesh, ((".*", "fsdp"),))
    state = state_lib.create_train_state(toy_init, tx, jax.random.key(0), fsdp_shardings)
    manager = checkpoint.make_manager(tmp_path, keep=2, keep_period=0)
    checkpoint.save(manager, 3, state, None, {"step": 3})
    manager.wait_until_finished()

    one_device = parallel.make_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=1)), jax.devices()[:1]
    )
    shardings = state_lib.state_shardings(abstract, one_device, ())
    restored, _ = checkpoint.restore_latest(
        manager, state_lib.with_shardings(abstract, shardings), None
    )
    manager.close()

    assert restored.params["dense"]["kernel"].sharding.mesh.devices.size == 1
    np.testing.assert_array_equal(
        restored.opt_state[0].mu["dense"]["kernel"], state.opt_state[0].mu["dense"]["kernel"]
    )


def test_checkpoint_keeps_newest_and_period(tmp_path):
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    tx = optax.adamw(1e-3)
    abstract = state_lib.abstract_train_state(toy_init, tx)
    shardings = state_lib.state_shardings(abstract, mesh, ())
    state = state_lib.create_train_state(toy_init, tx, jax.random.key(0), shardings)
    manager = checkpoint.make_manager(tmp_path, keep=2, keep_period=4)
    for step in range(1, 8):
        checkpoint.save(manager, step, state, None, {"step": step})
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [4, 6, 7]
    manager.close()


def test_load_params_from_workdir(tmp_path):
    mesh = parallel.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
    tx = optax.adamw(1e-3)
    abstract = state_lib.abstract_train_state(toy_init, tx)
    shardings = state_lib.state_shardings(abstract, mesh, ())
    state = state_lib.create_train_state(toy_init, tx, jax.random.key(0), shardings)
    manager = checkpoint.make_manager(tmp_path, keep=1, keep_period=0)
    checkpoint.save(manager, 5, state, None, {"step": 5})
    manager.wait_until_finished()
    manager.close()

    # Another optimiser (with clipping) has another opt_state structure; only params are read.
    params = checkpoint.load_params(
        tmp_path, state_lib.with_shardings(abstract.params, shardings.params)
    )
    np.testing.assert_array_equal(params["dense"]["kernel"], state.params["dense"]["kernel"])


def test_load_params_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="No Orbax checkpoint"):
        checkpoint.resolve_checkpoint_dir(tmp_path)


def test_progress_measures():
    now = [0.0]
    progress = hooks.Progress(
        total_steps=100,
        global_batch_size=32,
        num_devices=8,
        train_flops_per_image=10**12,
        peak_flops_per_device=1e13,
        clock=lambda: now[0],
    )
    progress.start(step=10)
    progress.add_data_wait(0.5)
    progress.exclude(3.0)
    now[0] = 5.0
    measures = progress.report(step=20)
    assert measures["steps_per_sec"] == 5.0
    assert measures["images_per_sec"] == 160.0
    assert measures["images_per_sec_per_device"] == 20.0
    assert measures["data_wait_share"] == 0.25
    assert measures["eta_seconds"] == 16.0
    assert measures["tflops_per_sec_per_device"] == 20.0
    assert measures["mfu"] == 2.0


def test_progress_without_peak():
    progress = hooks.Progress(
        total_steps=10, global_batch_size=8, num_devices=1, train_flops_per_image=100
    )
    progress.start(0)
    assert "mfu" not in progress.report(1)


@pytest.mark.parametrize(("step", "due"), [(3, False), (4, True), (8, True), (10, True)])
def test_is_due(step, due):
    assert hooks.is_due(step, every_steps=4, last_step=10) is due


def test_format_duration():
    assert hooks.format_duration(4.2) == "4s"
    assert hooks.format_duration(184) == "3m04s"
    assert hooks.format_duration(7384) == "2h03m04s"
    assert hooks.format_duration(93784) == "1d02h03m"


def test_buffer_names_nonfinite_step():
    buffer = metrics.MetricBuffer()
    buffer.append(7, {"loss": jnp.float32(0.5)})
    buffer.append(8, {"loss": jnp.float32(jnp.nan)})
    with pytest.raises(FloatingPointError, match="at step 8"):
        buffer.fetch()


def test_summarize_mean_and_last():
    fetched = [(1, {"loss": 1.0, "learning_rate": 0.1}), (2, {"loss": 3.0, "learning_rate": 0.2})]
    assert metrics.summarize(fetched) == {"loss": 2.0, "learning_rate": 0.2}


def test_writer_writes_events(tmp_path):
    writer = metrics.MetricWriter(tmp_path)
    writer.write_scalars(1, {"loss": 0.5})
    writer.write_image(1, "reconstruction", np.zeros((8, 8, 3), np.uint8))
    writer.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
