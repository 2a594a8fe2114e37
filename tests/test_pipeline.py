"""Grain pipeline over a prepared demo corpus: batches, process sharding, shuffling, resume."""

import gc
import json
import os
import pickle
import resource
import shutil

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from array_record.python import array_record_module

from vismae_jax.data import demo, pipeline, prepare
from vismae_jax.data.images import DecodeOptions

# Grain worker processes read absl flags, which only parse under absl.app.run.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pipeline_corpus")
    sources = [prepare.SourceFile(path) for path in demo.demo_paths()]
    prepare.prepare_corpus(
        sources, str(output_dir), DecodeOptions(image_size=64), files_per_shard=8, progress=False
    )
    return str(output_dir)


@pytest.fixture(scope="session")
def record_table(corpus):
    """Map each record's bytes to its global record key."""
    summary = pipeline.read_summary(corpus)
    records = []
    for shard in summary["shards"]:
        reader = array_record_module.ArrayRecordReader(f"{corpus}/{shard['file']}")
        records.extend(reader.read_all())
        reader.close()
    table = {record: key for key, record in enumerate(records)}
    assert len(table) == len(records)
    return table


def data_config(corpus: str, **overrides) -> ml_collections.ConfigDict:
    config = {"corpus_dir": corpus, "modality": "all", "num_workers": 0, "prefetch_buffer_size": 2}
    return ml_collections.ConfigDict({**config, **overrides})


def make_iterator(corpus: str, batch_size: int, *, seed: int = 0, channels: int = 1, **kwargs):
    config_keys = {"modality", "num_workers", "prefetch_buffer_size"}
    config = data_config(corpus, **{k: v for k, v in kwargs.items() if k in config_keys})
    process = {k: v for k, v in kwargs.items() if k not in config_keys}
    return pipeline.make_train_iterator(
        config, batch_size=batch_size, image_size=64, channels=channels, seed=seed, **process
    )


def batch_keys(batch: dict, table: dict) -> list[int]:
    return [table[image.tobytes()] for image in batch["image"]]


def take(iterator, count: int) -> list[np.ndarray]:
    return [next(iterator)["image"] for _ in range(count)]


def test_batch_shape_and_dtype(corpus):
    batch = next(make_iterator(corpus, 4))
    assert set(batch) == {"image"}
    assert batch["image"].shape == (4, 64, 64, 1)
    assert batch["image"].dtype == np.uint8


def test_gray_replicated_to_three_channels(corpus):
    gray = next(make_iterator(corpus, 4))["image"]
    colour = next(make_iterator(corpus, 4, channels=3))["image"]
    assert colour.shape == (4, 64, 64, 3)
    for channel in range(3):
        np.testing.assert_array_equal(colour[..., channel], gray[..., 0])


def test_two_processes_disjoint_complete(corpus, record_table):
    # 14 MR images, 2 processes x 7 per batch: one step covers the whole first epoch.
    keys = [
        batch_keys(next(make_iterator(corpus, 7, modality="mr", process_index=p, process_count=2)),
                   record_table)
        for p in range(2)
    ]  # fmt: skip
    mr_keys = set(pipeline.record_keys(corpus, "mr").tolist())
    assert set(keys[0]).isdisjoint(keys[1])
    assert set(keys[0]) | set(keys[1]) == mr_keys


def test_two_processes_form_global_batches(corpus, record_table):
    # Per step, the per-process batches together are the global batch of one process.
    steps = 7  # 7 steps x 2 processes x 4 images = 56 of the 59 images: all of epoch 0.
    single = make_iterator(corpus, 8)
    shards = [make_iterator(corpus, 4, process_index=p, process_count=2) for p in range(2)]
    seen = []
    for _ in range(steps):
        global_keys = set(batch_keys(next(single), record_table))
        local_keys = [batch_keys(next(shard), record_table) for shard in shards]
        assert set(local_keys[0]).isdisjoint(local_keys[1])
        assert set(local_keys[0]) | set(local_keys[1]) == global_keys
        seen.extend(local_keys[0] + local_keys[1])
    assert len(set(seen)) == len(seen)


def test_shuffle_differs_per_epoch(corpus, record_table):
    iterator = make_iterator(corpus, 7, modality="mr")
    epochs = [
        [key for _ in range(2) for key in batch_keys(next(iterator), record_table)]
        for _ in range(2)
    ]
    mr_keys = set(pipeline.record_keys(corpus, "mr").tolist())
    assert set(epochs[0]) == mr_keys
    assert set(epochs[1]) == mr_keys
    assert epochs[0] != epochs[1]
    assert epochs[0] != sorted(epochs[0])


def key_stream(keys: np.ndarray, batch_size: int, seed: int, length: int) -> np.ndarray:
    batches = pipeline.ShuffledKeyBatches(keys, batch_size, seed)
    count = -(-length // batch_size)
    return np.concatenate([batches[index] for index in range(count)])[:length]


def test_key_stream_permutes_each_epoch():
    keys = np.arange(10, dtype=np.int64) * 3 + 1
    epochs = key_stream(keys, 4, seed=0, length=30).reshape(3, 10)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), keys)
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


def test_key_stream_same_for_any_batch_size():
    # Batches of 25 span three epochs of 10 keys. The stream must not depend on the cut.
    keys = np.arange(10, dtype=np.int64)
    expected = key_stream(keys, 4, seed=3, length=100)
    np.testing.assert_array_equal(key_stream(keys, 6, seed=3, length=100), expected)
    np.testing.assert_array_equal(key_stream(keys, 25, seed=3, length=100), expected)


def test_same_seed_same_batches(corpus):
    first = take(make_iterator(corpus, 8, seed=5), 3)
    second = take(make_iterator(corpus, 8, seed=5), 3)
    for batch, again in zip(first, second, strict=True):
        np.testing.assert_array_equal(again, batch)


def test_negative_seed_raises(corpus):
    with pytest.raises(ValueError, match="seed >= 0, got -1"):
        make_iterator(corpus, 4, seed=-1)


def test_seed_changes_order(corpus):
    first = next(make_iterator(corpus, 8, seed=0))["image"]
    second = next(make_iterator(corpus, 8, seed=1))["image"]
    assert not np.array_equal(first, second)


def test_restore_after_every_step(corpus):
    steps = 12  # Crosses the epoch boundary (59 images, 8 per batch).
    iterator = make_iterator(corpus, 8)
    states, batches = [], []
    for _ in range(steps):
        states.append(iterator.get_state())
        batches.append(next(iterator)["image"])

    for step, state in enumerate(states):
        restored = make_iterator(corpus, 8)
        restored.set_state(json.loads(json.dumps(state)))
        for expected in batches[step:]:
            np.testing.assert_array_equal(next(restored)["image"], expected)


def test_worker_processes_match_in_process(corpus):
    expected = take(make_iterator(corpus, 8), 4)
    iterator = make_iterator(corpus, 8, num_workers=2)
    try:
        np.testing.assert_array_equal(next(iterator)["image"], expected[0])
        state = iterator.get_state()
        np.testing.assert_array_equal(next(iterator)["image"], expected[1])
    finally:
        iterator.close()

    restored = make_iterator(corpus, 8, num_workers=2)
    try:
        restored.set_state(state)
        for batch in expected[1:]:
            np.testing.assert_array_equal(next(restored)["image"], batch)
    finally:
        restored.close()


def edited_corpus(corpus: str, tmp_path, **summary_updates) -> str:
    copy = tmp_path / "corpus"
    shutil.copytree(corpus, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary.update(summary_updates)
    (copy / "summary.json").write_text(json.dumps(summary))
    return str(copy)


def test_shard_size_mismatch_raises(corpus, tmp_path):
    summary = pipeline.read_summary(corpus)
    shards = [dict(shard) for shard in summary["shards"]]
    shards[0]["num_records"] += 1
    edited = edited_corpus(corpus, tmp_path, shards=shards, num_images=summary["num_images"] + 1)
    iterator = make_iterator(edited, summary["num_images"] + 1)  # One epoch: every shard.
    with pytest.raises(ValueError, match="records but summary.json lists"):
        next(iterator)


def test_record_size_mismatch_raises(corpus, tmp_path):
    edited = edited_corpus(corpus, tmp_path, image_size=32)
    with pytest.raises(ValueError, match="4096 bytes, not 32x32x1"):
        next(iter(pipeline.make_dataset(edited, batch_size=2, image_size=32, channels=1, seed=0)))


def test_summary_count_mismatch_raises(corpus, tmp_path):
    # More images than the shards contain would address records past the last shard.
    edited = edited_corpus(corpus, tmp_path, num_images=pipeline.corpus_size(corpus) + 5)
    with pytest.raises(ValueError, match="summary.json lists .* but its shards contain"):
        make_iterator(edited, 4)


def test_manifest_rows_mismatch_raises(corpus, tmp_path):
    edited = edited_corpus(corpus, tmp_path)
    with open(f"{edited}/manifest.jsonl", "a", encoding="utf-8") as manifest:
        manifest.write(json.dumps({"modality": "us"}) + "\n")
    with pytest.raises(ValueError, match="manifest.jsonl has .* rows but summary.json lists"):
        make_iterator(edited, 4, modality="us")


def test_missing_shard_raises(corpus, tmp_path):
    edited = edited_corpus(corpus, tmp_path)
    first_shard = pipeline.read_summary(edited)["shards"][0]["file"]
    os.remove(f"{edited}/{first_shard}")
    iterator = make_iterator(edited, pipeline.corpus_size(edited))  # One epoch: every shard.
    with pytest.raises(OSError, match="No such file or directory"):
        next(iterator)


@pytest.fixture
def tight_open_file_limit():
    """Let this process open two more files at once; restore the limit afterwards.

    That suffices to read summary.json, but not to keep the readers of the three shards open.
    """
    gc.collect()  # Close the readers of iterators that earlier tests left behind.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # open() returns the lowest free descriptor, and the limit caps descriptor numbers.
    probes = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
    for probe in probes:
        os.close(probe)
    resource.setrlimit(resource.RLIMIT_NOFILE, (probes[2], hard))
    yield hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_open_file_limit_fits_every_shard(corpus, tight_open_file_limit):
    # Readers stay open, one per shard: the pipeline raises the soft limit to fit them all.
    num_shards = len(pipeline.read_summary(corpus)["shards"])
    if tight_open_file_limit < num_shards + pipeline.SPARE_FILE_DESCRIPTORS:
        pytest.skip("hard limit on open files too low")
    num_images = pipeline.corpus_size(corpus)
    iterator = make_iterator(corpus, num_images)  # One epoch: every shard.

    assert num_shards == 3
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= pipeline.SPARE_FILE_DESCRIPTORS + 3
    assert next(iterator)["image"].shape[0] == num_images


def test_worker_copy_raises_open_file_limit(corpus, tight_open_file_limit):
    # Grain worker processes unpickle the reader: each one fits its readers too.
    read = pipeline.ReadImageBatch([f"/shard-{i}" for i in range(50)], [1] * 50, 64, 1, 1)
    pickle.loads(pickle.dumps(read))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 50 + pipeline.SPARE_FILE_DESCRIPTORS


def test_modality_filter(corpus, record_table):
    manifest_path = f"{corpus}/manifest.jsonl"
    with open(manifest_path, encoding="utf-8") as manifest:
        modalities = [json.loads(line)["modality"] for line in manifest]
    assert pipeline.corpus_size(corpus) == len(modalities)
    assert pipeline.corpus_size(corpus, "us") == modalities.count("us")

    keys = batch_keys(next(make_iterator(corpus, 2, modality="xray")), record_table)
    assert sorted(modalities[key] for key in keys) == ["xray", "xray"]


def test_image_size_mismatch_raises(corpus):
    with pytest.raises(ValueError, match="image_size=224"):
        pipeline.make_train_iterator(
            data_config(corpus), batch_size=4, image_size=224, channels=1, seed=0
        )


def test_unknown_modality_raises(corpus):
    with pytest.raises(ValueError, match="Unknown modality"):
        pipeline.corpus_size(corpus, "pathology")


def test_orbax_checkpoint_round_trip(corpus, tmp_path):
    iterator = make_iterator(corpus, 8)
    take(iterator, 3)
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = take(iterator, 2)

    restored = make_iterator(corpus, 8)
    manager.restore(
        3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(restored))
    )
    for batch in expected:
        np.testing.assert_array_equal(next(restored)["image"], batch)
    manager.close()
