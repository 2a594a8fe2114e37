"""Decode DICOM files into display-ready training images.

Per frame: stored pixels -> modality LUT (rescale or Modality LUT Sequence, per frame for
enhanced multi-frame objects) -> VOI transform to [0, 1] (the first window, or the first VOI
LUT) -> MONOCHROME1 inversion -> luminance unless colour is kept -> resize -> uint8.
"""

import collections
import functools
import hashlib
import io
import logging
import struct
import warnings
import zlib
from typing import BinaryIO

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.pixels import apply_color_lut, apply_modality_lut, iter_pixels
from pydicom.pixels.utils import get_expected_length, get_nr_frames

from vismae_jax.data.images import (
    DecodedFile,
    DecodedFrame,
    DecodeOptions,
    RejectedFile,
    check_frame_size,
    percentile_window,
    pixel_hash,
    range_to_unit,
    select_frames,
    to_stored_image,
)

# pydicom's warnings about malformed elements quote the element value, which can be a patient
# name or ID; keep them out of logs. Reject reasons report what matters.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

# DICOM Modality (0008,0060) -> corpus modality. Everything else is stored as "other".
MODALITY_NAMES = {
    "CT": "ct",
    "MR": "mr",
    "PT": "pet",
    "NM": "pet",
    "CR": "xray",
    "DX": "xray",
    "DR": "xray",
    "RG": "xray",
    "MG": "xray",
    "RF": "xray",
    "XA": "xray",
    "PX": "xray",
    "IO": "xray",
    "US": "us",
    "IVUS": "us",
}
CORPUS_MODALITIES = ("ct", "mr", "pet", "xray", "us", "other")

# Objects whose pixels (if any) are not pictures of anatomy: dose grids, label maps, reports,
# plans, waveforms, presentation states.
NON_IMAGE_MODALITIES = {
    "SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "KO", "PR", "REG",
    "ECG", "HD", "DOC", "PLAN", "RWV", "AU", "FID",
}  # fmt: skip

# Attributes the LUT steps read; enhanced multi-frame objects keep them in functional groups.
_LUT_GROUPS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_COLOUR_PHOTOMETRICS = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}


def corpus_modality(dicom_modality: str | None) -> str:
    """Map a DICOM Modality value (CT, MR, PT, NM, CR, DX, US, ...) to a corpus modality."""
    return MODALITY_NAMES.get((dicom_modality or "").strip().upper(), "other")


def _error_name(error: BaseException) -> str:
    """Return the exception's class name, with its module unless built in (zlib.error)."""
    module = type(error).__module__
    name = type(error).__name__
    return name if module == "builtins" else f"{module}.{name}"


def _sop_class_name(ds: Dataset) -> str:
    """Return the registered name of the SOP Class UID (from the file meta if need be).

    An unregistered UID is not quoted: a hostile file could put any text there.
    """
    file_meta = getattr(ds, "file_meta", None) or Dataset()
    for uid in (ds.get("SOPClassUID"), file_meta.get("MediaStorageSOPClassUID")):
        if isinstance(uid, pydicom.uid.UID) and uid.keyword:
            return uid.name
    return "unknown SOP class"


def read_dataset(path: str | BinaryIO) -> Dataset:
    """Read a DICOM Part 10 file (a name or an open binary file).

    Raises RejectedFile for unreadable files and non-image objects.
    """
    try:
        ds = pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError as error:
        raise RejectedFile(
            "not_dicom", "no DICOM preamble and file meta information (not a Part 10 file)"
        ) from error
    except (
        OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
        OverflowError, NotImplementedError, zlib.error,
    ) as error:  # fmt: skip
        raise RejectedFile(
            "unreadable", f"pydicom could not parse the file ({_error_name(error)})"
        ) from error

    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop_class_name = _sop_class_name(ds)
    if modality in NON_IMAGE_MODALITIES:
        raise RejectedFile("non_image", f"{modality} object ({sop_class_name})")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise RejectedFile("unsupported", "float pixel data (parametric map)")
        if sop_class_name.endswith("Image Storage"):
            raise RejectedFile(
                "missing_pixel_data",
                f"{sop_class_name} object without Pixel Data (a truncated file?)",
            )
        raise RejectedFile("non_image", f"no pixel data ({sop_class_name})")
    if int(ds.get("BitsAllocated", 0) or 0) == 1:
        raise RejectedFile("non_image", f"1-bit pixel data is a binary mask ({sop_class_name})")
    return ds


def frame_attributes(ds: Dataset, frame: int) -> Dataset:
    """Collect the modality LUT and VOI attributes that apply to one frame.

    Enhanced multi-frame objects store rescale and window in the Pixel Value Transformation and
    Frame VOI LUT functional groups. Per-frame groups take precedence over shared groups, and
    both take precedence over the top-level attributes of classic objects.
    """
    attributes = Dataset()
    for keyword in (
        "RescaleSlope", "RescaleIntercept", "ModalityLUTSequence", "VOILUTSequence",
        "WindowCenter", "WindowWidth", "VOILUTFunction",
    ):  # fmt: skip
        if keyword in ds:
            attributes[keyword] = ds[keyword]
    if hasattr(ds, "file_meta"):
        attributes.file_meta = ds.file_meta
    attributes.set_original_encoding(*ds.original_encoding)

    group_items = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        group_items.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        group_items.append(per_frame[frame])

    for item in group_items:
        for group in _LUT_GROUPS:
            if item.get(group):
                for element in item[group][0]:
                    attributes[element.tag] = element
    return attributes


def _first_value(value) -> float:
    """Return the first of a multi-valued number (several windows are alternative views)."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0]
    return float(value)


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """Map values through a DICOM window (PS3.3 C.11.2.1.2) to float32 in [0, 1].

    function: LINEAR (the default), LINEAR_EXACT or SIGMOID.
    """
    values = values.astype(np.float64)
    if function == "SIGMOID":
        # Far below the center, exp overflows to inf, which gives the correct 0.
        with np.errstate(over="ignore"):
            mapped = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        mapped = (values - center) / width + 0.5
    elif width == 1.0:
        # A threshold: values up to center - 0.5 map to 0, values above it to 1. The formula
        # below would divide 0 by 0 for a value of exactly center - 0.5.
        mapped = (values > center - 0.5).astype(np.float64)
    else:
        mapped = (values - (center - 0.5)) / (width - 1.0) + 0.5
    return np.clip(mapped, 0.0, 1.0).astype(np.float32)


def _lut_table(item: Dataset, attributes: Dataset) -> tuple[int, int, np.ndarray]:
    """Return (number of entries, first mapped value, table) of a VOI LUT Sequence item."""
    num_entries, first_mapped = int(item.LUTDescriptor[0]), int(item.LUTDescriptor[1])
    num_entries = num_entries or 2**16
    data = item["LUTData"]
    if data.VR == "OW" and isinstance(data.value, bytes):
        little_endian = attributes.original_encoding[1] is not False
        table = np.frombuffer(data.value, dtype="<u2" if little_endian else ">u2")
    else:
        table = np.asarray(data.value, dtype=np.float64).reshape(-1)
    if first_mapped > 2**15 and int(item.LUTDescriptor[2]) <= 16:
        first_mapped -= 2**16  # US-encoded descriptor holding a signed first value.
    return num_entries, first_mapped, table[:num_entries].astype(np.float64)


def apply_voi_lut_sequence(values: np.ndarray, attributes: Dataset) -> np.ndarray:
    """Map values through the first VOI LUT and scale the LUT's output range to [0, 1].

    The scale comes from the table's own minimum and maximum: some descriptors claim 16 bits
    for tables that only reach 4095.
    """
    num_entries, first_mapped, table = _lut_table(attributes.VOILUTSequence[0], attributes)
    indices = np.clip(np.rint(values).astype(np.int64) - first_mapped, 0, len(table) - 1)
    low, high = table.min(), table.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return ((table[indices] - low) / (high - low)).astype(np.float32)


def voi_function(attributes: Dataset, modality: str, options: DecodeOptions):
    """Return the VOI transform of the header, or the configured default, as a function.

    The function maps modality LUT output values elementwise to float32 in [0, 1]. Order of
    preference: VOI LUT Sequence, the first Window Center/Width pair, the CT default window
    (`options.ct_window`) for CT. Returns None when the percentile range applies instead, which
    depends on the statistics of the whole frame.
    """
    if attributes.get("VOILUTSequence"):
        item = attributes.VOILUTSequence[0]
        if item.get("LUTDescriptor") and item.get("LUTData") is not None:
            return functools.partial(apply_voi_lut_sequence, attributes=attributes)

    center = attributes.get("WindowCenter")
    width = attributes.get("WindowWidth")
    if center is not None and width is not None and center != "" and width != "":
        center, width = _first_value(center), _first_value(width)
        function = str(attributes.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        # The DICOM standard requires a width of at least 1 for LINEAR, and only a positive
        # width for LINEAR_EXACT and SIGMOID.
        if width >= 1.0 or (function in ("LINEAR_EXACT", "SIGMOID") and width > 0.0):
            return functools.partial(apply_window, center=center, width=width, function=function)

    if modality == "ct":
        center, width = options.ct_window
        return functools.partial(apply_window, center=center, width=width, function="LINEAR")
    return None


def voi_to_unit(values: np.ndarray, attributes: Dataset, modality: str, options: DecodeOptions):
    """Apply the VOI transform of the header, or the configured default, giving [0, 1].

    Order of preference: VOI LUT Sequence, the first Window Center/Width pair, the CT default
    window (`options.ct_window`) for CT, the percentile range (`options.percentiles`) otherwise.
    """
    voi = voi_function(attributes, modality, options)
    if voi is None:
        return percentile_window(values, options.percentiles)
    return voi(values)


def _native_and_unsigned(dtype: np.dtype) -> tuple[np.dtype, np.dtype]:
    """Return the integer `dtype` in native byte order and the unsigned dtype of its width."""
    native = dtype.newbyteorder("=")
    return native, np.dtype(f"u{native.itemsize}")


def _as_unsigned(value: int, unsigned: np.dtype):
    """Return `value` modulo 2**bits as a scalar of the dtype `unsigned`."""
    return unsigned.type(value % 2 ** (8 * unsigned.itemsize))


def _unsigned_offsets(values: np.ndarray, low: int) -> np.ndarray:
    """Return `values - low` as unsigned integers of the same width as the integer `values`.

    The subtraction wraps modulo 2**bits, which is exact for every value in [low, low + 2**bits).
    """
    native, unsigned = _native_and_unsigned(values.dtype)
    return values.astype(native, copy=False).view(unsigned) - _as_unsigned(low, unsigned)


def map_stored_values(stored: np.ndarray, function) -> np.ndarray:
    """Return `function(stored)`, computed through a lookup table when that takes less work.

    stored: stored values of any shape and dtype. function: maps each element on its own, with
    no statistics over the array. The table applies to integer arrays whose value range spans at
    most half as many values as they have elements. `function` then runs once per value of that
    range, and the result is gathered from that table, so it equals `function(stored)` bit for
    bit.
    """
    if stored.dtype.kind not in "iu" or stored.size == 0:
        return function(stored)
    low, high = int(stored.min()), int(stored.max())
    if 2 * (high - low + 1) > stored.size:
        return function(stored)

    if stored.dtype.kind == "u" and 2 * (high + 1) <= stored.size:
        low = 0  # Index with the stored values themselves, saving a subtraction per pixel.
    table = function(_value_range(low, high, stored.dtype))
    return _gather(table, stored, low)


def _value_range(low: int, high: int, dtype: np.dtype) -> np.ndarray:
    """Return the integers low, low + 1, ..., high as an array of the integer `dtype`.

    The values are built in the unsigned type of the same width, so high may be the largest
    value of a 64-bit dtype. There, np.arange(low, high + 1) would round through float64.
    """
    native, unsigned = _native_and_unsigned(dtype)
    values = np.arange(high - low + 1, dtype=unsigned) + _as_unsigned(low, unsigned)
    return values.view(native).astype(dtype, copy=False)


# Elements gathered per np.take call: its int64 copy of the indices (1 MiB) stays in the CPU
# cache, and an 8192 x 8192 frame needs no 512 MiB copy of them.
_GATHER_CHUNK = 2**17


def _gather(table: np.ndarray, stored: np.ndarray, low: int) -> np.ndarray:
    """Return table[stored - low] for integer `stored` within [low, low + len(table))."""
    out = np.empty(stored.shape + table.shape[1:], dtype=table.dtype)
    flat_out = out.reshape((-1,) + table.shape[1:])
    flat_stored = stored.reshape(-1)  # A copy only when `stored` is not contiguous.
    for start in range(0, flat_stored.size, _GATHER_CHUNK):
        chunk = flat_stored[start : start + _GATHER_CHUNK]
        offsets = chunk if low == 0 else _unsigned_offsets(chunk, low)
        # Every offset is in range, so "clip" changes nothing and lets np.take skip buffering.
        np.take(table, offsets, axis=0, out=flat_out[start : start + _GATHER_CHUNK], mode="clip")
    return out


def _integer_to_unit(values: np.ndarray, scale: float) -> np.ndarray:
    """Divide colour samples by their full-scale value, giving float32 clipped to [0, 1]."""
    return (values.astype(np.float64) / max(float(scale), 1.0)).clip(0.0, 1.0).astype(np.float32)


# Elements that pydicom's apply_color_lut reads, besides the byte order of the file.
_PALETTE_KEYWORDS = (
    "PixelPresentation",
    "RedPaletteColorLookupTableDescriptor",
    "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData",
    "BluePaletteColorLookupTableData",
    "AlphaPaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData",
    "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData",
    "SegmentedAlphaPaletteColorLookupTableData",
)
# Expanded palettes, keyed by a digest of the palette elements. Files from one scanner share a
# palette, and pydicom 3.0.2 expands a segmented palette in Python: about 30 ms for
# gdcm-US-ALOKA-16.dcm, longer than the rest of that file's decoding. 8 tables of
# 65536 x 4 float32 entries take at most 8 MiB.
_PALETTE_TABLES: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
_PALETTE_CACHE_SIZE = 8


def _palette_key(ds: Dataset, dtype: np.dtype) -> bytes:
    """Return a digest of everything the expanded palette depends on, for indices of `dtype`."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{dtype.str}{ds.original_encoding}".encode())
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None:
        # The transfer syntax fixes the byte order of the palette data.
        digest.update(str(file_meta.get("TransferSyntaxUID")).encode())
    for keyword in _PALETTE_KEYWORDS:
        value = ds.get(keyword)
        if isinstance(value, pydicom.multival.MultiValue):
            value = list(value)
        data = value if isinstance(value, bytes) else repr(value).encode()
        digest.update(f"{keyword}:{len(data)}:".encode())
        digest.update(data)
    return digest.digest()


def _palette_to_unit(frame: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the palette colour LUT to indices [H, W], giving float32 [H, W, C] in [0, 1].

    8- and 16-bit indices go through a table of every possible index, expanded once per
    palette with pydicom's apply_color_lut, so values equal those of apply_color_lut itself.
    """
    if frame.dtype.kind not in "iu" or frame.dtype.itemsize > 2:
        return _apply_palette(frame, ds)
    dtype = frame.dtype.newbyteorder("=")
    key = _palette_key(ds, dtype)
    table = _PALETTE_TABLES.get(key)
    if table is None:
        info = np.iinfo(dtype)
        table = _apply_palette(np.arange(info.min, info.max + 1).astype(dtype), ds)
        _PALETTE_TABLES[key] = table
        if len(_PALETTE_TABLES) > _PALETTE_CACHE_SIZE:
            _PALETTE_TABLES.popitem(last=False)
    else:
        _PALETTE_TABLES.move_to_end(key)
    return _gather(table, frame, int(np.iinfo(dtype).min))


def _apply_palette(indices: np.ndarray, ds: Dataset) -> np.ndarray:
    """Map palette indices to RGB (or RGBA) float32 in [0, 1] with pydicom's apply_color_lut."""
    # NOTE: pydicom 3.0.2 reads OW palette tables of big-endian files in little-endian byte
    # order, so OBXXXX1A_expb.dcm decodes almost black; big endian is retired since 2004.
    rgb = apply_color_lut(indices, ds)
    scale = np.iinfo(rgb.dtype).max if np.issubdtype(rgb.dtype, np.integer) else rgb.max()
    return _integer_to_unit(rgb, scale)


def _colour_to_unit(frame: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Scale an RGB (or palette) frame to float [H, W, 3] in [0, 1]."""
    if photometric == "PALETTE COLOR":
        return _palette_to_unit(frame, ds)
    return _integer_to_unit(frame, 2 ** int(ds.get("BitsStored", 8)) - 1)


def frame_to_unit(frame: np.ndarray, ds: Dataset, index: int, options: DecodeOptions):
    """Turn one decoded frame into a display-ready float image in [0, 1].

    frame: stored values [H, W] (grayscale or palette indices) or [H, W, 3] (RGB after pydicom's
    YBR conversion). Returns float32 [H, W] or [H, W, 3].
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric in _COLOUR_PHOTOMETRICS or frame.ndim == 3:
        return _colour_to_unit(frame, ds, photometric)

    attributes = frame_attributes(ds, index)
    modality = corpus_modality(ds.get("Modality"))
    voi = voi_function(attributes, modality, options)
    if voi is None:
        low, high = np.percentile(apply_modality_lut(frame, attributes), options.percentiles)
        voi = functools.partial(range_to_unit, low=low, high=high)

    def stored_to_unit(stored: np.ndarray) -> np.ndarray:
        unit = voi(apply_modality_lut(stored, attributes))
        return 1.0 - unit if photometric == "MONOCHROME1" else unit

    return map_stored_values(frame, stored_to_unit)


def _positive_int(ds: Dataset, keyword: str) -> int:
    """Return a required positive integer attribute, or raise RejectedFile naming it."""
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) == 1 else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        state = "missing" if value is None else "not a positive integer"
        raise RejectedFile("invalid_header", f"{keyword} is {state}")
    return value


def _count_fragments(ds: Dataset) -> int:
    """Return the number of fragments of encapsulated (compressed) Pixel Data."""
    little_endian = ds.original_encoding[1] is not False
    buffer = io.BytesIO(ds.PixelData)
    try:
        parse_basic_offsets(buffer, endianness="<" if little_endian else ">")
        return parse_fragments(buffer, endianness="<" if little_endian else ">")[0]
    except (ValueError, EOFError, struct.error) as error:
        raise RejectedFile(
            "decode_failed", "encapsulated pixel data has no valid item structure"
        ) from error


def check_pixel_attributes(ds: Dataset, options: DecodeOptions) -> int:
    """Check the Image Pixel attributes against each other and the Pixel Data length.

    Runs on the header only, before any pixel buffer is allocated, so a header that claims
    100000 x 100000 pixels or a billion frames costs nothing. Returns the number of frames.
    Raises RejectedFile (`invalid_header`, `too_large` or `truncated_pixel_data`).
    """
    rows = _positive_int(ds, "Rows")
    columns = _positive_int(ds, "Columns")
    check_frame_size(rows, columns, options)

    samples = _positive_int(ds, "SamplesPerPixel")
    if samples not in (1, 3):
        raise RejectedFile("invalid_header", f"Samples per Pixel is {samples}, not 1 or 3")
    bits_allocated = _positive_int(ds, "BitsAllocated")
    if bits_allocated not in (8, 16, 32, 64):
        raise RejectedFile(
            "invalid_header", f"Bits Allocated is {bits_allocated}, not 1, 8, 16, 32 or 64"
        )
    bits_stored = _positive_int(ds, "BitsStored")
    if bits_stored > bits_allocated:
        raise RejectedFile(
            "invalid_header", f"Bits Stored {bits_stored} exceeds Bits Allocated {bits_allocated}"
        )

    try:
        num_frames = get_nr_frames(ds, warn=False)
    except (ValueError, TypeError) as error:
        raise RejectedFile("invalid_header", "Number of Frames is not an integer") from error
    if num_frames < 1:
        raise RejectedFile("invalid_header", "Number of Frames is less than 1")

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is not None and syntax.is_compressed:
        num_fragments = _count_fragments(ds)
        if num_frames > num_fragments:
            raise RejectedFile(
                "invalid_header",
                f"Number of Frames {num_frames} exceeds the {num_fragments} pixel data fragments",
            )
    elif len(ds.PixelData) < get_expected_length(ds, unit="bytes"):
        raise RejectedFile("truncated_pixel_data", "pixel data is shorter than the header requires")
    return num_frames


def _iter_raw_frames(ds: Dataset, options: DecodeOptions):
    """Yield (frame number, stored values) for the selected frames, one frame in memory at once.

    Raises RejectedFile for invalid Image Pixel attributes, truncated pixel data and
    undecodable codestreams.
    """
    num_frames = check_pixel_attributes(ds, options)
    indices = select_frames(num_frames, options.max_frames)
    frames = iter_pixels(ds, indices=indices)
    for index in indices:
        try:
            frame = next(frames)
        except ValueError as error:
            if "less than" in str(error) or "too short" in str(error):
                raise RejectedFile(
                    "truncated_pixel_data", "pixel data is shorter than the header requires"
                ) from error
            raise RejectedFile(
                "decode_failed", f"pixel data could not be decoded ({type(error).__name__})"
            ) from error
        except (
            RuntimeError, NotImplementedError, AttributeError, KeyError, TypeError, StopIteration
        ) as error:  # fmt: skip
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            syntax_name = getattr(syntax, "name", "unknown transfer syntax")
            raise RejectedFile(
                "decode_failed", f"corrupt or unsupported pixel data ({syntax_name})"
            ) from error
        yield index, frame


def decode_dicom_frames(path: str | BinaryIO, options: DecodeOptions):
    """Return the dataset and (frame number, raw frame, display-ready frame) per selected frame.

    Raw frames are the stored values [H, W] or [H, W, 3]; display-ready frames are float32 in
    [0, 1] (see `frame_to_unit`). Keeps all frames in memory, for inspection and tests.

    Raises RejectedFile for non-image objects, truncated pixel data and undecodable
    codestreams.
    """
    ds = read_dataset(path)
    decoded = [
        (index, frame, frame_to_unit(frame, ds, index, options))
        for index, frame in _iter_raw_frames(ds, options)
    ]
    return ds, decoded


def decode_dicom(path: str | BinaryIO, options: DecodeOptions) -> DecodedFile:
    """Decode a DICOM file (a name or an open binary file) into stored images uint8 [S, S, C].

    Returns one stored image per selected frame. Frames are decoded one at a time, so long cine
    loops need memory for one raw frame only. Raises RejectedFile (with a reason that quotes no
    text from the header) for every file that yields no image.
    """
    with warnings.catch_warnings():
        # Malformed but readable headers make pydicom warn once per element; the rejects file
        # and summary already report what matters.
        warnings.simplefilter("ignore")
        ds = read_dataset(path)
        frames = []
        height = width = 0
        for index, raw in _iter_raw_frames(ds, options):
            height, width = raw.shape[:2]
            unit = frame_to_unit(raw, ds, index, options)
            stored = to_stored_image(unit, options)
            frames.append(DecodedFrame(frame=index, image=stored, pixel_hash=pixel_hash(raw)))
        if not frames:
            raise RejectedFile("non_image", "no frames in pixel data")
        return DecodedFile(
            modality=corpus_modality(ds.get("Modality")),
            height=int(height),
            width=int(width),
            frames=frames,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
        )


def clear_palette_cache() -> None:
    """Forget the expanded palettes kept across files (benchmarks time each run from cold)."""
    _PALETTE_TABLES.clear()
