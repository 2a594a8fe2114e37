"""Grain input pipeline over a prepared corpus: host-local uint8 image batches for training.

The dataset is built over record keys, not records. Keys are shuffled per epoch, repeated,
sliced per JAX process and batched. Each batch of keys is then read from the ArrayRecord shards
in one call and decoded with a single `np.frombuffer`. Normalisation, flips and masking happen
on device in the train step.
"""

import json
import os
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging

MODALITIES = ("all", "mr", "ct", "pet", "xray", "us")


def read_summary(corpus_dir: str) -> dict:
    """Return the corpus summary.json written by `vismae_jax.data.prepare`."""
    path = os.path.join(corpus_dir, "summary.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: prepare the corpus first with "
            f"`python -m vismae_jax.data.prepare --output_dir={corpus_dir} ...`."
        )
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def record_keys(corpus_dir: str, modality: str = "all") -> np.ndarray:
    """Return the global record keys (int64 [N]) of the images of `modality`, ascending.

    Record key k addresses the k-th image over all non-empty shards in shard order, which is
    also the row order of manifest.jsonl.
    """
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; use one of {MODALITIES}.")
    summary = read_summary(corpus_dir)
    if modality == "all":
        return np.arange(summary["num_images"], dtype=np.int64)

    keys = []
    with open(os.path.join(corpus_dir, "manifest.jsonl"), encoding="utf-8") as manifest:
        for key, line in enumerate(manifest):
            if json.loads(line)["modality"] == modality:
                keys.append(key)
    return np.asarray(keys, dtype=np.int64)


def corpus_size(corpus_dir: str, modality: str = "all") -> int:
    """Return the number of records available after filtering by `modality`."""
    return len(record_keys(corpus_dir, modality))


class ReadImageBatch(grain.transforms.Map):
    """Read a batch of records by key and decode them into {"image": uint8 [B, S, S, C]}.

    Stores only shard paths and shapes, so it pickles into Grain worker processes; the
    ArrayRecord readers open lazily in each process.
    """

    def __init__(self, shard_paths: Sequence[str], image_size: int, stored_channels: int,
                 channels: int):  # fmt: skip
        self.shard_paths = list(shard_paths)
        self.image_size = image_size
        self.stored_channels = stored_channels
        self.channels = channels
        self._source = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def __repr__(self) -> str:
        return (
            f"ReadImageBatch(num_shards={len(self.shard_paths)}, image_size={self.image_size}, "
            f"stored_channels={self.stored_channels}, channels={self.channels})"
        )

    def map(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.shard_paths)
        records = self._source.__getitems__([int(key) for key in keys])

        shape = (len(records), self.image_size, self.image_size, self.stored_channels)
        images = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(shape)
        if self.channels != self.stored_channels:
            images = np.repeat(images, self.channels, axis=-1)
        return {"image": images}


def _check_corpus(summary: dict, corpus_dir: str, image_size: int, channels: int) -> None:
    if summary["image_size"] != image_size:
        raise ValueError(
            f"Corpus {corpus_dir} contains {summary['image_size']}x{summary['image_size']} images "
            f"but the model expects {image_size}x{image_size}; prepare the corpus again with "
            f"--image_size={image_size} or set model.image_size={summary['image_size']}."
        )
    if summary["channels"] not in (1, channels):
        raise ValueError(
            f"Corpus {corpus_dir} stores {summary['channels']} channels but the model takes "
            f"{channels}; prepare it without --keep_colour or set model.channels=3."
        )


def make_dataset(
    corpus_dir: str,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    seed: int,
    modality: str = "all",
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Build the infinite, shuffled, per-process batched MapDataset of image batches.

    Shuffling is global and differs per epoch. The shuffled stream is cut into batches of
    `batch_size` consecutive positions, and process p takes batches p, p + P, p + 2P, ... So at
    each step the P per-process batches, stacked in process order, are exactly the global batch
    that a single process would read with batch size P x `batch_size`: the same images in the
    same rows, whatever the process count.
    """
    summary = read_summary(corpus_dir)
    _check_corpus(summary, corpus_dir, image_size, channels)
    keys = record_keys(corpus_dir, modality)
    if len(keys) == 0:
        raise ValueError(f"Corpus {corpus_dir} has no images of modality {modality!r}.")
    if len(keys) < batch_size * process_count:
        logging.warning(
            "Corpus %s has %d images of modality %r, fewer than one global batch (%d x %d): "
            "batches repeat images.",
            corpus_dir, len(keys), modality, batch_size, process_count,
        )  # fmt: skip

    shard_paths = [
        os.path.join(corpus_dir, shard["file"])
        for shard in summary["shards"]
        if shard["num_records"] > 0
    ]
    read = ReadImageBatch(shard_paths, image_size, summary["channels"], channels)

    # NOTE: Grain's index_shuffle costs about 10 us per record over 2.5M keys but about 1 ms
    # over 59 keys (grain 0.2.18, measured on a shared 2-core CPU), so tiny corpora read slowly.
    dataset = grain.MapDataset.source(keys).seed(seed).shuffle().repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset[process_index::process_count]
    return dataset.map(read)


def make_train_iterator(
    data_config,
    *,
    batch_size: int,
    image_size: int,
    channels: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Return a checkpointable iterator of {"image": uint8 [batch_size, S, S, C]} batches.

    data_config: needs corpus_dir, modality, num_workers and prefetch_buffer_size.
    batch_size is the per-process batch. Save and restore the iterator with
    `grain.checkpoint.CheckpointSave/CheckpointRestore`; a restored iterator continues with the
    exact next batch when it uses the same num_workers.
    """
    dataset = make_dataset(
        data_config.corpus_dir,
        batch_size=batch_size,
        image_size=image_size,
        channels=channels,
        seed=seed,
        modality=data_config.modality,
        process_index=process_index,
        process_count=process_count,
    )
    buffer_size = max(1, int(data_config.prefetch_buffer_size))
    # Each element is a whole batch, so a small thread pool and buffer keep memory bounded.
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=buffer_size)
    iterable = dataset.to_iter_dataset(read_options)
    if data_config.num_workers > 0:
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.num_workers, per_worker_buffer_size=buffer_size
            )
        )
    return iter(iterable)
