"""Tests of the analytic FLOP counts and the device peak table used for MFU."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import pretrain
from vismae_jax.models import flops, mae

GIGA = 1e9


def mae_config(**overrides):
    """Full-size pretraining model config with `overrides` applied."""
    model = pretrain.get_config("generic").model
    for key, value in overrides.items():
        setattr(model, key, value)
    return model


def test_swin_t_classifier_gmac():
    # Swin-T at 224 is published as 4.5G (multiply-accumulates); the matmuls alone give 4.49.
    gmac = flops.swin_classifier_forward_flops() / flops.FLOPS_PER_MAC / GIGA
    assert gmac == pytest.approx(4.49, rel=0.01)


def test_mae_default_gmac():
    # The public code's configuration takes 3 channels.
    gmac = flops.mae_forward_flops(mae_config(channels=3)) / flops.FLOPS_PER_MAC / GIGA
    assert gmac == pytest.approx(5.45, rel=0.01)


def test_mae_grayscale_gmac():
    # One channel only shrinks the patch embedding and the head: 2 x 3136 x 96 x 16 x 2 fewer MACs.
    difference = flops.mae_forward_flops(mae_config(channels=3)) - flops.mae_forward_flops(
        mae_config(channels=1)
    )
    assert difference == flops.FLOPS_PER_MAC * 2 * 3136 * 96 * 16 * 2


def test_mae_breakdown_sum():
    config = mae_config()
    assert sum(flops.mae_forward_flops_breakdown(config).values()) == flops.mae_forward_flops(
        config
    )


def test_mae_mlp_term():
    # Encoder and decoder blocks see the same grids: 2 blocks per stage at 56, 28, 14 twice, 7 once.
    grids_and_dims = [(56, 96), (28, 192), (14, 384)] * 2 + [(7, 768)]
    expected = sum(2 * 2 * grid**2 * dim * 4 * dim for grid, dim in grids_and_dims)
    assert flops.mae_forward_flops_breakdown(mae_config())["mlp"] == flops.FLOPS_PER_MAC * expected


def test_mae_window_padding():
    # At 320 the 80x80 grid pads to 84x84 windows: qkv runs on the padded tokens, the MLP does not.
    breakdown = flops.mae_forward_flops_breakdown(mae_config(image_size=320, depths=(2, 0, 0, 0)))
    qkv_stage0 = 2 * 2 * 84**2 * 96 * 3 * 96  # Encoder and decoder stage 0, 2 blocks each.
    assert breakdown["qkv"] == flops.FLOPS_PER_MAC * qkv_stage0


def test_train_is_three_forwards():
    config = mae_config()
    assert flops.train_flops_per_image(config) == 3 * flops.mae_forward_flops(config)


def test_public_train_cost():
    # About 33 GFLOP per image for a training step of the public configuration.
    assert flops.train_flops_per_image(mae_config(channels=3)) / GIGA == pytest.approx(
        32.7, rel=0.01
    )


def test_indivisible_image_size():
    with pytest.raises(ValueError, match="image_size"):
        flops.mae_forward_flops(mae_config(image_size=100))


@pytest.mark.parametrize(
    ("device_kind", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
    ],
)
def test_peak_known(device_kind, peak):
    assert flops.peak_flops_per_device(device_kind) == peak


@pytest.mark.parametrize(
    "device_kind", ["cpu", "NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL", "TPU v4"]
)
def test_peak_unknown(device_kind):
    assert flops.peak_flops_per_device(device_kind) is None


def test_mfu_value():
    # 989e12 FLOP in one second on one H200 is 100% MFU.
    assert flops.model_flops_utilization(989e12, 1.0, 1, "NVIDIA H200") == pytest.approx(1.0)


def test_mfu_unknown_device():
    assert flops.model_flops_utilization(1e12, 1.0, 1, "cpu") is None


def abstract_mae(model_config, batch_size):
    """Return (forward, loss, params, images, mask) for the Flax SwinMAE, all abstract shapes."""
    model = mae.SwinMAE.from_config(model_config)
    size, channels = model_config.image_size, model_config.channels
    tokens = (size // model_config.patch_size) ** 2
    images = jax.ShapeDtypeStruct((batch_size, size, size, channels), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch_size, tokens), jnp.bool_)
    params = jax.eval_shape(model.init, jax.random.key(0), images, mask)["params"]

    def forward(params, images, mask):
        return model.apply({"params": params}, images, mask)

    def loss(params, images, mask):
        target = mae.patchify(images, model_config.patch_size)
        return mae.reconstruction_loss(forward(params, images, mask), target, mask)

    return forward, loss, params, images, mask


def traced_forward_flops(model_config):
    """Matmul FLOPs per image that the Flax SwinMAE forward pass traces to."""
    forward, _, params, images, mask = abstract_mae(model_config, batch_size=1)
    return flops.traced_matmul_flops(forward, params, images, mask)


def test_traced_test_config():
    # The test config pads every stage: 16, 8, 4 and 2 token grids run as 21, 14, 7 and 7.
    config = pretrain.get_config("test").model
    assert traced_forward_flops(config) == flops.mae_forward_flops(config)


def test_traced_default_config():
    config = mae_config()
    assert traced_forward_flops(config) == flops.mae_forward_flops(config)


def test_traced_padded_320():
    config = mae_config(image_size=320)
    assert traced_forward_flops(config) == flops.mae_forward_flops(config)


def test_traced_gradient_step():
    # The backward pass does two products per forward product, except the input gradient of the
    # patch embedding, which JAX prunes because nothing uses it.
    config = pretrain.get_config("test").model
    _, loss, params, images, mask = abstract_mae(config, batch_size=1)
    traced = flops.traced_matmul_flops(jax.grad(loss), params, images, mask)
    patch_embed = flops.mae_forward_flops_breakdown(config)["patch_embed"]
    assert traced == flops.train_flops_per_image(config) - patch_embed


def test_xla_cost_ratio():
    # XLA's cost analysis also counts elementwise work (norms, softmax, GELU, residual adds), so
    # analytic / XLA lies below 1: 0.855 measured on the test config, 0.942 at full size.
    config = pretrain.get_config("test").model
    forward, _, params, images, mask = abstract_mae(config, batch_size=2)
    compiled = jax.jit(forward).lower(params, images, mask).compile()
    xla_flops_per_image = compiled.cost_analysis()["flops"] / 2
    assert 0.80 <= flops.mae_forward_flops(config) / xla_flops_per_image <= 1.0


def test_benchmark_help():
    # The benchmark script is never run by tests; this checks that it imports and lists its flags.
    script = pathlib.Path(__file__).resolve().parents[1] / "launch" / "benchmark.py"
    result = subprocess.run(
        [sys.executable, str(script), "--helpshort"], capture_output=True, text=True, timeout=60
    )
    assert "--json" in result.stdout


def test_benchmark_sorts_hlo_ops_into_matmul_copy_other():
    # The benchmark's profile part splits a step's time into these kinds. A real compiled
    # program with a matrix product, a transposed copy and an addition has all three.
    script = pathlib.Path(__file__).resolve().parents[1] / "launch" / "benchmark.py"
    code = (
        "import sys, jax, jax.numpy as jnp; sys.argv = ['benchmark']; "
        f"sys.path.insert(0, {str(script.parent)!r}); import benchmark; "
        "f = jax.jit(lambda a, b: (a @ a, b.transpose(2, 0, 1), a + 2.0)); "
        "x, y = jnp.ones((64, 64)), jnp.ones((8, 16, 32)); "
        "kinds = benchmark._classify_hlo_ops(f.lower(x, y).compile().as_text()); "
        "print(sorted(set(kinds.values())))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "['copy', 'matmul', 'other']"
