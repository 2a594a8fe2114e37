"""Grain input pipeline over a prepared corpus: host-local uint8 image batches for training.

The dataset is built over batches of record keys, not records. The key stream is shuffled per
epoch with NumPy, cut into batches and sliced per JAX process. Each batch of keys is then read
from the ArrayRecord shards straight into one uint8 array. Normalisation, flips and masking
happen on device in the train step.
"""

import json
import os
import resource
import sys
import threading
from collections.abc import Sequence

import grain
import numpy as np
from absl import logging
from array_record.python import array_record_module

MODALITIES = ("all", "mr", "ct", "pet", "xray", "us")

# File buffer of each shard reader, bytes. Grain's ArrayRecordDataSource uses the same size.
READER_BUFFER_BYTES = 32 * 1024

# File descriptors left for everything else a training process opens, besides one per shard.
SPARE_FILE_DESCRIPTORS = 256


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
    also the row order of manifest.jsonl. Raises ValueError when summary.json or manifest.jsonl
    disagree with the shard list, which would make keys point past the last record.
    """
    if modality not in MODALITIES:
        raise ValueError(f"Unknown modality {modality!r}; use one of {MODALITIES}.")
    summary = read_summary(corpus_dir)
    num_images = summary["num_images"]
    num_records = sum(shard["num_records"] for shard in summary["shards"])
    if num_records != num_images:
        raise ValueError(
            f"{os.path.join(corpus_dir, 'summary.json')} lists {num_images} images but its "
            f"shards contain {num_records} records; the file was edited or mixes two runs: prepare "
            "the corpus again."
        )
    if modality == "all":
        return np.arange(num_images, dtype=np.int64)

    keys = []
    num_rows = 0
    manifest_path = os.path.join(corpus_dir, "manifest.jsonl")
    with open(manifest_path, encoding="utf-8") as manifest:
        for num_rows, line in enumerate(manifest, start=1):
            if json.loads(line)["modality"] == modality:
                keys.append(num_rows - 1)
    if num_rows != num_images:
        raise ValueError(
            f"{manifest_path} has {num_rows} rows but summary.json lists {num_images} images; "
            "the two come from different runs: prepare the corpus again."
        )
    return np.asarray(keys, dtype=np.int64)


def corpus_size(corpus_dir: str, modality: str = "all") -> int:
    """Return the number of records available after filtering by `modality`."""
    return len(record_keys(corpus_dir, modality))


class ShuffledKeyBatches:
    """Random-access source whose element i is the i-th batch of the shuffled key stream.

    The stream concatenates the epochs 0, 1, 2, ... and epoch e is a permutation of `keys` drawn
    from `np.random.default_rng([seed, e])`. Element i, int64 [batch_size], contains the stream
    positions i * batch_size to (i + 1) * batch_size - 1, so a batch may span two epochs (or
    more when the corpus is smaller than a batch). Its length is `sys.maxsize`: the stream never
    ends. Every process builds the same stream; slicing the batches by process comes later.
    """

    def __init__(self, keys: np.ndarray, batch_size: int, seed: int):
        if seed < 0:
            # NumPy seeds its generators with non-negative integers only.
            raise ValueError(
                f"Invalid seed: the data order needs a seed >= 0, got {seed}. Set config.seed "
                "to a non-negative integer."
            )
        self.keys = np.asarray(keys, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self._lock = threading.Lock()
        self._epochs: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_epochs"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ShuffledKeyBatches(num_keys={len(self.keys)}, batch_size={self.batch_size}, "
            f"seed={self.seed})"
        )

    def __len__(self) -> int:
        return sys.maxsize

    def __getitem__(self, index: int) -> np.ndarray:
        start = int(index) * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, len(self.keys))

        batch = np.empty(self.batch_size, dtype=np.int64)
        for epoch in range(int(epochs[0]), int(epochs[-1]) + 1):
            in_epoch = epochs == epoch
            batch[in_epoch] = self._shuffled_keys(epoch)[offsets[in_epoch]]
        return batch

    def _shuffled_keys(self, epoch: int) -> np.ndarray:
        """Return `keys` in the order of `epoch`, int64 [N]. The two latest epochs stay cached."""
        with self._lock:
            shuffled = self._epochs.get(epoch)
            if shuffled is None:
                # About 0.2 s for 2.5M keys (NumPy 2, one core), once per epoch and process.
                shuffled = np.random.default_rng([self.seed, epoch]).permutation(self.keys)
                self._epochs = {e: k for e, k in self._epochs.items() if e == epoch - 1}
                self._epochs[epoch] = shuffled
            return shuffled


class ReadImageBatch(grain.transforms.Map):
    """Read a batch of records by key into {"image": uint8 [B, S, S, C]}.

    Each record is copied once, from the bytes that the ArrayRecord reader returns into its row
    of a preallocated batch (and broadcast to C channels when the corpus stores gray images).
    Stores only shard paths and sizes, so it pickles into Grain worker processes. Each process
    opens one ArrayRecord reader per shard when it first reads from it, and keeps it open.
    """

    def __init__(self, shard_paths: Sequence[str], shard_sizes: Sequence[int], image_size: int,
                 stored_channels: int, channels: int):  # fmt: skip
        self.shard_paths = list(shard_paths)
        self.shard_sizes = [int(size) for size in shard_sizes]
        self.shard_ends = np.cumsum(self.shard_sizes, dtype=np.int64)
        self.shard_starts = self.shard_ends - self.shard_sizes
        self.image_size = image_size
        self.stored_channels = stored_channels
        self.channels = channels
        self._lock = threading.Lock()
        self._readers: dict[int, array_record_module.ArrayRecordReader] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        state["_readers"] = {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        raise_open_file_limit(len(self.shard_paths))  # In each Grain worker process.

    def __repr__(self) -> str:
        return (
            f"ReadImageBatch(num_shards={len(self.shard_paths)}, image_size={self.image_size}, "
            f"stored_channels={self.stored_channels}, channels={self.channels})"
        )

    def map(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Read the records of `keys` (int64 [B]) into {"image": uint8 [B, S, S, C]}."""
        size, stored = self.image_size, self.stored_channels
        images = np.empty((len(keys), size, size, self.channels), dtype=np.uint8)
        shards = np.searchsorted(self.shard_ends, keys, side="right")
        positions = keys - self.shard_starts[shards]

        rows_per_shard: dict[int, list[int]] = {}
        for row, shard in enumerate(shards.tolist()):
            rows_per_shard.setdefault(shard, []).append(row)

        for shard, rows in rows_per_shard.items():
            records = self._reader(shard).read(positions[rows].tolist())
            for row, record in zip(rows, records, strict=True):
                if len(record) != size * size * stored:
                    raise ValueError(
                        f"Record {int(positions[row])} of {self.shard_paths[shard]} has "
                        f"{len(record)} bytes, not {size}x{size}x{stored}; prepare the corpus "
                        "again."
                    )
                images[row] = np.frombuffer(record, dtype=np.uint8).reshape(size, size, stored)
        return {"image": images}

    def _reader(self, shard: int) -> array_record_module.ArrayRecordReader:
        reader = self._readers.get(shard)
        if reader is not None:
            return reader

        with self._lock:
            if shard not in self._readers:
                path = self.shard_paths[shard]
                # Random access: no readahead and no reader threads (read() runs in the caller,
                # and Grain's prefetch threads call map() concurrently). A small file buffer
                # keeps thousands of open shards cheap.
                # Readers stay open, so each process keeps one file descriptor per shard it has
                # read. `make_dataset` raises the soft limit on open files to fit them.
                reader = array_record_module.ArrayRecordReader(
                    path,
                    "readahead_buffer_size:0,max_parallelism:0",
                    file_reader_buffer_size=READER_BUFFER_BYTES,
                )
                if not reader.ok():
                    raise _open_error(path, reader, len(self.shard_paths))
                if reader.num_records() != self.shard_sizes[shard]:
                    raise ValueError(
                        f"{path} has {reader.num_records()} records but summary.json lists "
                        f"{self.shard_sizes[shard]}; the corpus changed after preparation, "
                        "prepare it again."
                    )
                self._readers[shard] = reader
            return self._readers[shard]


def _open_error(path: str, reader, num_shards: int) -> OSError:
    """Return an error saying why `reader` failed to open the shard at `path`, and the fix."""
    status = ""
    try:
        reader.read([])  # A reader that failed to open raises its status here, if it has one.
    except RuntimeError as error:
        status = str(error)

    if "Too many open files" in status:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return OSError(
            f"Cannot open {path}: this process reached its limit of {soft} open files (hard "
            f"limit {hard}), and it keeps one reader open per shard of the {num_shards}. Raise "
            f"the hard limit (`ulimit -Hn`) to at least {num_shards + SPARE_FILE_DESCRIPTORS}, "
            "or prepare the corpus with a larger --files_per_shard."
        )
    status = status or "not a complete ArrayRecord file"
    return OSError(
        f"Cannot open {path} ({status}); the corpus changed after preparation, prepare it again."
    )


def raise_open_file_limit(num_shards: int) -> None:
    """Raise this process's soft limit on open files to fit one reader per shard, if need be.

    Worker processes started afterwards inherit the limit. The soft limit never exceeds the
    hard one. When the hard limit is too low, logs a warning before any shard is opened.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    required = num_shards + SPARE_FILE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or soft >= required:
        return

    new_soft = required if hard == resource.RLIM_INFINITY else min(required, hard)
    if new_soft > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        logging.info("Raised the soft limit on open files from %d to %d.", soft, new_soft)
    if new_soft < required:
        logging.warning(
            "%d shards need about %d open files per process, but the hard limit is %d: reading "
            "fails once that many shards are open. Raise `ulimit -Hn` or prepare the corpus "
            "with a larger --files_per_shard.",
            num_shards, required, hard,
        )  # fmt: skip


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

    Shuffling is global and differs per epoch (`ShuffledKeyBatches`: one seeded NumPy
    permutation of the keys per epoch). The shuffled stream is cut into batches of
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

    shards = [shard for shard in summary["shards"] if shard["num_records"] > 0]
    raise_open_file_limit(len(shards))
    read = ReadImageBatch(
        [os.path.join(corpus_dir, shard["file"]) for shard in shards],
        [shard["num_records"] for shard in shards],
        image_size,
        summary["channels"],
        channels,
    )

    dataset = grain.MapDataset.source(ShuffledKeyBatches(keys, batch_size, seed))
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
    # 1, 2 and 4 threads gave the same images/s on a shared 2-core CPU.
    read_options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=buffer_size)
    iterable = dataset.to_iter_dataset(read_options)
    if data_config.num_workers > 0:
        iterable = iterable.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=data_config.num_workers, per_worker_buffer_size=buffer_size
            )
        )
    return iter(iterable)
