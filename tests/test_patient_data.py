"""Planted patient identifiers never reach an output of prepare, pretrain, export or fine-tune.

DICOM files carry planted names, IDs, birth dates, accession numbers and institution names in
their headers and in the names of the folders that hold them. The four commands run as real
processes on them, and no file they write, nor their logs, may contain any planted string.
"""

import csv
import io
import json
import os
import pathlib
import subprocess
import sys
import warnings
import zipfile

import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

# One worker runs the whole file, so the module fixtures are built once.
pytestmark = pytest.mark.xdist_group("patient_data")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COMMAND_TIMEOUT_S = 400

PLANTED_TAGS = {
    "PatientName": "Quxplantedlast^Jorvikfirst",
    "PatientID": "PIDX73914Q",
    "PatientBirthDate": "18990713",
    "AccessionNumber": "ACCX55120Q",
    "InstitutionName": "Brambleford Plantedmed Clinic",
    "ReferringPhysicianName": "Drquill^Plantedref",
    "OtherPatientIDs": "OPIDX44017Q",
}
PLANTED_STRINGS = (
    "Quxplantedlast", "Jorvikfirst", "PIDX73914Q", "18990713", "ACCX55120Q", "Brambleford",
    "Plantedmed", "Drquill", "Plantedref", "OPIDX44017Q",
)  # fmt: skip
# Real single-frame images of pydicom's test data: CT, MR, JPEG 2000 and RLE-compressed MR.
SOURCE_NAMES = ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm")


def write_planted_dicoms(root: pathlib.Path) -> list[pathlib.Path]:
    """Write each source image with planted tags into folders named after the patient."""
    paths = []
    for index, name in enumerate(SOURCE_NAMES):
        folder = root / f"Quxplantedlast_Jorvikfirst_PIDX73914Q_{index}" / "ACCX55120Q_18990713"
        folder.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(get_testdata_file(name))
        for keyword, value in PLANTED_TAGS.items():
            setattr(ds, keyword, value)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        path = folder / f"Brambleford_{name}"
        ds.save_as(path, enforce_file_format=False)
        paths.append(path)
    return paths


def run_command(module: str, *args: str, log: list[str]) -> None:
    """Run `python -m module args...`; append its stdout and stderr to `log`."""
    env = dict(os.environ, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    completed = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    log.append(completed.stdout + completed.stderr)
    assert completed.returncode == 0, f"{module} failed:\n{completed.stderr[-4000:]}"


def file_contents(path: pathlib.Path) -> list[bytes]:
    """Return the bytes of `path`, plus the decompressed members of a zip (.pth) and the text
    chunks of a PNG, where a planted string could hide from a plain byte search."""
    data = path.read_bytes()
    contents = [data]
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            contents.extend(archive.read(member) for member in archive.namelist())
    if data.startswith(b"\x89PNG"):
        with Image.open(io.BytesIO(data)) as image:
            contents.append(repr(image.info).encode())
    return contents


def find_planted(content: bytes) -> list[str]:
    lowered = content.lower()
    return [planted for planted in PLANTED_STRINGS if planted.lower().encode() in lowered]


@pytest.fixture(scope="module")
def pipeline_outputs(tmp_path_factory) -> tuple[pathlib.Path, str]:
    """Run prepare, pretrain, export and fine-tune; return (output root, their logs)."""
    inputs = tmp_path_factory.mktemp("patients")
    dicoms = write_planted_dicoms(inputs)
    outputs = tmp_path_factory.mktemp("outputs")
    workdir = outputs / "pretrain"
    log: list[str] = []

    run_command(
        "vismae_jax.data.prepare", f"--input={inputs}", f"--output_dir={workdir / 'corpus'}",
        "--image_size=64", "--num_workers=1", log=log,
    )  # fmt: skip
    run_command(
        "vismae_jax.pretrain", "--config=configs/pretrain.py:test", f"--workdir={workdir}",
        f"--compilation_cache_dir={REPO_ROOT / '.cache' / 'jax'}", log=log,
    )  # fmt: skip
    run_command("vismae_jax.export", f"--workdir={workdir}", log=log)

    # Eight patients with one image of each label, so every fold contains both classes.
    table_dir = outputs / "finetune_table"
    table_dir.mkdir()
    with open(table_dir / "labels.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image", "label", "patient"])
        for patient in range(8):
            for label in (0, 1):
                image = dicoms[(2 * patient + label) % len(dicoms)]
                writer.writerow([os.path.relpath(image, table_dir), label, f"PIDX73914Q_{patient}"])
    weights = workdir / "export" / "vismae_mae.pth"
    # The fine-tuned encoder must match the pretraining `test` variant's to load its weights.
    run_command(
        "vismae_jax.finetune",
        f"--config=configs/finetune_cls.py:test,data.demo=False,data.csv={table_dir}/labels.csv,"
        f"initialisations=('{weights}',),model.depths=(1,1,1,1),model.window_size=8,"
        "protocol.num_folds=4,protocol.label_fractions=(1.0,),train.num_epochs=1",
        f"--workdir={outputs / 'finetune'}",
        log=log,
    )  # fmt: skip
    return outputs, "\n".join(log)


def test_planted_files_detected(tmp_path):
    # The search must see the planted strings where they are: in the inputs.
    paths = write_planted_dicoms(tmp_path)
    for path in paths:
        assert find_planted(path.read_bytes()) == list(PLANTED_STRINGS), path.name
    assert find_planted(str(paths[0].relative_to(tmp_path)).encode()) != []


@pytest.mark.slow
def test_outputs_exist(pipeline_outputs):
    outputs, _ = pipeline_outputs
    workdir = outputs / "pretrain"
    assert (workdir / "corpus" / "manifest.jsonl").is_file()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert list((workdir / "reconstructions").glob("*.png"))
    assert list(workdir.glob("events.out.tfevents.*"))
    assert (workdir / "export" / "vismae_mae.safetensors").is_file()
    assert (outputs / "finetune" / "results.csv").is_file()
    result = json.loads(
        (outputs / "finetune" / "runs" / "vismae_mae_fold0_100pct.json").read_text()
    )
    assert result["pretrained_tensors_loaded"] > 0


@pytest.mark.slow
def test_logs_free_of_identifiers(pipeline_outputs):
    _, log = pipeline_outputs
    assert find_planted(log.encode()) == []


@pytest.mark.slow
def test_files_free_of_identifiers(pipeline_outputs):
    outputs, _ = pipeline_outputs
    checked = 0
    for path in sorted(outputs.rglob("*")):
        if not path.is_file() or path.parent.name == "finetune_table":
            continue
        for content in file_contents(path):
            assert find_planted(content) == [], path.relative_to(outputs)
        checked += 1
    assert checked > 20


@pytest.mark.slow
def test_file_names_free_of_identifiers(pipeline_outputs):
    outputs, _ = pipeline_outputs
    for path in outputs.rglob("*"):
        if path.parent.name != "finetune_table":
            assert find_planted(str(path.relative_to(outputs)).encode()) == [], path
