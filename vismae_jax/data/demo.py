"""The demo corpus: real clinical images shipped with pydicom and pydicom-data, chosen by name.

Files are looked up one by one with `pydicom.data.get_testdata_file(name)`, which finds both
packages offline. Listing every test file instead makes pydicom try to download a file index.
"""

from pydicom.data import get_testdata_file

# Reviewed list of real clinical images from the public test data, by corpus modality.
# Two pairs are deliberate duplicates that preparation must drop: examples_jpeg2k.dcm has the
# same pixels as US1_UNCR.dcm, and examples_palette.dcm shares its SOP Instance UID with
# OBXXXX1A_2frame.dcm.
DEMO_FILES = {
    "ct": (
        "CT_small.dcm",  # 128x128 CT without a window: exercises the default CT window.
        "693_UNCR.dcm",  # Head CT, 512x512.
        "J2K_pixelrep_mismatch.dcm",  # Head CT, JPEG 2000, three windows.
        "bad_sequence.dcm",  # Spine CT, JPEG lossless, two windows.
        "explicit_VR-UN.dcm",  # Abdominal CT, JPEG 2000.
        "eCT_Supplemental.dcm",  # Enhanced CT, 2 frames, rescale and window in functional groups.
    ),
    "mr": (
        "MR_small.dcm",  # 64x64 MR slice.
        "MR2_UNCR.dcm",  # Shoulder MR, 1024x1024, rescale slope.
        "emri_small.dcm",  # Enhanced MR, 10 frames, no window.
        "examples_overlay.dcm",  # Abdominal MR with two windows.
        "MR-SIEMENS-DICOM-WithOverlays.dcm",  # Abdominal MR, 484x484.
    ),
    "xray": (
        "RG1_UNCR.dcm",  # Chest CR, MONOCHROME1, 1955x1841.
        "RG3_UNCR.dcm",  # Leg CR, MONOCHROME1, 1760x1760.
    ),
    "us": (
        "US1_UNCR.dcm",  # RGB ultrasound, 480x640.
        "examples_jpeg2k.dcm",  # Same pixels as US1_UNCR.dcm (JPEG 2000): dropped as duplicate.
        "examples_rgb_color.dcm",  # RGB ultrasound, 240x320.
        "OBXXXX1A_2frame.dcm",  # Palette-colour obstetric ultrasound, 2 frames.
        "examples_palette.dcm",  # Same SOP Instance UID as OBXXXX1A_2frame.dcm: dropped.
        "examples_ybr_color.dcm",  # YBR_FULL_422 JPEG cardiac loop, 30 frames.
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # Grayscale ultrasound, JPEG lossless, 768x1024.
        "gdcm-US-ALOKA-16.dcm",  # 16-bit palette-colour ultrasound.
        "color-pl.dcm",  # RGB ultrasound, 120x256.
    ),
    "pet": (
        "JPEG2000.dcm",  # Whole-body bone scintigraphy (NM), JPEG 2000, 1024x256.
    ),
}

# Left out on purpose, by kind. Synthetic test patterns (SC_rgb*, GDCMJ2K_TextGBR,
# JPEGLSNearLossless_*, mlut_18, vlut_04, image_dfl). A photograph (OT-PAL-8-face) and a nearly
# blank 60x80 frame (ExplVR_BigEnd). Non-image objects (RT dose/plan/structure sets,
# segmentations, reports, waveforms). Deliberately broken files (MR_truncated, JPEG-lossy,
# badVR, no_meta, JPEG2000-embedded-sequence-delimiter, emri_small_jpeg_2k_lossless_too_short).
# Other encodings of the images above (MR_small_*, emri_small_*, *_J2KI, *_J2KR, *_UNCI,
# *_expb, *_rle, color-px, color3d_jpeg_baseline).


def demo_file_names() -> list[str]:
    """Return the names of all demo files, sorted."""
    return sorted(name for names in DEMO_FILES.values() for name in names)


def demo_paths() -> list[str]:
    """Return the local paths of the demo files, sorted by name.

    Raises FileNotFoundError naming the file when pydicom or pydicom-data lacks one of them.
    """
    paths = []
    for name in demo_file_names():
        path = get_testdata_file(name, download=False)
        if path is None:
            raise FileNotFoundError(
                f"Demo file {name} not found in pydicom or pydicom-data; install the versions "
                "pinned in requirements.txt."
            )
        paths.append(str(path))
    return paths
