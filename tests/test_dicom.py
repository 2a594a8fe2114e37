"""DICOM decoding on the real files shipped with pydicom and pydicom-data."""

import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from vismae_jax.data import dicom
from vismae_jax.data.images import DecodeOptions, RejectedFile, luminance

OPTIONS = DecodeOptions(image_size=64)


def read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name))


def unit_frames(path: str, options: DecodeOptions = OPTIONS) -> list[np.ndarray]:
    """Display-ready float frames in [0, 1] before resizing."""
    _, decoded = dicom.decode_dicom_frames(path, options)
    return [unit for _, _, unit in decoded]


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR window written out directly as the test oracle."""
    low = center - 0.5 - (width - 1) / 2
    return np.clip((values.astype(np.float64) - low) / (width - 1), 0.0, 1.0)


def test_monochrome1_inverted_bone_bright():
    ds = read("RG1_UNCR.dcm")
    unit = unit_frames(get_testdata_file("RG1_UNCR.dcm"))[0]
    expected = 1.0 - linear_window(ds.pixel_array, 15000.0, 30000.0)
    np.testing.assert_allclose(unit, expected, atol=1e-5)

    height, width = unit.shape
    spine = unit[int(0.45 * height) : int(0.55 * height), int(0.48 * width) : int(0.52 * width)]
    lung = unit[int(0.35 * height) : int(0.45 * height), int(0.25 * width) : int(0.32 * width)]
    assert spine.mean() > lung.mean() + 0.1


def test_monochrome1_rescale_and_window(tmp_path):
    # Doubling the stored values through Rescale Slope/Intercept and moving the window with them
    # must give the same picture as the original file.
    ds = read("RG3_UNCR.dcm")
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -100
    ds.WindowCenter = 2 * 550 - 100
    ds.WindowWidth = 2 * 1024 - 1
    path = tmp_path / "rescaled.dcm"
    ds.save_as(path)

    original = unit_frames(get_testdata_file("RG3_UNCR.dcm"))[0]
    rescaled = unit_frames(str(path))[0]
    np.testing.assert_allclose(rescaled, original, atol=2e-3)
    assert original.min() < 0.1  # Bone-free air behind the leg stays dark.
    assert np.mean(original > 0.99) > 0.1  # Collimated border renders white in MONOCHROME1.


def test_ct_several_windows_uses_first():
    path = get_testdata_file("bad_sequence.dcm")
    ds = read("bad_sequence.dcm")
    hounsfield = ds.pixel_array * 1.0 - 1024.0
    unit = unit_frames(path)[0]
    np.testing.assert_allclose(unit, linear_window(hounsfield, 40, 350), atol=1e-5)
    assert not np.allclose(unit, linear_window(hounsfield, 450, 1500), atol=1e-2)


def test_enhanced_ct_functional_groups():
    path = get_testdata_file("eCT_Supplemental.dcm")
    ds = read("eCT_Supplemental.dcm")
    frames = unit_frames(path)
    assert len(frames) == 2
    for raw, unit in zip(ds.pixel_array, frames, strict=True):
        expected = linear_window(raw * 1.0 - 1024.0, 49.0, 102.0)
        np.testing.assert_allclose(unit, expected, atol=1e-5)
        assert 0.05 < unit.mean() < 0.95


def test_ct_without_window_uses_default():
    path = get_testdata_file("CT_small.dcm")
    ds = read("CT_small.dcm")
    options = DecodeOptions(image_size=64, ct_window=(50.0, 500.0))
    unit = unit_frames(path, options)[0]
    hounsfield = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(unit, linear_window(hounsfield, 50.0, 500.0), atol=1e-5)


def test_mr_without_window_uses_percentiles():
    path = get_testdata_file("emri_small.dcm")
    frames = unit_frames(path, DecodeOptions(image_size=64, percentiles=(1.0, 99.0)))
    assert len(frames) == 10
    for unit in frames:
        assert np.mean(unit == 0.0) == pytest.approx(0.01, abs=0.01)
        assert np.mean(unit == 1.0) == pytest.approx(0.01, abs=0.01)


def test_voi_lut_sequence_monotonic():
    path = get_testdata_file("vlut_04.dcm")
    raw = read("vlut_04.dcm").pixel_array.astype(np.float64)
    unit = unit_frames(path)[0]
    assert unit.min() == 0.0
    assert unit.max() == 1.0
    assert np.corrcoef(raw.ravel(), unit.ravel())[0, 1] > 0.99


def test_palette_ultrasound_two_frames():
    path = get_testdata_file("OBXXXX1A_2frame.dcm")
    ds = read("OBXXXX1A_2frame.dcm")
    frames = unit_frames(path)
    assert len(frames) == 2
    rgb = pydicom.pixels.apply_color_lut(ds.pixel_array[1], ds).astype(np.float64) / 65535.0
    np.testing.assert_allclose(frames[1], rgb, atol=1e-5)
    assert luminance(frames[1]).max() > 0.5


@pytest.mark.parametrize("name", ["OBXXXX1A_2frame.dcm", "gdcm-US-ALOKA-16.dcm"])
def test_palette_equals_pydicom(name):
    # 8-bit indices with a plain palette, 16-bit indices with a segmented one.
    ds = read(name)
    frame = ds.pixel_array[0] if ds.pixel_array.ndim == 3 else ds.pixel_array
    dicom.clear_palette_cache()
    unit = dicom.frame_to_unit(frame, ds, 0, OPTIONS)
    rgb = pydicom.pixels.apply_color_lut(frame, ds).astype(np.float64) / 65535.0
    np.testing.assert_array_equal(unit, rgb.astype(np.float32))


def test_palette_cache_keyed_by_content():
    # Expanded palettes are reused across files, but never for a file with another palette.
    original = read("OBXXXX1A_2frame.dcm")
    reversed_red = read("OBXXXX1A_2frame.dcm")
    red = np.frombuffer(reversed_red.RedPaletteColorLookupTableData, dtype="<u2")
    reversed_red.RedPaletteColorLookupTableData = red[::-1].tobytes()
    frame = original.pixel_array[0]

    dicom.clear_palette_cache()
    for ds in (original, reversed_red, original):
        unit = dicom.frame_to_unit(frame, ds, 0, OPTIONS)
        rgb = pydicom.pixels.apply_color_lut(frame, ds).astype(np.float64) / 65535.0
        np.testing.assert_array_equal(unit, rgb.astype(np.float32))


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_window_table_equals_per_pixel(function, photometric):
    # A 512 x 512 signed CT frame goes through a table of its stored values. The result must
    # equal windowing every pixel, bit for bit.
    ds = read("693_UNCR.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = 0.75, -1000.5
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = -200.0, 1500.0, function
    ds.PhotometricInterpretation = photometric
    frame = ds.pixel_array
    unit = dicom.frame_to_unit(frame, ds, 0, OPTIONS)

    values = pydicom.pixels.apply_modality_lut(frame, ds)
    expected = dicom.apply_window(values, -200.0, 1500.0, function)
    if photometric == "MONOCHROME1":
        expected = 1.0 - expected
    assert frame.min() < 0 < frame.max()
    np.testing.assert_array_equal(unit, expected)


def test_window_width_one_is_threshold():
    # LINEAR with width 1: values up to center - 0.5 map to 0, values above it to 1. The
    # threshold falls exactly on a stored value here, which must give 0 and not NaN.
    ds = read("MR_small.dcm")
    frame = ds.pixel_array
    threshold = int(np.median(frame))
    ds.WindowCenter, ds.WindowWidth = threshold + 0.5, 1.0
    unit = dicom.frame_to_unit(frame, ds, 0, OPTIONS)

    assert (frame == threshold).any()
    np.testing.assert_array_equal(unit, (frame > threshold).astype(np.float32))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_window_narrower_than_one(function):
    # LINEAR_EXACT and SIGMOID accept any positive width, unlike LINEAR.
    ds = read("MR_small.dcm")
    frame = ds.pixel_array
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 600.0, 0.5, function
    unit = dicom.frame_to_unit(frame, ds, 0, OPTIONS)
    expected = dicom.apply_window(frame, 600.0, 0.5, function)
    np.testing.assert_array_equal(unit, expected)


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        ("uint8", 0, 255),  # Table from 0, indexed by the stored values.
        ("uint16", 40000, 44000),  # Table from the minimum.
        (">u2", 100, 3000),  # Big-endian stored values.
        ("int16", -20000, 20000),  # Offsets past the int16 maximum wrap to unsigned.
        ("int32", 2**31 - 4000, 2**31 - 1),  # Offsets near the top of the dtype.
    ],
)
def test_map_stored_values_table(dtype, low, high, monkeypatch):
    monkeypatch.setattr(dicom, "_GATHER_CHUNK", 7001)  # Many chunks and a shorter last one.
    stored = np.random.default_rng(0).integers(low, high, (300, 300), endpoint=True).astype(dtype)
    sizes = []

    def function(values):
        sizes.append(values.size)
        return (np.sqrt(np.abs(values.astype(np.float64))) * 0.1).astype(np.float32)

    mapped = dicom.map_stored_values(stored, function)
    assert sizes[0] < stored.size  # The function ran on a table, not on the frame.
    np.testing.assert_array_equal(mapped, function(stored))


def test_map_stored_values_int64_maximum():
    # The table runs up to the int64 maximum, where high + 1 no longer fits in int64.
    stored = np.array([2**63 - 1, 2**63 - 2] * 8, dtype=np.int64)
    mapped = dicom.map_stored_values(stored, lambda values: (values % 1000).astype(np.float32))
    np.testing.assert_array_equal(mapped, np.array([807, 806] * 8, dtype=np.float32))


def test_map_stored_values_wide_range_direct():
    stored = np.arange(-50, 50, dtype=np.int32) * 1000  # 100 pixels spanning 99,001 values.
    sizes = []

    def function(values):
        sizes.append(values.size)
        return values.astype(np.float32) / 7.0

    mapped = dicom.map_stored_values(stored, function)
    np.testing.assert_array_equal(mapped, stored.astype(np.float32) / 7.0)
    assert sizes == [stored.size]


def test_ybr_multiframe_luminance_is_y():
    path = get_testdata_file("examples_ybr_color.dcm")
    decoded = dicom.decode_dicom(path, OPTIONS)
    assert [f.frame for f in decoded.frames] == list(range(30))
    assert decoded.modality == "us"

    # The Y plane of YBR_FULL is the BT.601 luma, so it must match our luminance of the RGB.
    luma = pydicom.pixels.pixel_array(path, index=4, raw=True)[..., 0] / 255.0
    gray = luminance(unit_frames(path)[4])
    assert np.abs(gray - luma).mean() < 2.0 / 255.0


def test_max_frames_evenly_spaced():
    path = get_testdata_file("examples_ybr_color.dcm")
    decoded = dicom.decode_dicom(path, DecodeOptions(image_size=32, max_frames=4))
    assert [f.frame for f in decoded.frames] == [0, 10, 19, 29]


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ],
)
def test_mr_small_encodings_identical(name):
    reference = dicom.decode_dicom(get_testdata_file("MR_small.dcm"), OPTIONS)
    decoded = dicom.decode_dicom(get_testdata_file(name), OPTIONS)
    np.testing.assert_array_equal(decoded.frames[0].image, reference.frames[0].image)
    assert decoded.frames[0].pixel_hash == reference.frames[0].pixel_hash


def test_stored_image_shape_and_modality():
    decoded = dicom.decode_dicom(get_testdata_file("MR_small.dcm"), OPTIONS)
    assert decoded.modality == "mr"
    assert (decoded.height, decoded.width) == (64, 64)
    assert decoded.frames[0].image.shape == (64, 64, 1)
    assert decoded.frames[0].image.dtype == np.uint8


def test_keep_colour_stores_rgb():
    options = DecodeOptions(image_size=32, keep_colour=True)
    colour = dicom.decode_dicom(get_testdata_file("US1_UNCR.dcm"), options).frames[0].image
    gray = dicom.decode_dicom(get_testdata_file("MR_small.dcm"), options).frames[0].image
    assert colour.shape == (32, 32, 3)
    assert np.abs(colour[..., 0].astype(int) - colour[..., 2]).max() > 20
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("MR_truncated.dcm", "truncated_pixel_data"),
        ("JPEG-lossy.dcm", "decode_failed"),
        ("no_meta.dcm", "not_dicom"),
        ("badVR.dcm", "non_image"),
        ("rtplan.dcm", "non_image"),
        ("reportsi.dcm", "non_image"),
        ("liver.dcm", "non_image"),
    ],
)
def test_broken_files_rejected(name, category):
    with pytest.raises(RejectedFile) as raised:
        dicom.decode_dicom(get_testdata_file(name), OPTIONS)
    assert raised.value.category == category
    assert raised.value.detail


def test_empty_dataset_rejected(tmp_path):
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "empty.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(RejectedFile) as raised:
        dicom.decode_dicom(str(path), OPTIONS)
    # The file meta declares Secondary Capture Image Storage, an image object.
    assert raised.value.category == "missing_pixel_data"


@pytest.mark.parametrize("content", [b"", b"\x00" * 200, b"not a dicom file at all"])
def test_unreadable_files_rejected(tmp_path, content):
    path = tmp_path / "broken.dcm"
    path.write_bytes(content)
    with pytest.raises(RejectedFile) as raised:
        dicom.decode_dicom(str(path), OPTIONS)
    assert raised.value.category in ("not_dicom", "unreadable")


def test_corpus_modality_names():
    assert dicom.corpus_modality("CT") == "ct"
    assert dicom.corpus_modality("PT") == "pet"
    assert dicom.corpus_modality("NM") == "pet"
    assert dicom.corpus_modality("CR") == "xray"
    assert dicom.corpus_modality("DX") == "xray"
    assert dicom.corpus_modality("US") == "us"
    assert dicom.corpus_modality("OT") == "other"
    assert dicom.corpus_modality(None) == "other"
