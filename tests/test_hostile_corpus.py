"""Preparation of a hostile corpus: broken, absurd, special and dangerous files among good ones.

Every bad file must end up in rejects.jsonl with its reason, every good image must come out as
if the bad files were absent, and no file may hang the run or blow up a worker's memory.
"""

import ctypes
import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from array_record.python import array_record_module
from PIL import Image, PngImagePlugin
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.filewriter import write_file_meta_info

from vismae_jax.data import dicom, prepare
from vismae_jax.data.images import DecodeOptions, RejectedFile
from vismae_jax.data.workers import WorkerPool

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONS = DecodeOptions(image_size=32)
SALT = "hostile-salt"
FILES_PER_SHARD = 4
# Address-space limit of each decoding worker in the hostile run, and so the bound on its peak
# resident memory. Allocating the absurd headers would need 20 GB (100000 x 100000 x 2 bytes),
# and inflating the deflate bomb 1.5 GB.
WORKER_MEMORY_MIB = 1024

# Real clinical images from pydicom and pydicom-data: native, JPEG 2000, RGB, palette and
# multi-frame objects.
GOOD_NAMES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "emri_small.dcm",
    "JPEG2000.dcm",
    "US1_UNCR.dcm",
    "OBXXXX1A_2frame.dcm",
)


def read(name: str) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(get_testdata_file(name))


def save(ds: pydicom.Dataset, path: pathlib.Path) -> None:
    ds.SOPInstanceUID = pydicom.uid.generate_uid()  # Not a duplicate of the good original.
    ds.save_as(path, enforce_file_format=False)


def write_deflate_bomb(path: pathlib.Path, inflated_bytes: int) -> None:
    """Write a Deflated Explicit VR Little Endian file whose dataset inflates to zeros.

    Blocks compressed after a full flush do not depend on earlier data, so one 32 MiB block of
    zeros repeated gives a 1000:1 bomb without compressing the whole size.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block_size = 32 << 20
    block = compressor.compress(bytes(block_size)) + compressor.flush(zlib.Z_FULL_FLUSH)
    body = block * (inflated_bytes // block_size) + compressor.flush()

    with open(path, "wb") as file:
        file.write(bytes(128) + b"DICM")
        write_file_meta_info(file, read("image_dfl.dcm").file_meta)
        file.write(body)


def write_rle_panic(path: pathlib.Path) -> None:
    """Write an RLE file whose corrupt segment makes pylibjpeg-rle's Rust decoder panic.

    One byte in the pixel data, found by fuzzing MR_small_RLE.dcm, makes the decoder index past
    a segment; pyo3 raises PanicException, a BaseException, which kills a worker not built for it.
    """
    data = bytearray(pathlib.Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes())
    assert data[6214] == 63
    data[6214] = 200
    path.write_bytes(data)


def write_bad_dicoms(folder: pathlib.Path) -> dict[str, str]:
    """Write damaged and absurd DICOM files; return {file name: expected reject reason prefix}."""
    expected = {}
    ct_bytes = pathlib.Path(get_testdata_file("CT_small.dcm")).read_bytes()

    (folder / "head_truncated.dcm").write_bytes(ct_bytes[:400])
    expected["head_truncated.dcm"] = "missing_pixel_data: CT Image Storage object"
    (folder / "pixels_truncated.dcm").write_bytes(ct_bytes[: len(ct_bytes) - 5000])
    expected["pixels_truncated.dcm"] = "truncated_pixel_data"
    (folder / "random.dcm").write_bytes(random.Random(0).randbytes(8192))
    expected["random.dcm"] = "not_dicom"
    (folder / "zero.dcm").write_bytes(b"")
    expected["zero.dcm"] = "empty_file"

    ds = read("MR_small.dcm")
    del ds.Rows
    save(ds, folder / "no_rows.dcm")
    expected["no_rows.dcm"] = "invalid_header: Rows is missing"

    ds = read("MR_small.dcm")
    ds.BitsAllocated = 7
    save(ds, folder / "bits_allocated_7.dcm")
    expected["bits_allocated_7.dcm"] = "invalid_header: Bits Allocated is 7"

    ds = read("MR_small.dcm")
    ds.PixelData = ds.PixelData[:1000]
    save(ds, folder / "pixel_data_short.dcm")
    expected["pixel_data_short.dcm"] = "truncated_pixel_data"

    # Rows and Columns are US (at most 65535); a hostile file can still encode them as UL.
    ds = read("MR_small.dcm")
    ds["Rows"] = DataElement(0x00280010, "UL", 100000)
    ds["Columns"] = DataElement(0x00280011, "UL", 100000)
    save(ds, folder / "absurd_size.dcm")
    expected["absurd_size.dcm"] = "too_large: frame of 100000 x 100000 pixels"

    ds = read("JPEG2000.dcm")
    ds.Rows, ds.Columns = 60000, 60000
    save(ds, folder / "absurd_size_j2k.dcm")
    expected["absurd_size_j2k.dcm"] = "too_large: frame of 60000 x 60000 pixels"

    ds = read("MR_small.dcm")
    ds.NumberOfFrames = 10**9
    save(ds, folder / "billion_frames.dcm")
    expected["billion_frames.dcm"] = "truncated_pixel_data"

    ds = read("JPEG2000.dcm")
    ds.NumberOfFrames = 10**9
    save(ds, folder / "billion_frames_j2k.dcm")
    expected["billion_frames_j2k.dcm"] = "invalid_header: Number of Frames 1000000000 exceeds"

    write_rle_panic(folder / "rle_panic.dcm")
    expected["rle_panic.dcm"] = "decode_failed: the decoder panicked (PanicException)"

    write_deflate_bomb(folder / "deflate_bomb.dcm", inflated_bytes=1536 << 20)
    expected["deflate_bomb.dcm"] = "too_large: decoding needed more memory"

    for name, reason in (("rtplan.dcm", "non_image"), ("test-SR.dcm", "non_image")):
        shutil.copy(get_testdata_file(name), folder / name)
        expected[name] = reason
    return expected


def write_special_entries(folder: pathlib.Path) -> dict[str, str]:
    """Create entries that are not readable regular files; return {name: expected reason}.

    Tests run as root here, and root reads a chmod 000 file. So the unreadable entries are
    ones that fail for every user: a FIFO, which a plain open() would wait on forever for a
    writer, a dangling symbolic link and a loop of two links. A link to an ancestor folder
    would make a walk that follows links endless.
    """
    os.mkfifo(folder / "fifo.dcm")
    os.symlink(folder / "missing.dcm", folder / "dangling.dcm")
    os.symlink(folder / "loop_b.dcm", folder / "loop_a.dcm")
    os.symlink(folder / "loop_a.dcm", folder / "loop_b.dcm")
    os.symlink("..", folder / "link_to_parent")
    return {
        "fifo.dcm": "not_a_file: FIFO",
        "dangling.dcm": "unreadable: file not found",
        "loop_a.dcm": "symlink_loop",
        "loop_b.dcm": "symlink_loop",
        "link_to_parent": "not_a_file: folder not searched",
    }


@pytest.fixture(scope="module")
def hostile_corpus(tmp_path_factory):
    """Return (input root, {bad file name: expected reason}); good files are under good/."""
    root = tmp_path_factory.mktemp("hostile_input")
    (root / "good").mkdir()
    for name in GOOD_NAMES:
        shutil.copy(get_testdata_file(name), root / "good" / name)
    (root / "bad").mkdir()
    expected = write_bad_dicoms(root / "bad")
    expected.update(write_special_entries(root / "bad"))
    return root, expected


def run_cli(*args: str) -> tuple[str, int]:
    """Run prepare's command line in a fresh process.

    Returns its stdout and stderr together, and the peak resident memory in bytes of its
    largest child process, that is, of the largest decoding worker.
    """
    script = (
        "import resource, sys\n"
        "from vismae_jax.data import prepare\n"
        "try:\n"
        "    prepare.run_cli(sys.argv)\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    maxrss_kib = int(completed.stdout.split("MAXRSS_KIB")[-1].split()[0])
    return output, maxrss_kib * 1024


def stored_images(corpus: pathlib.Path) -> list[tuple]:
    """Return (source_hash, frame, modality, height, width, image bytes) per record, in order."""
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()]
    summary = json.loads((corpus / "summary.json").read_text())
    records = []
    for shard in summary["shards"]:
        reader = array_record_module.ArrayRecordReader(str(corpus / shard["file"]))
        records.extend(reader.read_all())
        reader.close()
    assert len(records) == len(rows)
    return [
        (row["source_hash"], row["frame"], row["modality"], row["height"], row["width"], image)
        for row, image in zip(rows, records, strict=True)
    ]


@pytest.fixture(scope="module")
def hostile_run(hostile_corpus, tmp_path_factory):
    """Prepare the hostile corpus with the command line; return (output dir, log, peak RSS)."""
    root, _ = hostile_corpus
    output = tmp_path_factory.mktemp("hostile_output")
    log, peak_rss_bytes = run_cli(
        f"--input={root}",
        f"--output_dir={output}",
        "--image_size=32",
        f"--files_per_shard={FILES_PER_SHARD}",
        "--num_workers=2",
        "--file_timeout_s=60",
        f"--worker_memory_mib={WORKER_MEMORY_MIB}",
        f"--path_salt={SALT}",
    )
    return output, log, peak_rss_bytes


def test_hostile_rejects_reasons(hostile_corpus, hostile_run):
    root, expected = hostile_corpus
    output, _, _ = hostile_run
    names = {
        prepare.source_hash(SALT, source.path): os.path.basename(source.path)
        for source in prepare.list_input_files([str(root)])
    }
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    reasons = {names[row["source_hash"]]: row["reason"] for row in rejects}

    assert len(rejects) == len(reasons)
    assert sorted(reasons) == sorted(expected)
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])


def test_hostile_good_images_kept(hostile_corpus, hostile_run, tmp_path):
    root, _ = hostile_corpus
    output, _, _ = hostile_run
    reference = tmp_path / "reference"
    prepare.prepare_corpus(
        prepare.list_input_files([str(root / "good")]),
        str(reference),
        OPTIONS,
        files_per_shard=FILES_PER_SHARD,
        num_workers=0,
        path_salt=SALT,
        progress=False,
    )
    kept = stored_images(output)
    assert len(kept) > len(GOOD_NAMES)
    assert kept == stored_images(reference)


def test_hostile_summary_counts(hostile_corpus, hostile_run):
    _, expected = hostile_corpus
    output, _, _ = hostile_run
    summary = json.loads((output / "summary.json").read_text())
    assert summary["num_files"] == len(GOOD_NAMES) + len(expected)
    assert summary["num_rejects"] == len(expected)


def test_hostile_worker_memory_bounded(hostile_run):
    _, log, peak_rss_bytes = hostile_run
    assert peak_rss_bytes < WORKER_MEMORY_MIB * 2**20, peak_rss_bytes / 2**20
    assert "0 replaced after a timeout or crash" in log


def decode_path(path: str) -> str:
    """Decode a path with the DICOM decoder alone, without prepare's file checks.

    Returns the number of frames, or the reject reason. Other exceptions end the worker; a
    file named segfault* makes it read address 0 in C, so the worker dies of SIGSEGV.
    """
    if os.path.basename(path).startswith("segfault"):
        ctypes.string_at(0)
    try:
        return f"{len(dicom.decode_dicom(path, OPTIONS).frames)} frames"
    except RejectedFile as rejected:
        return rejected.reason


def test_pool_replaces_hung_and_crashed(tmp_path):
    # Real inputs that stop a decoder: pydicom opens a FIFO and waits for a writer forever, and
    # the corrupt RLE file raises PanicException past the worker's function.
    fifo = tmp_path / "scan.dcm"
    os.mkfifo(fifo)
    panic = tmp_path / "panic.dcm"
    write_rle_panic(panic)
    # No real input is known to crash a decoder in C, so this file simulates one.
    segfault = tmp_path / "segfault.dcm"
    shutil.copy(get_testdata_file("MR_small.dcm"), segfault)
    good = get_testdata_file("CT_small.dcm")
    tasks = [good, str(fifo), good, str(panic), str(segfault), good]

    pool = WorkerPool(
        decode_path,
        num_workers=2,
        timeout_s=6.0,
        failure=lambda task, reason: reason,
    )
    start = time.monotonic()
    results = list(pool.map(tasks))
    elapsed = time.monotonic() - start

    assert results[0] == results[2] == results[5] == "1 frames"
    assert results[1] == "timeout: the task took longer than 6 s"
    assert results[3] == "worker_crashed: the worker died (exit code 1)"
    assert results[4] == "worker_crashed: the worker died (killed by SIGSEGV)"
    assert pool.num_replaced == 3
    assert elapsed < 60


# Patient identifiers planted in headers, PNG text chunks, folder names and file names.
PLANTED_TAGS = {
    "PatientName": "Zyxwvut^Qplantedname",
    "PatientID": "PID98765PLANT",
    "PatientBirthDate": "19011231",
    "AccessionNumber": "ACC4242PLANT",
    "InstitutionName": "Qwertyhospital Plantclinic",
    "ReferringPhysicianName": "Drplanted^Vbnmer",
    "StudyDate": "19020317",
}
PLANTED_STRINGS = (
    "Zyxwvut", "Qplantedname", "PID98765PLANT", "19011231", "ACC4242PLANT", "Qwertyhospital",
    "Plantclinic", "Drplanted", "Vbnmer", "19020317",
)  # fmt: skip


def planted_dicom(name: str) -> pydicom.Dataset:
    ds = read(name)
    for keyword, value in PLANTED_TAGS.items():
        setattr(ds, keyword, value)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    return ds


@pytest.fixture(scope="module")
def patient_corpus(tmp_path_factory) -> pathlib.Path:
    """Write good, duplicate and broken files with planted identifiers; return the input root."""
    root = tmp_path_factory.mktemp("patients")
    study = root / "Zyxwvut_Qplantedname_PID98765PLANT" / "ACC4242PLANT_19011231"
    study.mkdir(parents=True)
    planted_dicom("MR_small.dcm").save_as(study / "Zyxwvut_mr.dcm")
    shutil.copy(study / "Zyxwvut_mr.dcm", study / "Zyxwvut_mr_copy.dcm")

    ct_bytes = pydicom.filebase.DicomBytesIO()
    planted_dicom("CT_small.dcm").save_as(ct_bytes)
    (study / "PID98765PLANT_truncated.dcm").write_bytes(ct_bytes.getvalue()[:-5000])

    # An unregistered SOP Class UID holding text, which a reject reason must not quote.
    ds = planted_dicom("MR_small.dcm")
    del ds.PixelData
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid UI and CS values.
        ds.SOPClassUID = "Zyxwvut.Qplantedname"
        ds.Modality = "Vbnmer"
        ds.save_as(study / "no_pixels.dcm", enforce_file_format=False)

    chest = root / "Qwertyhospital_Plantclinic"
    chest.mkdir()
    text = PngImagePlugin.PngInfo()
    text.add_text("Patient", "Zyxwvut^Qplantedname PID98765PLANT 19011231")
    Image.fromarray(np.arange(64 * 48, dtype=np.uint16).reshape(64, 48)).save(
        chest / "Drplanted_chest.png", pnginfo=text
    )
    return root


def find_planted(content: bytes) -> list[str]:
    return [planted for planted in PLANTED_STRINGS if planted.lower().encode() in content.lower()]


def test_planted_identifiers_absent(patient_corpus, tmp_path):
    output = tmp_path / "out"
    log, _ = run_cli(
        f"--input={patient_corpus}",
        f"--output_dir={output}",
        "--image_size=32",
        "--num_workers=1",
    )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["num_images"] == 2
    assert summary["rejects_per_reason"] == {
        "duplicate": 1,
        "missing_pixel_data": 1,
        "truncated_pixel_data": 1,
    }

    assert find_planted(log.encode()) == []
    for path in sorted(output.rglob("*")):
        if path.is_file():
            assert find_planted(path.read_bytes()) == [], path.name


def test_lookup_hash_finds_reject(patient_corpus, tmp_path):
    output = tmp_path / "out"
    run_cli(f"--input={patient_corpus}", f"--output_dir={output}", "--num_workers=0")
    rejects = [json.loads(line) for line in (output / "rejects.jsonl").read_text().splitlines()]
    truncated = next(row for row in rejects if row["reason"].startswith("truncated"))

    printed, _ = run_cli(
        f"--input={patient_corpus}",
        f"--output_dir={output}",
        f"--lookup_hash={truncated['source_hash']}",
    )
    assert f"{truncated['source_hash']}\t{patient_corpus}/" in printed
    assert "PID98765PLANT_truncated.dcm" in printed


def test_rejects_with_paths_relative(patient_corpus, tmp_path):
    prepare.prepare_corpus(
        prepare.list_input_files([str(patient_corpus)]),
        str(tmp_path),
        OPTIONS,
        num_workers=0,
        rejects_with_paths=True,
        progress=False,
    )
    rejects = [json.loads(line) for line in (tmp_path / "rejects.jsonl").read_text().splitlines()]
    paths = sorted(row["path"] for row in rejects)
    study = "Zyxwvut_Qplantedname_PID98765PLANT/ACC4242PLANT_19011231"
    assert paths == [
        f"{study}/PID98765PLANT_truncated.dcm",
        f"{study}/Zyxwvut_mr_copy.dcm",
        f"{study}/no_pixels.dcm",
    ]
