"""Corpus preparation: demo corpus, determinism, resume after SIGKILL, rejects and privacy."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image
from pydicom.data import get_testdata_file

from vismae_jax.data import demo, prepare
from vismae_jax.data.images import DecodeOptions

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
OPTIONS = DecodeOptions(image_size=64)
SALT = "test-salt"


def run_prepare(sources, output_dir, **kwargs):
    """Prepare in this process (no worker processes) unless `num_workers` says otherwise."""
    kwargs = {
        "files_per_shard": 8,
        "path_salt": SALT,
        "progress": False,
        "num_workers": 0,
        **kwargs,
    }
    return prepare.prepare_corpus(sources, str(output_dir), OPTIONS, **kwargs)


def tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def read_records(corpus: pathlib.Path, shard_file: str) -> list[bytes]:
    reader = array_record_module.ArrayRecordReader(str(corpus / shard_file))
    records = reader.read_all()
    reader.close()
    return records


@pytest.fixture(scope="session")
def demo_sources():
    return [prepare.SourceFile(path) for path in demo.demo_paths()]


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory, demo_sources):
    output_dir = tmp_path_factory.mktemp("demo_corpus")
    run_prepare(demo_sources, output_dir)
    return output_dir


def test_demo_summary_counts(demo_corpus):
    summary = json.loads((demo_corpus / "summary.json").read_text())
    assert summary["image_size"] == 64
    assert summary["channels"] == 1
    assert summary["num_files"] == len(demo.demo_file_names())
    assert set(summary["images_per_modality"]) == {"ct", "mr", "pet", "us", "xray"}
    assert summary["images_per_modality"]["xray"] == 2
    assert summary["images_per_modality"]["mr"] == 14
    assert summary["num_images"] == sum(summary["images_per_modality"].values())
    assert summary["rejects_per_reason"] == {"duplicate": summary["num_rejects"]}


def test_demo_duplicates_dropped(demo_corpus, demo_sources):
    rejects = [
        json.loads(line) for line in (demo_corpus / "rejects.jsonl").read_text().splitlines()
    ]
    names = {
        prepare.source_hash(SALT, source.path): os.path.basename(source.path)
        for source in demo_sources
    }
    by_name = {names[row["source_hash"]]: row["reason"] for row in rejects}
    assert "pixels" in by_name["examples_jpeg2k.dcm"]
    assert "SOP Instance UID" in by_name["examples_palette.dcm"]


def test_manifest_matches_records(demo_corpus):
    summary = json.loads((demo_corpus / "summary.json").read_text())
    manifest = [
        json.loads(line) for line in (demo_corpus / "manifest.jsonl").read_text().splitlines()
    ]
    assert len(manifest) == summary["num_images"]

    images = []
    for shard in summary["shards"]:
        records = read_records(demo_corpus, shard["file"])
        assert len(records) == shard["num_records"]
        images.extend(records)
    assert {len(record) for record in images} == {64 * 64 * 1}
    assert len(set(images)) == len(images)

    first_xray = next(row for row in manifest if row["modality"] == "xray")
    assert (first_xray["height"], first_xray["width"]) in {(1955, 1841), (1760, 1760)}
    assert set(manifest[0]) == {
        "shard",
        "index",
        "modality",
        "height",
        "width",
        "frame",
        "source_hash",
    }


def test_demo_rerun_byte_identical(demo_corpus, demo_sources, tmp_path):
    # A second preparation with two worker processes must reproduce every output byte.
    run_prepare(demo_sources, tmp_path, num_workers=2)
    first, second = tree_bytes(demo_corpus), tree_bytes(tmp_path)
    assert sorted(first) == sorted(second)
    for name in first:
        assert first[name] == second[name], name


def test_resume_after_sigkill(tmp_path):
    # Light files first, heavy JPEG 2000 radiographs last, so the kill lands mid-run.
    names = [
        "MR_small.dcm", "CT_small.dcm", "emri_small.dcm", "examples_overlay.dcm", "US1_UNCR.dcm",
        "MR2_UNCR.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm",
    ]  # fmt: skip
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for position, name in enumerate(names):
        shutil.copy(get_testdata_file(name), inputs / f"{position:02d}_{name}")
    sources = prepare.list_input_files([str(inputs)])

    reference = tmp_path / "reference"
    run_prepare(sources, reference, files_per_shard=1)

    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "vismae_jax.data.prepare", f"--input={inputs}",
               f"--output_dir={killed}", "--image_size=64", "--files_per_shard=1",
               "--num_workers=1", f"--path_salt={SALT}"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    marker = killed / "shards" / "images-00003.json"
    deadline = time.monotonic() + 60
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert marker.exists()
    assert not (killed / "shards" / "images-00008.json").exists()

    run_prepare(sources, killed, files_per_shard=1)
    assert tree_bytes(killed) == tree_bytes(reference)


def test_rejects_reasons_and_folder_modality(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("MR_truncated.dcm", "JPEG-lossy.dcm", "rtplan.dcm", "no_meta.dcm"):
        shutil.copy(get_testdata_file(name), broken / name)
    (broken / "notes.txt").write_text("not an image")
    chest = tmp_path / "chest"
    chest.mkdir()
    ramp = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (32, 1))
    Image.fromarray(ramp).save(chest / "ramp.png")

    sources = prepare.list_input_files([str(broken), f"{chest}:xray"])
    summary = run_prepare(sources, tmp_path / "out")
    assert summary["images_per_modality"] == {"xray": 1}
    assert summary["rejects_per_reason"] == {
        "decode_failed": 1,
        "non_image": 1,
        "not_dicom": 2,
        "truncated_pixel_data": 1,
    }
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 5


def test_resume_with_other_options_raises(tmp_path):
    sources = [prepare.SourceFile(get_testdata_file("MR_small.dcm"))]
    run_prepare(sources, tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        prepare.prepare_corpus(
            sources, str(tmp_path), DecodeOptions(image_size=32), path_salt=SALT, progress=False
        )


def test_list_input_files_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "2.dcm").write_bytes(b"")
    (tmp_path / "a" / "1.png").write_bytes(b"")
    (tmp_path / "a" / ".hidden").write_bytes(b"")
    listing = tmp_path / "files.txt"
    listing.write_text(f"{tmp_path / 'c.jpg'}\tus\n")

    sources = prepare.list_input_files(
        [f"{tmp_path / 'a'}:xray", str(tmp_path / "b")], str(listing)
    )
    assert sources == [
        prepare.SourceFile(str(tmp_path / "a" / "1.png"), "xray", str(tmp_path / "a")),
        prepare.SourceFile(str(tmp_path / "b" / "2.dcm"), None, str(tmp_path / "b")),
        prepare.SourceFile(str(tmp_path / "c.jpg"), "us", None),
    ]
