"""Tests of window masking: exact counts, whole units, per-sample permutations, jit and sharding."""

import jax
import numpy as np
import pytest

from vismae_jax import masking


def draw(seed: int, batch_size: int, image_size: int, mask_ratio: float = 0.75) -> np.ndarray:
    key = jax.random.key(seed)
    return np.asarray(masking.window_mask(key, batch_size, image_size, mask_ratio=mask_ratio))


def test_window_mask_shape_dtype():
    mask = draw(0, 3, 224)

    assert mask.shape == (3, 3136)
    assert mask.dtype == np.bool_


def test_window_mask_count_224():
    mask = draw(0, 16, 224)

    np.testing.assert_array_equal(mask.sum(axis=1), np.full(16, 2352))


def test_window_mask_whole_units():
    mask = draw(1, 8, 224).reshape(8, 14, 4, 14, 4)
    unit_sums = mask.sum(axis=(2, 4))

    assert np.all((unit_sums == 0) | (unit_sums == 16))


def test_window_mask_samples_differ():
    mask = draw(2, 2, 224)

    assert not np.array_equal(mask[0], mask[1])


def test_window_mask_same_key_same_mask():
    np.testing.assert_array_equal(draw(3, 4, 224), draw(3, 4, 224))


def test_window_mask_new_key_new_mask():
    assert not np.array_equal(draw(3, 4, 224), draw(4, 4, 224))


@pytest.mark.parametrize(
    ("image_size", "mask_ratio"),
    [(320, 0.75), (224, 0.5), (224, 0.6), (320, 0.9), (64, 0.75), (224, 0.0), (224, 1.0)],
)
def test_window_mask_sizes_and_ratios(image_size, mask_ratio):
    units_per_side = image_size // 16
    kept_units = int(units_per_side**2 * (1 - mask_ratio))
    mask = draw(5, 4, image_size, mask_ratio)

    assert mask.shape == (4, (image_size // 4) ** 2)
    np.testing.assert_array_equal((~mask).sum(axis=1), np.full(4, kept_units * 16))
    unit_sums = mask.reshape(4, units_per_side, 4, units_per_side, 4).sum(axis=(2, 4))
    assert np.all((unit_sums == 0) | (unit_sums == 16))


def test_window_mask_units_equally_likely():
    # Over 4096 samples each of the 196 units is masked with frequency 0.75 (std about 0.007).
    mask = draw(6, 4096, 224).reshape(4096, 14, 4, 14, 4)[:, :, 0, :, 0]
    frequency = mask.mean(axis=0)

    assert np.all(np.abs(frequency - 0.75) < 0.04), frequency


def test_window_mask_jit_sharded_matches_eager():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    sharded_mask = jax.jit(
        lambda key: masking.window_mask(key, 16, 224), out_shardings=batch_sharding
    )(jax.random.key(7))

    assert sharded_mask.sharding.is_equivalent_to(batch_sharding, 2)
    np.testing.assert_array_equal(np.asarray(sharded_mask), draw(7, 16, 224))


def test_window_mask_invalid_image_size():
    with pytest.raises(ValueError, match=r"image_size=200.*multiple of mask_unit=16"):
        masking.window_mask(jax.random.key(0), 2, 200)


def test_window_mask_invalid_unit():
    with pytest.raises(ValueError, match=r"mask_unit=10.*patch_size=4"):
        masking.window_mask(jax.random.key(0), 2, 240, mask_unit=10)


def test_window_mask_invalid_ratio():
    with pytest.raises(ValueError, match=r"mask_ratio=1.5"):
        masking.window_mask(jax.random.key(0), 2, 224, mask_ratio=1.5)
