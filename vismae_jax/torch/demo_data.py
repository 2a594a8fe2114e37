"""Real labelled demo data: five MR and CT volumes with lesion masks, from the pyradiomics sdist.

The pyradiomics source archive ships `data/{brain1,brain2,breast1,lung1,lung2}_{image,label}.nrrd`
(brain and breast MR, lung CT; 178 axial slices in all, 27 with lesion), under the archive's
BSD 3-clause licence. `fetch_volumes` downloads the archive once with pip, extracts the ten
volumes into a cache folder and checks their SHA-256. `write_demo_csvs` turns them into two
tasks, one volume = one patient:

  segmentation:   one row per volume (image, mask); the loader slices it.
  classification: one row per slice, label 1 where the slice contains lesion, else 0.
"""

import csv
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

import nrrd
import numpy as np

PACKAGE = "pyradiomics==3.0.1"
ARCHIVE_NAME = "pyradiomics-3.0.1.tar.gz"
ARCHIVE_DATA_FOLDER = "pyradiomics-3.0.1/data"
CASES = ("brain1", "brain2", "breast1", "lung1", "lung2")
SHA256 = {
    "brain1_image.nrrd": "fffdb111ee8b428ede7256707393c927a7d5be912f0604cf3c6f1bd5fc9644cf",
    "brain1_label.nrrd": "ae6d8e6b84f7e99d68c210ee2fa6aaaefa0b2df0a84f55efca4feebe2b216059",
    "brain2_image.nrrd": "d35a1c6a3e1eb72bae97c5515472fbe057fb38ee8e1e199215d1c3c6f292332e",
    "brain2_label.nrrd": "15189c024936ecc337649b9a10c475117c7c40df0d53c22163f9a2023ed741a5",
    "breast1_image.nrrd": "0e8b668f3ce9b9aacff20dc3c216866f43069ff96b269fb45b76f5e205a431e2",
    "breast1_label.nrrd": "07085bb0e36a956de5bd1c1c1b5f8bdf2ce80952125b13cbd352412c108c8950",
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
DEFAULT_CACHE_DIR = pathlib.Path.home() / ".cache" / "vismae_jax" / "demo_data"
PIP_TIMEOUT_SECONDS = 600


def sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_volumes_valid(volume_dir: pathlib.Path) -> bool:
    """Return True if every demo volume is in `volume_dir` with the expected SHA-256."""
    return all(
        (volume_dir / name).exists() and sha256(volume_dir / name) == digest
        for name, digest in SHA256.items()
    )


def download_archive(destination: pathlib.Path) -> pathlib.Path:
    """Download the pyradiomics 3.0.1 source archive with pip into `destination`.

    The sdist is pinned because the 3.1.0 archive is broken; `--no-binary` keeps pip from
    picking a wheel, which has no data folder.
    """
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
        "--no-binary", "pyradiomics", PACKAGE, "--dest", str(destination),
    ]  # fmt: skip
    logging.info("Downloading %s (34.5 MB) with pip.", PACKAGE)
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS, check=False
    )
    archive = destination / ARCHIVE_NAME
    if result.returncode != 0 or not archive.exists():
        raise RuntimeError(
            f"pip download of {PACKAGE} failed (exit code {result.returncode}):\n"
            f"{result.stderr[-2000:]}\nCheck the connection to PyPI, or place the ten NRRD "
            "files in the cache folder."
        )
    return archive


def extract_volumes(archive: pathlib.Path, volume_dir: pathlib.Path) -> None:
    """Extract the ten demo NRRD files from the sdist into `volume_dir`."""
    volume_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for name in SHA256:
            member = tar.getmember(f"{ARCHIVE_DATA_FOLDER}/{name}")
            source = tar.extractfile(member)
            if source is None:
                raise RuntimeError(f"{archive} member {member.name} is not a regular file.")
            with source, open(volume_dir / name, "wb") as target:
                shutil.copyfileobj(source, target)


def fetch_volumes(cache_dir: str | pathlib.Path = "") -> pathlib.Path:
    """Return the folder with the ten demo volumes, downloading them on first use.

    Args:
        cache_dir: folder to cache the volumes in; "" uses ~/.cache/vismae_jax/demo_data.
            A folder that already contains the ten files with the right SHA-256 is used as is.
    """
    volume_dir = pathlib.Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    if cached_volumes_valid(volume_dir):
        return volume_dir

    volume_dir.mkdir(parents=True, exist_ok=True)
    # Extract into a temporary sibling, then move each checked file into place with an atomic
    # rename: concurrent runs never see half a file, and other files in the folder stay.
    with tempfile.TemporaryDirectory(dir=volume_dir.parent, prefix=".demo_download_") as temporary:
        temporary = pathlib.Path(temporary)
        staging = temporary / "volumes"
        extract_volumes(download_archive(temporary), staging)
        if not cached_volumes_valid(staging):
            raise RuntimeError(
                f"The volumes in {PACKAGE} do not have the expected SHA-256 checksums."
            )
        for name in SHA256:
            os.replace(staging / name, volume_dir / name)
    logging.info("Demo volumes cached in %s.", volume_dir)
    return volume_dir


def lesion_per_slice(label_path: pathlib.Path, slice_axis: int = 2) -> np.ndarray:
    """Return bool [Z]: whether each slice of a label volume contains lesion."""
    labels, _ = nrrd.read(str(label_path))
    return np.moveaxis(labels, slice_axis, 0).reshape(labels.shape[slice_axis], -1).any(axis=1)


def write_demo_csvs(volume_dir: pathlib.Path, output_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Write segmentation.csv and classification.csv for the demo volumes into `output_dir`.

    Image paths in the CSVs are absolute, so the CSVs work from any folder.
    Returns {"segmentation": path, "classification": path}.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {task: output_dir / f"{task}.csv" for task in ("segmentation", "classification")}

    with open(paths["segmentation"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "mask", "patient"])
        for case in CASES:
            writer.writerow(
                [volume_dir / f"{case}_image.nrrd", volume_dir / f"{case}_label.nrrd", case]
            )

    with open(paths["classification"], "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "slice", "label", "patient"])
        for case in CASES:
            lesion = lesion_per_slice(volume_dir / f"{case}_label.nrrd")
            for slice_index, present in enumerate(lesion):
                writer.writerow(
                    [volume_dir / f"{case}_image.nrrd", slice_index, int(present), case]
                )
    return paths


def demo_csv(task: str, cache_dir: str | pathlib.Path, output_dir: pathlib.Path) -> pathlib.Path:
    """Fetch the demo volumes if needed and return the CSV for `task`."""
    volume_dir = fetch_volumes(cache_dir)
    return write_demo_csvs(volume_dir, output_dir)[task]
