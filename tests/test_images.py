"""PNG/JPEG/TIFF decoding and the resize-and-quantise step shared by all decoders."""

import numpy as np
import pytest
from PIL import Image

from vismae_jax.data import images
from vismae_jax.data.images import DecodeOptions, RejectedFile

OPTIONS = DecodeOptions(image_size=64)


def test_png16_ramp_keeps_levels(tmp_path):
    # A 12-bit ramp stored in a 16-bit PNG: an 8-bit conversion would clip it to white.
    ramp = np.tile(np.linspace(0, 4095, 256).round().astype(np.uint16), (64, 1))
    path = tmp_path / "ramp.png"
    Image.fromarray(ramp).save(path)

    decoded = images.decode_image_file(str(path), "xray", OPTIONS)
    row = decoded.frames[0].image[32, :, 0].astype(int)
    assert row.min() <= 3  # Shrinking 256 -> 64 columns averages four levels per pixel.
    assert row.max() >= 252
    assert np.all(np.diff(row) > 0)
    assert (decoded.height, decoded.width) == (64, 256)


def test_png16_full_range_untouched(tmp_path):
    ramp = np.tile(np.arange(0, 65536, 256, dtype=np.uint16), (64, 1))
    path = tmp_path / "full.png"
    Image.fromarray(ramp).save(path)
    stored = images.decode_image_file(str(path), "ct", DecodeOptions(image_size=256)).frames[0]
    expected = np.rint(ramp[0] / 65280.0 * 255.0)
    np.testing.assert_allclose(stored.image[10, :, 0], expected, atol=1)


def test_rgb_jpeg_luminance(tmp_path):
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # Pure green: luminance 0.587 * 200.
    path = tmp_path / "green.jpg"
    Image.fromarray(rgb).save(path, quality=100)

    gray = images.decode_image_file(str(path), "us", OPTIONS).frames[0].image
    assert gray.shape == (64, 64, 1)
    assert abs(int(gray[32, 32, 0]) - round(0.587 * 200)) <= 3

    colour_options = DecodeOptions(image_size=64, keep_colour=True)
    colour = images.decode_image_file(str(path), "us", colour_options).frames[0].image
    assert colour.shape == (64, 64, 3)
    assert colour[32, 32, 1] > 190
    assert colour[32, 32, 0] < 10


def test_letterbox_pads_black():
    wide = np.ones((32, 128), dtype=np.float32)
    stored = images.to_stored_image(wide, DecodeOptions(image_size=64, letterbox=True))
    assert stored.shape == (64, 64, 1)
    assert np.all(stored[:24] == 0)
    assert np.all(stored[40:] == 0)
    assert np.all(stored[24:40] == 255)


def test_stretch_fills_square():
    wide = np.ones((32, 128), dtype=np.float32)
    stored = images.to_stored_image(wide, OPTIONS)
    assert np.all(stored == 255)


def test_resize_antialiased():
    # A one-pixel checkerboard must average to mid-gray when shrunk, not alias to black/white.
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    stored = images.to_stored_image(checker, OPTIONS)
    assert np.abs(stored.astype(int) - 128).max() <= 2


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.fromarray(np.full((16, 16), value, dtype=np.uint8)) for value in (0, 100, 200)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    decoded = images.decode_image_file(str(path), "mr", OPTIONS)
    assert [f.frame for f in decoded.frames] == [0, 1, 2]
    assert [int(f.image[0, 0, 0]) for f in decoded.frames] == [0, 100, 200]
    assert len({f.pixel_hash for f in decoded.frames}) == 3


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_broken_image_rejected(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(RejectedFile) as raised:
        images.decode_image_file(str(path), "xray", OPTIONS)
    assert raised.value.category == "unreadable"


def test_pixel_hash_ignores_byte_order():
    values = np.arange(12, dtype="<u2").reshape(3, 4)
    assert images.pixel_hash(values) == images.pixel_hash(values.astype(">u2"))
    assert images.pixel_hash(values) != images.pixel_hash(values.T)


def test_pixel_hash_stable():
    # Shard files store these keys and a resumed run compares against them, so the digest of
    # given pixels must not change between versions.
    values = np.arange(12, dtype="<u2").reshape(3, 4)
    assert images.pixel_hash(values) == "0861779bffd792739b3ce972c95fd10d"
    assert images.pixel_hash(values.T) == images.pixel_hash(np.ascontiguousarray(values.T))


def test_select_frames():
    assert images.select_frames(5, 0) == [0, 1, 2, 3, 4]
    assert images.select_frames(5, 10) == [0, 1, 2, 3, 4]
    assert images.select_frames(10, 3) == [0, 4, 9]
