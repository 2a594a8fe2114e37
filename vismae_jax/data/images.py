"""Turn display-ready pixel arrays into stored uint8 training images, and decode PNG/JPEG/TIFF.

Every decoder in this package produces float images in [0, 1]; `to_stored_image` resizes them
to the square training size with anti-aliasing and quantises them to uint8 [S, S, C].
"""

import dataclasses
import hashlib
from typing import BinaryIO

import numpy as np
from PIL import Image

# ITU-R BT.601 luma weights, the usual grayscale conversion for RGB images.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)

# Pillow reads these extensions; prepare treats every other non-DICOM file as unsupported.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class RejectedFile(Exception):
    """A file that yields no training image.

    `category` is a short key counted in summary.json (for example `truncated_pixel_data`).
    `detail` is a description that quotes no text from the file or its path, so it contains no
    patient data. It may state numeric image attributes such as Rows or Bits Allocated.
    """

    def __init__(self, category: str, detail: str):
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail

    @property
    def reason(self) -> str:
        return f"{self.category}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Settings that turn raw pixels into stored training images (DICOM and PNG/JPEG/TIFF)."""

    image_size: int = 224  # Side of the square stored image in pixels.
    keep_colour: bool = False  # Store RGB (C=3, gray replicated); False stores luminance (C=1).
    letterbox: bool = False  # Keep the aspect ratio and pad with black; False stretches.
    ct_window: tuple[float, float] = (40.0, 400.0)  # (center, width) in HU for CT without one.
    percentiles: tuple[float, float] = (0.5, 99.5)  # Range mapped to [0, 1] without a window.
    max_frames: int = 0  # Frames kept per multi-frame file, evenly spaced; 0 keeps all.
    # Largest frame accepted, in pixels (rows x columns), checked on the header before any
    # pixel buffer is allocated. 8192 x 8192 covers full-field mammograms and large CR plates.
    max_pixels: int = 8192 * 8192

    @property
    def channels(self) -> int:
        return 3 if self.keep_colour else 1


@dataclasses.dataclass
class DecodedFrame:
    """One stored image: `image` uint8 [S, S, C], its frame number and a hash of its raw pixels."""

    frame: int
    image: np.ndarray
    pixel_hash: str


@dataclasses.dataclass
class DecodedFile:
    """All stored images of one source file, with the original frame size and identifiers."""

    modality: str
    height: int
    width: int
    frames: list[DecodedFrame]
    sop_instance_uid: str | None = None


def pixel_hash(pixels: np.ndarray) -> str:
    """Hash raw pixels independent of byte order, so re-encoded copies of a frame match."""
    native = np.ascontiguousarray(pixels, dtype=pixels.dtype.newbyteorder("="))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{native.dtype.str}{native.shape}".encode())
    digest.update(native.reshape(-1).view(np.uint8))  # The buffer itself, without a copy.
    return digest.hexdigest()


def select_frames(num_frames: int, max_frames: int) -> list[int]:
    """Return the frame numbers to keep: all, or `max_frames` evenly spaced ones."""
    if max_frames <= 0 or num_frames <= max_frames:
        return list(range(num_frames))
    positions = np.linspace(0, num_frames - 1, max_frames)
    return sorted({int(round(position)) for position in positions})


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Convert float RGB [H, W, 3] to luminance [H, W] with the BT.601 weights."""
    return rgb @ LUMA_WEIGHTS


def percentile_window(values: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the [low, high] percentile range of `values` linearly to [0, 1], clipping outside."""
    low, high = np.percentile(values, percentiles)
    return range_to_unit(values, low, high)


def range_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to float32 [0, 1], clipping outside; all zeros if high <= low.

    Elementwise: each output depends on its own input value only.
    """
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = (values.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0)


def _resize_plane(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize one float32 plane with Pillow's anti-aliased bilinear filter.

    Pillow widens the filter support by the scale factor when it shrinks an image, so large
    radiographs are low-pass filtered rather than subsampled.
    """
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    resized = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def to_stored_image(unit: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """Resize a display-ready image and quantise it for storage.

    unit: float [H, W] (grayscale) or [H, W, 3] (RGB), values in [0, 1].
    Returns uint8 [S, S, C] with S = options.image_size and C = options.channels.
    """
    if unit.ndim == 3 and not options.keep_colour:
        unit = luminance(unit)
    planes = [unit] if unit.ndim == 2 else [unit[..., c] for c in range(unit.shape[-1])]

    size = options.image_size
    height, width = planes[0].shape
    if options.letterbox:
        scale = size / max(height, width)
        new_height = max(1, round(height * scale))
        new_width = max(1, round(width * scale))
    else:
        new_height, new_width = size, size

    resized = np.stack([_resize_plane(p, new_width, new_height) for p in planes], axis=-1)
    quantised = np.rint(np.clip(resized, 0.0, 1.0) * 255.0).astype(np.uint8)

    if options.letterbox:
        canvas = np.zeros((size, size, quantised.shape[-1]), dtype=np.uint8)
        top = (size - new_height) // 2
        left = (size - new_width) // 2
        canvas[top : top + new_height, left : left + new_width] = quantised
        quantised = canvas

    if quantised.shape[-1] != options.channels:
        quantised = np.repeat(quantised, options.channels, axis=-1)
    return quantised


def _pil_to_unit(image: Image.Image) -> np.ndarray:
    """Convert a Pillow image to float [H, W] or [H, W, 3] in [0, 1].

    8-bit images are display-ready and divided by 255. Images of more than 8 bits (16-bit PNG,
    32-bit integer or float TIFF) are stretched linearly from their minimum to their maximum,
    so a 12-bit image stored in 16 bits keeps every level and nothing is clipped.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image).astype(np.float64)
        low, high = float(values.min()), float(values.max())
        if high <= low:
            return np.zeros(values.shape, dtype=np.float32)
        return ((values - low) / (high - low)).astype(np.float32)

    if image.mode not in ("L", "RGB"):
        image = image.convert(
            "RGB" if image.mode in ("P", "PA", "RGBA", "CMYK", "YCbCr", "LA") else "L"
        )
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def check_frame_size(height: int, width: int, options: DecodeOptions) -> None:
    """Raise RejectedFile when a frame of height x width pixels exceeds `options.max_pixels`."""
    if height * width > options.max_pixels:
        raise RejectedFile(
            "too_large",
            f"frame of {height} x {width} pixels exceeds max_pixels={options.max_pixels}; "
            "raise --max_pixels to accept it",
        )


def decode_image_file(path: str | BinaryIO, modality: str, options: DecodeOptions) -> DecodedFile:
    """Decode a PNG, JPEG, TIFF or BMP file (every page of a multi-page TIFF is a frame).

    path: a file name or a binary file object opened for reading.
    Raises RejectedFile when Pillow cannot read the file or a page exceeds `options.max_pixels`
    (checked on the image header, before the pixels are decoded).
    """
    try:
        with Image.open(path) as image:
            check_frame_size(image.height, image.width, options)
            num_frames = getattr(image, "n_frames", 1)
            frames = []
            for frame in select_frames(num_frames, options.max_frames):
                image.seek(frame)
                check_frame_size(image.height, image.width, options)
                unit = _pil_to_unit(image)
                raw = np.asarray(image)
                stored = to_stored_image(unit, options)
                frames.append(DecodedFrame(frame=frame, image=stored, pixel_hash=pixel_hash(raw)))
            height, width = image.height, image.width
    except Image.DecompressionBombError as error:
        raise RejectedFile(
            "too_large", "Pillow rejected the image as a decompression bomb (over 2x its limit)"
        ) from error
    except (OSError, ValueError, SyntaxError) as error:
        raise RejectedFile(
            "unreadable", f"Pillow could not decode the image ({type(error).__name__})"
        ) from error
    return DecodedFile(modality=modality, height=height, width=width, frames=frames)
