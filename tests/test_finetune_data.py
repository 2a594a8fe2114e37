"""Downstream CSV loading: mask value remapping, volume slicing, DICOM input and augmentation."""

import logging
import pathlib

import nibabel
import nrrd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from vismae_jax.torch import data


def write_csv(path: pathlib.Path, header: str, rows: list[str]) -> pathlib.Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def write_png_pair(folder: pathlib.Path, name: str, mask: np.ndarray) -> str:
    """Write an 8-bit image and a mask PNG; return the CSV row 'image,mask'."""
    rng = np.random.default_rng(len(name))
    Image.fromarray(rng.integers(0, 256, mask.shape, dtype=np.uint8)).save(folder / f"{name}.png")
    Image.fromarray(mask.astype(np.uint8)).save(folder / f"{name}_mask.png")
    return f"{name}.png,{name}_mask.png"


def load_segmentation(
    csv_path: pathlib.Path, image_size: int = 32, **options
) -> data.DownstreamData:
    table = data.read_table(csv_path, "segmentation")
    return data.load_dataset(
        table, "segmentation", data.LoadOptions(image_size=image_size, **options)
    )


def test_mask_0_255_remapped(tmp_path, caplog):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 10:24] = 255
    rows = [
        write_png_pair(tmp_path, "a", mask),
        write_png_pair(tmp_path, "b", np.zeros((32, 32), np.uint8)),
    ]
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask", rows)

    with caplog.at_level(logging.INFO):
        loaded = load_segmentation(csv_path)

    assert loaded.num_classes == 2
    np.testing.assert_array_equal(loaded.masks[0], (mask == 255).astype(np.uint8))
    assert loaded.masks[1].max() == 0
    assert "{0, 255} remapped" in caplog.text


def test_mask_noncontiguous_remapped():
    mapping = data.mask_value_mapping([0, 3, 7])

    assert mapping == {0: 0, 3: 1, 7: 2}


def test_mask_contiguous_unchanged():
    assert data.mask_value_mapping([0, 1, 2]) == {0: 0, 1: 1, 2: 2}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0, 1, 255], "ignore label"),
        ([1, 2], "lack 0"),
        ([-1, 0, 1], "negative"),
        (list(range(0, 200, 2)), "distinct values"),
    ],
)
def test_mask_ambiguous_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        data.mask_value_mapping(values)


def test_mask_colour_rejected(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "image.png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[2:4, 2:4, 0] = 255
    Image.fromarray(colour).save(tmp_path / "mask.png")
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask", ["image.png,mask.png"])

    with pytest.raises(ValueError, match="colour channels"):
        load_segmentation(csv_path)


def test_nrrd_volume_slices_with_mask(tmp_path):
    # Index order [X, Y, Z] = [48, 32, 4]: the stored slice is [Y, X] = [32, 48] before resizing.
    volume = np.zeros((48, 32, 4), np.int16)
    volume[:, :, :] = np.arange(48, dtype=np.int16)[:, None, None] * 10  # brighter to the right
    labels = np.zeros(volume.shape, np.uint8)
    labels[30:40, 5:10, 2] = 1  # columns 30-39, rows 5-9 of slice 2
    nrrd.write(str(tmp_path / "ct.nrrd"), volume)
    nrrd.write(str(tmp_path / "ct_label.nrrd"), labels)
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask,patient", ["ct.nrrd,ct_label.nrrd,p1"])

    loaded = load_segmentation(csv_path, image_size=48, window=(235.0, 470.0))

    assert loaded.images.shape == (4, 48, 48)
    assert loaded.images[0, 0, -1] > loaded.images[0, 0, 0]
    assert loaded.masks[[0, 1, 3]].max() == 0
    rows, columns = np.nonzero(loaded.masks[2])
    assert (rows.min(), rows.max()) == (7, 14)  # rows 5-9 stretched by 48 / 32
    assert (columns.min(), columns.max()) == (30, 39)
    assert loaded.groups == ["p1"] * 4


def test_nifti_matches_nrrd_slices(tmp_path):
    volume = np.arange(40 * 24 * 3, dtype=np.int16).reshape(40, 24, 3)
    labels = np.zeros(volume.shape, np.uint8)
    labels[10:20, 4:8, 1] = 1
    nrrd.write(str(tmp_path / "v.nrrd"), volume)
    nrrd.write(str(tmp_path / "v_label.nrrd"), labels)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(tmp_path / "v.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(labels, np.eye(4)), str(tmp_path / "v_label.nii.gz"))
    nrrd_csv = write_csv(tmp_path / "nrrd.csv", "image,mask", ["v.nrrd,v_label.nrrd"])
    nifti_csv = write_csv(tmp_path / "nifti.csv", "image,mask", ["v.nii.gz,v_label.nii.gz"])

    from_nrrd = load_segmentation(nrrd_csv, image_size=32, window=(1440.0, 2880.0))
    from_nifti = load_segmentation(nifti_csv, image_size=32, window=(1440.0, 2880.0))

    np.testing.assert_array_equal(from_nifti.images, from_nrrd.images)
    np.testing.assert_array_equal(from_nifti.masks, from_nrrd.masks)
    assert from_nifti.masks[1].max() == 1


def test_nrrd_empty_slice_margin(tmp_path):
    labels = np.zeros((16, 16, 9), np.uint8)
    labels[4:8, 4:8, 4] = 1
    nrrd.write(str(tmp_path / "v.nrrd"), np.ones((16, 16, 9), np.float32))
    nrrd.write(str(tmp_path / "v_label.nrrd"), labels)
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask", ["v.nrrd,v_label.nrrd"])

    loaded = load_segmentation(csv_path, image_size=16, empty_slice_margin=1)

    assert len(loaded) == 3
    assert loaded.strata.tolist() == [0, 1, 0]


def test_classification_slice_column(tmp_path):
    volume = np.stack([np.full((16, 16), value, np.float32) for value in (0.0, 1.0, 2.0)], axis=-1)
    nrrd.write(str(tmp_path / "v.nrrd"), volume)
    csv_path = write_csv(
        tmp_path / "cls.csv", "image,slice,label", ["v.nrrd,0,benign", "v.nrrd,2,malignant"]
    )

    table = data.read_table(csv_path, "classification")
    loaded = data.load_dataset(
        table, "classification", data.LoadOptions(image_size=16, percentiles=(0, 100))
    )

    assert loaded.class_names == ["benign", "malignant"]
    assert loaded.labels.tolist() == [0, 1]
    assert loaded.images[0].max() == 0
    assert loaded.images[1].min() == 255


def test_dicom_image_with_threshold_mask(tmp_path):
    dicom_path = get_testdata_file("CT_small.dcm")
    hounsfield = pydicom.dcmread(dicom_path).pixel_array.astype(np.float32) * 1.0 - 1024.0
    np.save(tmp_path / "mask.npy", (hounsfield > 0).astype(np.uint8))
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask", [f"{dicom_path},mask.npy"])

    loaded = load_segmentation(csv_path, image_size=64)

    assert loaded.images.shape == (1, 64, 64)
    assert loaded.images.std() > 10
    assert 0 < loaded.masks.mean() < 1


def test_augmentation_flips_rotations_match():
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[2:6, 3:12] = 1
    image = mask[None].float()
    augmentation = data.Augmentation(
        flip_probability=0.5,
        rotate90=True,
        max_rotation_degrees=0,
        max_scale_change=0,
        max_translation=0,
    )

    for seed in range(8):
        augmented_image, augmented_mask = data.augment(
            image, mask, np.random.default_rng(seed), augmentation
        )
        assert torch.equal(augmented_image[0].long(), augmented_mask), seed


def test_augmentation_affine_matches():
    mask = torch.zeros(64, 64, dtype=torch.long)
    mask[10:40, 20:50] = 1
    image = mask[None].float()
    augmentation = data.Augmentation(
        max_rotation_degrees=10, max_scale_change=0.1, max_translation=0.05
    )

    for seed in range(4):
        augmented_image, augmented_mask = data.augment(
            image, mask, np.random.default_rng(seed), augmentation
        )
        agreement = ((augmented_image[0] > 0.5).long() == augmented_mask).float().mean()
        assert agreement > 0.97, seed
        assert not torch.equal(augmented_mask, mask), seed


def test_mask_size_mismatch_rejected(tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "image.png")
    Image.fromarray(np.zeros((32, 16), np.uint8)).save(tmp_path / "mask.png")
    csv_path = write_csv(tmp_path / "seg.csv", "image,mask", ["image.png,mask.png"])

    with pytest.raises(ValueError, match="has slices"):
        load_segmentation(csv_path)
