"""Downstream data: a CSV of images with masks or labels, decoded to 2-D slices, and augmentations.

The CSV has a header row. Columns:
  image    path of a DICOM, PNG, JPEG, TIFF or BMP image, or of an NRRD or NIfTI volume.
  mask     (segmentation) path of the mask: PNG/TIFF/BMP/.npy for 2-D images, NRRD/NIfTI for
           volumes. Its pixel values are class ids, 0 is background.
  label    (classification) class of the image: integers, or names sorted into ids.
  patient  (optional) patient id; images of one patient never straddle folds.
  fold     (optional) integer fold, or train/validation/test for a fixed split.
  slice    (optional, volumes only) index of the one slice this row stands for.
Relative paths are resolved against the CSV's folder. A volume row without `slice` yields all of
its slices along `slice_axis`; a classification label then applies to each slice.

Everything is decoded once into memory: images as uint8 [N, S, S] (S = image_size) and masks
as uint8 [N, S, S] class ids.
"""

import csv
import dataclasses
import logging
import math
import pathlib

import nrrd
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vismae_jax.data import dicom, images

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
MASK_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
# A mask with more distinct values than this is taken for a grayscale image or a lossy
# (JPEG) mask, not for class ids.
MAX_MASK_VALUES = 64
MASK_REMAP_255 = {0: 0, 255: 1}


@dataclasses.dataclass(frozen=True)
class TableRow:
    """One CSV row, with paths made absolute."""

    image: pathlib.Path
    target: str  # Mask path (segmentation) or label text (classification).
    patient: str | None
    fold: str | None
    slice_index: int | None


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """Decoding settings that turn images and volumes into stored uint8 slices."""

    image_size: int  # Side S of the square stored image in pixels.
    window: tuple[float, float] = (0.0, 0.0)  # Volume (center, width); width 0 = percentiles.
    percentiles: tuple[float, float] = (0.5, 99.5)  # Volume range mapped to [0, 1] otherwise.
    slice_axis: int = 2  # Volume array axis (in file index order) that slices are taken along.
    empty_slice_margin: int = -1  # Keep mask-volume slices this close to foreground; -1 = all.


@dataclasses.dataclass
class DownstreamData:
    """Decoded images with their targets, groups and optional given folds."""

    images: np.ndarray  # uint8 [N, S, S].
    masks: np.ndarray | None  # uint8 [N, S, S] class ids (segmentation) or None.
    labels: np.ndarray | None  # int64 [N] class ids (classification) or None.
    groups: list[str]  # Patient id, or source path when the CSV has no patient column.
    folds: list[str] | None  # The CSV's fold column, or None.
    class_names: list[str]  # Name of each class id (segmentation: the original mask values).

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def strata(self) -> np.ndarray:
        """int64 [N]: the label, or 1 where the mask has foreground (for stratified splits)."""
        if self.labels is not None:
            return self.labels
        return self.masks.reshape(len(self.masks), -1).any(axis=1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)


def read_table(csv_path: str | pathlib.Path, task: str) -> list[TableRow]:
    """Read the CSV for `task` ("segmentation" or "classification")."""
    csv_path = pathlib.Path(csv_path)
    target_column = "mask" if task == "segmentation" else "label"
    with open(csv_path, newline="") as file:
        reader = csv.DictReader(file)
        columns = reader.fieldnames or []
        for required in ("image", target_column):
            if required not in columns:
                raise ValueError(f"{csv_path} has no {required!r} column (columns: {columns}).")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} has a header but no rows.")

    base = csv_path.parent
    table = []
    for line, row in enumerate(rows, start=2):
        slice_text = (row.get("slice") or "").strip()
        if slice_text and not slice_text.isdigit():
            raise ValueError(
                f"{csv_path}:{line}: slice {slice_text!r} is not a non-negative integer."
            )
        target = row[target_column].strip()
        if not target:
            raise ValueError(f"{csv_path}:{line}: empty {target_column!r}.")
        table.append(
            TableRow(
                image=base / row["image"].strip(),
                target=str(base / target) if task == "segmentation" else target,
                patient=(row.get("patient") or "").strip() or None,
                fold=(row.get("fold") or "").strip() or None,
                slice_index=int(slice_text) if slice_text else None,
            )
        )
    return table


def has_suffix(path: pathlib.Path, suffixes: tuple[str, ...]) -> bool:
    return path.name.lower().endswith(suffixes)


def read_volume(path: pathlib.Path) -> np.ndarray:
    """Read an NRRD or NIfTI volume as an array in file index order ([X, Y, Z] for 3-D)."""
    if has_suffix(path, (".nrrd", ".nhdr")):
        volume, _ = nrrd.read(str(path))
        return volume
    try:
        import nibabel
    except ImportError as error:
        raise ImportError(f"Reading NIfTI ({path}) needs nibabel: pip install nibabel.") from error
    return np.asanyarray(nibabel.load(str(path)).dataobj)


def volume_slices(volume: np.ndarray, axis: int, path: pathlib.Path) -> np.ndarray:
    """Return [Z, rows, columns] slices of a 3-D volume along `axis`, rows = the file's Y axis."""
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise ValueError(
            f"{path} has {volume.ndim} dimensions; expected a 2-D image or 3-D volume."
        )
    # Index order [X, Y, Z]: move the slice axis first, then transpose X and Y so rows follow Y.
    return np.moveaxis(volume, axis, 0).transpose(0, 2, 1)


def window_volume(volume: np.ndarray, options: LoadOptions) -> np.ndarray:
    """Map a volume to float32 [0, 1] with the configured window or its own percentiles."""
    center, width = options.window
    if width > 0:
        low = center - width / 2
        return np.clip((volume.astype(np.float32) - low) / width, 0.0, 1.0)
    return images.percentile_window(volume, options.percentiles)


def decode_options(options: LoadOptions) -> images.DecodeOptions:
    return images.DecodeOptions(image_size=options.image_size, keep_colour=False)


def load_image_slices(path: pathlib.Path, options: LoadOptions) -> tuple[np.ndarray, tuple]:
    """Decode one image or volume file to stored slices uint8 [Z, S, S].

    Also returns the slice size (rows, columns) before resizing, to check masks against.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"Image {path} not found; paths in the CSV are relative to its folder."
        )

    if has_suffix(path, VOLUME_SUFFIXES):
        unit = window_volume(read_volume(path), options)
        slices = volume_slices(unit, options.slice_axis, path)
        stored = [images.to_stored_image(s, decode_options(options))[..., 0] for s in slices]
        return np.stack(stored), slices.shape[1:]

    try:
        if has_suffix(path, DICOM_SUFFIXES) or is_dicom(path):
            decoded = dicom.decode_dicom(str(path), decode_options(options))
        else:
            decoded = images.decode_image_file(str(path), "other", decode_options(options))
    except images.RejectedFile as error:
        raise ValueError(f"Image {path} could not be decoded: {error.reason}.") from error
    stored = np.stack([frame.image[..., 0] for frame in decoded.frames])
    return stored, (decoded.height, decoded.width)


def is_dicom(path: pathlib.Path) -> bool:
    """Return True if the file has the DICOM preamble marker 'DICM' at byte 128."""
    with open(path, "rb") as file:
        file.seek(128)
        return file.read(4) == b"DICM"


def read_mask_slices(path: pathlib.Path, options: LoadOptions) -> np.ndarray:
    """Read a mask file as raw integer class ids [Z, H, W] (before resizing or remapping)."""
    if not path.exists():
        raise FileNotFoundError(
            f"Mask {path} not found; paths in the CSV are relative to its folder."
        )

    if has_suffix(path, VOLUME_SUFFIXES):
        values = volume_slices(read_volume(path), options.slice_axis, path)
    elif path.suffix.lower() == ".npy":
        values = np.load(path)
        values = values[None] if values.ndim == 2 else values
    elif has_suffix(path, MASK_IMAGE_SUFFIXES):
        with Image.open(path) as image:
            values = np.asarray(image)
        if values.ndim == 3:
            if not all(
                np.array_equal(values[..., 0], values[..., c]) for c in range(1, values.shape[-1])
            ):
                raise ValueError(
                    f"Mask {path} has colour channels that differ; store class ids as one channel."
                )
            values = values[..., 0]
        values = values[None]
    else:
        raise ValueError(
            f"Mask {path}: unsupported format; use PNG, TIFF, BMP, .npy, NRRD or NIfTI."
        )

    if np.issubdtype(values.dtype, np.floating):
        if not np.all(values == np.round(values)):
            raise ValueError(f"Mask {path} contains non-integer values; store integer class ids.")
    return values.astype(np.int64)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize integer class ids [H, W] to [size, size] with nearest-neighbour sampling."""
    tensor = torch.from_numpy(mask.astype(np.int64))[None, None].float()
    return F.interpolate(tensor, size=(size, size), mode="nearest-exact")[0, 0].long().numpy()


def mask_value_mapping(values: list[int]) -> dict[int, int]:
    """Return {original mask value: class id} for all mask values seen in a data set.

    Values 0..K-1 stay as they are. {0, 255} becomes {0, 1}. Other sets that include 0 are
    renumbered in sorted order. Raises ValueError when the meaning is ambiguous: no value 0
    (which one is background?), 255 next to other foreground values (class or ignore label?),
    negative values, or more than MAX_MASK_VALUES values (a grayscale or lossy mask).
    """
    values = sorted(values)
    if values == list(range(len(values))):
        return {value: value for value in values}
    if values == [0, 255]:
        logging.info("Mask values {0, 255} remapped to classes {0: background, 1: foreground}.")
        return dict(MASK_REMAP_255)

    if len(values) > MAX_MASK_VALUES:
        raise ValueError(
            f"Masks hold {len(values)} distinct values (more than {MAX_MASK_VALUES}), so they "
            "look like grayscale or JPEG-compressed images. Store class ids 0..K-1 losslessly "
            "(PNG, NRRD)."
        )
    if values[0] < 0:
        raise ValueError(f"Mask values {values} include negative numbers; store class ids 0..K-1.")
    if values[0] != 0:
        raise ValueError(
            f"Mask values {values} lack 0, so no value is clearly background. "
            "Store background as 0."
        )
    if 255 in values:
        raise ValueError(
            f"Mask values {values} mix 255 with other foreground values: 255 may be a class or an "
            "ignore label. Renumber the classes 0..K-1."
        )

    mapping = {value: class_id for class_id, value in enumerate(values)}
    logging.info("Mask values %s are not contiguous; remapped to class ids %s.", values, mapping)
    return mapping


def remap_masks(raw_masks: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """Remap raw masks [H, W] of one data set to uint8 class ids [N, H, W] and class names."""
    seen = sorted(set().union(*(np.unique(mask).tolist() for mask in raw_masks)))
    mapping = mask_value_mapping(seen)

    lookup = np.zeros(max(mapping) + 1, dtype=np.uint8)
    for value, class_id in mapping.items():
        lookup[value] = class_id
    masks = np.stack([lookup[mask] for mask in raw_masks])
    class_names = ["background"] + [str(value) for value in sorted(mapping)[1:]]
    return masks, class_names


def label_ids(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """Turn label texts into int64 class ids [N] and class names (integers sort numerically)."""
    if all(text.lstrip("-").isdigit() for text in texts):
        keys = [int(text) for text in texts]
        values = sorted(set(keys))
        names = [str(value) for value in values]
        if values != list(range(len(values))):
            logging.info("Labels %s are not 0..K-1; remapped in sorted order.", values)
    else:
        keys = texts
        values = sorted(set(texts))
        names = values
        logging.info(
            "Label names mapped to class ids: %s.", dict(zip(names, range(len(names)), strict=True))
        )

    class_of_value = {value: class_id for class_id, value in enumerate(values)}
    return np.array([class_of_value[key] for key in keys], dtype=np.int64), names


def select_slices(num_slices: int, slice_index: int | None, path: pathlib.Path) -> list[int]:
    if slice_index is None:
        return list(range(num_slices))
    if slice_index >= num_slices:
        raise ValueError(
            f"Slice {slice_index} is out of range for {path}, which has {num_slices} slices."
        )
    return [slice_index]


def near_foreground(raw_masks: np.ndarray, margin: int) -> np.ndarray:
    """Return bool [Z]: slices within `margin` slices of one with foreground (margin < 0: all)."""
    if margin < 0:
        return np.ones(len(raw_masks), dtype=bool)
    has_foreground = np.flatnonzero(raw_masks.reshape(len(raw_masks), -1).any(axis=1))
    positions = np.arange(len(raw_masks))[:, None]
    if has_foreground.size == 0:
        return np.zeros(len(raw_masks), dtype=bool)
    return np.any(np.abs(positions - has_foreground[None, :]) <= margin, axis=1)


def load_dataset(table: list[TableRow], task: str, options: LoadOptions) -> DownstreamData:
    """Decode every row of `table` into memory (see the module docstring for the CSV)."""
    # NOTE: everything stays in memory, 2 x S x S bytes per segmentation slice (about 200 KB at
    # 320 x 320), so sets of more than a few hundred thousand slices need a lazy loader.
    stored, raw_masks, label_texts, groups, folds = [], [], [], [], []
    cached_path, slices, slice_size = None, None, None
    for row in table:
        # Rows of one volume usually follow each other (one row per slice): decode it once.
        if row.image != cached_path:
            cached_path = row.image
            slices, slice_size = load_image_slices(row.image, options)
        keep = select_slices(len(slices), row.slice_index, row.image)

        if task == "segmentation":
            mask_path = pathlib.Path(row.target)
            masks = read_mask_slices(mask_path, options)
            if masks.shape != (len(slices), *slice_size):
                raise ValueError(
                    f"{row.image} has slices [Z, rows, columns] = {[len(slices), *slice_size]} "
                    f"but its mask {mask_path} has {list(masks.shape)}."
                )
            near = near_foreground(masks, options.empty_slice_margin)
            keep = [k for k in keep if near[k]]
            raw_masks += [resize_mask(masks[k], options.image_size) for k in keep]
        else:
            label_texts += [row.target] * len(keep)

        stored += [slices[k] for k in keep]
        groups += [row.patient or str(row.image)] * len(keep)
        folds += [row.fold] * len(keep)

    if not stored:
        raise ValueError(
            "The CSV yields no images (check empty_slice_margin for volumes without foreground)."
        )
    if any(fold is None for fold in folds) and any(fold is not None for fold in folds):
        raise ValueError(
            "The fold column is filled for some rows only; fill it for all rows or none."
        )

    masks = labels = None
    if task == "segmentation":
        masks, class_names = remap_masks(raw_masks)
    else:
        labels, class_names = label_ids(label_texts)
    logging.info(
        "Loaded %d slices from %d CSV rows, %d classes.", len(stored), len(table), len(class_names)
    )
    return DownstreamData(
        images=np.stack(stored),
        masks=masks,
        labels=labels,
        groups=groups,
        folds=None if folds[0] is None else folds,
        class_names=class_names,
    )


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Random transforms applied identically to an image and its mask."""

    flip_probability: float = 0.5  # Probability of each of a horizontal and a vertical flip.
    rotate90: bool = True  # Rotate by a random multiple of 90 degrees.
    max_rotation_degrees: float = 10.0  # Small affine: rotation drawn from [-a, a] degrees.
    max_scale_change: float = 0.1  # Small affine: scale drawn from [1 - s, 1 + s].
    max_translation: float = 0.05  # Small affine: shift drawn from [-t, t] of the image side.


def affine_matrix(rng: np.random.Generator, augmentation: Augmentation) -> torch.Tensor:
    """Draw a [1, 2, 3] matrix for `F.affine_grid` (output to input, normalised coordinates)."""
    angle = math.radians(
        rng.uniform(-augmentation.max_rotation_degrees, augmentation.max_rotation_degrees)
    )
    scale = rng.uniform(1 - augmentation.max_scale_change, 1 + augmentation.max_scale_change)
    shift = rng.uniform(-augmentation.max_translation, augmentation.max_translation, size=2) * 2
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[[cos, -sin, shift[0]], [sin, cos, shift[1]]]], dtype=torch.float32)


def augment(
    image: torch.Tensor,
    mask: torch.Tensor | None,
    rng: np.random.Generator,
    augmentation: Augmentation,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one random transform to image [1, H, W] float and mask [H, W] int64 (or None).

    The image is resampled bilinearly and the mask with nearest neighbour; pixels moved in
    from outside are 0 in both (black and background).
    """
    if rng.random() < augmentation.flip_probability:
        image, mask = image.flip(-1), None if mask is None else mask.flip(-1)
    if rng.random() < augmentation.flip_probability:
        image, mask = image.flip(-2), None if mask is None else mask.flip(-2)
    if augmentation.rotate90:
        turns = int(rng.integers(4))
        image = torch.rot90(image, turns, dims=(-2, -1))
        mask = None if mask is None else torch.rot90(mask, turns, dims=(-2, -1))

    affine_on = (
        augmentation.max_rotation_degrees
        or augmentation.max_scale_change
        or augmentation.max_translation
    )
    if affine_on:
        grid = F.affine_grid(
            affine_matrix(rng, augmentation), [1, 1, *image.shape[-2:]], align_corners=False
        )
        image = F.grid_sample(
            image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
        if mask is not None:
            warped = F.grid_sample(
                mask[None, None].float(), grid, mode="nearest", align_corners=False
            )
            mask = warped[0, 0].long()
    return image, mask


class SliceDataset(torch.utils.data.Dataset):
    """Normalised images [C, S, S] float32 with masks [S, S] int64 or labels (int64 scalars).

    Augmentation draws come from a generator seeded by (seed, epoch, index), so an epoch is
    reproducible whatever the number of DataLoader workers. Call `set_epoch` before each epoch.
    """

    def __init__(
        self,
        data: DownstreamData,
        indices: np.ndarray,
        channels: int,
        pixel_mean: float,
        pixel_std: float,
        augmentation: Augmentation | None = None,
        seed: int = 0,
    ):
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.channels = channels
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.indices[position])
        image = torch.from_numpy(self.data.images[index]).float().div_(255.0)[None]
        mask = (
            None
            if self.data.masks is None
            else torch.from_numpy(self.data.masks[index].astype(np.int64))
        )

        if self.augmentation is not None:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = augment(image, mask, rng, self.augmentation)

        image = (
            ((image - self.pixel_mean) / self.pixel_std).expand(self.channels, -1, -1).contiguous()
        )
        target = mask if mask is not None else torch.tensor(int(self.data.labels[index]))
        return image, target
