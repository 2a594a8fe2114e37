"""Prepare a training corpus: decode DICOM/PNG/JPEG/TIFF once into ArrayRecord shards of uint8.

  python -m vismae_jax.data.prepare --input=/data/ct,/data/chest_png:xray --output_dir=OUT
  python -m vismae_jax.data.prepare --demo --output_dir=data/demo_corpus --image_size=224
  python -m vismae_jax.data.prepare --lookup_hash=HASH --input=/data/ct --output_dir=OUT

Each input folder is searched recursively; `DIR:MODALITY` sets the modality of its PNG/JPEG/TIFF
files (DICOM files use their Modality tag). Output in OUT (docs/data_outputs.md has every field):

  shards/images-NNNNN.array_record  one record per image: raw uint8 bytes of [S, S, C]
  shards/images-NNNNN.json          that shard's manifest rows, rejects and duplicate keys
  manifest.jsonl                    shard, index, modality, height, width, frame, source_hash
  rejects.jsonl                     source_hash, reason, frame (duplicate frames only), and the
                                    relative path only with --rejects_with_paths
  summary.json                      image_size, channels, shard sizes, counts per modality/reason
  prepare_config.json               options and an input-list digest, checked when resuming
  path_salt.txt                     secret salt of source_hash: keep it with the raw data

Files are sorted by path and assigned to shards in blocks of --files_per_shard, so the output is
byte-identical for the same inputs and options, whatever the number of workers. A shard counts
as finished once its .json is written (after its .array_record); a rerun skips finished shards.
The only header values written are Modality, image size and frame numbers, and files are named
by a salted hash of their path, so no output contains patient identifiers from headers or
folder names. `--lookup_hash` turns a hash back into the path, given the inputs and the salt.

Each file is decoded in a worker process under a time limit (--file_timeout_s) and an
address-space limit (--worker_memory_mib); a worker that runs over or crashes is replaced and
its file rejected, so one bad file can neither stop nor hang the run.
NOTE: identifiers burned into the pixels (common in ultrasound annotations) are not detected.
NOTE: a file rejected for `timeout` depends on machine load, so on a busy machine a rerun may
keep a slow file that an earlier run rejected.
"""

import collections
import dataclasses
import errno
import functools
import glob
import hashlib
import itertools
import json
import os
import secrets
import stat
import sys
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

from absl import app, flags, logging
from array_record.python import array_record_module
from tqdm import tqdm

from vismae_jax.data import demo
from vismae_jax.data.dicom import CORPUS_MODALITIES, decode_dicom
from vismae_jax.data.images import (
    IMAGE_EXTENSIONS,
    DecodedFile,
    DecodeOptions,
    RejectedFile,
    decode_image_file,
)
from vismae_jax.data.workers import WorkerPool

FLAGS = flags.FLAGS

SHARD_DIR = "shards"
CONFIG_FILE = "prepare_config.json"
SALT_FILE = "path_salt.txt"
RECORD_FORMAT = "raw uint8 bytes of one [image_size, image_size, channels] array, row-major"


class SourceFile(NamedTuple):
    """An input file, the modality given for its folder (None: from the DICOM header), and the
    input folder it was found in (None for files listed one by one)."""

    path: str
    modality: str | None = None
    root: str | None = None


# ---------------------------------------------------------------------------------------------
# Inputs.


def _parse_input(spec: str) -> tuple[str, str | None]:
    """Split `DIR[:MODALITY]` into the folder and the optional modality."""
    folder, separator, modality = spec.rpartition(":")
    if separator and modality.lower() in CORPUS_MODALITIES and folder:
        return folder, modality.lower()
    return spec, None


def list_input_files(inputs: Sequence[str] = (), file_list: str | None = None) -> list[SourceFile]:
    """Collect the input files, sorted by path.

    inputs: folders (searched recursively) or single files, each optionally `PATH:MODALITY`.
    file_list: a text file with one path per line, optionally followed by a tab and a modality.

    Symbolic links to folders are not followed, so link loops and links out of the input
    folder cannot make the walk endless or leave the input. Such links, folders that cannot be
    listed, and every other entry (FIFOs, dangling links) are listed too, so that preparation
    records each of them in rejects.jsonl with a reason instead of skipping it silently.
    """
    sources: dict[str, SourceFile] = {}
    for spec in inputs:
        path, modality = _parse_input(spec)
        if not os.path.isdir(path):
            if not os.path.lexists(path):
                raise FileNotFoundError(f"Input {path} is neither a folder nor a file.")
            sources[path] = SourceFile(path, modality, os.path.dirname(path) or ".")
            continue

        def keep_unlisted(error: OSError, root=path, modality=modality) -> None:
            sources[error.filename] = SourceFile(error.filename, modality, root)

        for folder, dirs, files in os.walk(path, onerror=keep_unlisted):
            dirs.sort()
            linked = [name for name in dirs if os.path.islink(os.path.join(folder, name))]
            for name in files + linked:
                if not name.startswith("."):
                    sources[os.path.join(folder, name)] = SourceFile(
                        os.path.join(folder, name), modality, path
                    )

    if file_list:
        with open(file_list, encoding="utf-8") as lines:
            for line in lines:
                path, _, modality = line.rstrip("\n").partition("\t")
                if path.strip():
                    sources[path.strip()] = SourceFile(
                        path.strip(), modality.strip().lower() or None
                    )

    for modality in {source.modality for source in sources.values()} - {None}:
        if modality not in CORPUS_MODALITIES:
            raise ValueError(f"Unknown modality {modality!r}; use one of {CORPUS_MODALITIES}.")
    return [sources[path] for path in sorted(sources)]


# ---------------------------------------------------------------------------------------------
# Decoding (runs in worker processes).

_OPEN_ERRORS = {
    errno.ELOOP: ("symlink_loop", "symbolic link loop"),
    errno.ENOENT: ("unreadable", "file not found (dangling symbolic link, or removed meanwhile)"),
    errno.EACCES: ("unreadable", "permission denied"),
    errno.EPERM: ("unreadable", "permission denied"),
}
_FILE_TYPES = {
    stat.S_IFIFO: "FIFO (named pipe)",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
}


def open_regular_file(path: str) -> BinaryIO:
    """Open a regular, non-empty file for binary reading, or raise RejectedFile saying why not.

    The file is opened without blocking and checked on the open descriptor, so a FIFO (whose
    open or read would wait for a writer forever) or a device is rejected, and a file swapped
    after the check is impossible.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        category, detail = _OPEN_ERRORS.get(
            error.errno,
            ("unreadable", f"could not open the file ({errno.errorcode.get(error.errno)})"),
        )
        raise RejectedFile(category, detail) from error

    status = os.fstat(descriptor)
    kind = stat.S_IFMT(status.st_mode)
    if kind == stat.S_IFREG and status.st_size > 0:
        return os.fdopen(descriptor, "rb")

    os.close(descriptor)
    if kind == stat.S_IFDIR:
        raise RejectedFile(
            "not_a_file",
            "folder not searched: a symbolic link to a folder (not followed) or a folder that "
            "could not be listed; pass its target as an input",
        )
    if kind != stat.S_IFREG:
        raise RejectedFile("not_a_file", f"{_FILE_TYPES.get(kind, 'special file')}, not a file")
    raise RejectedFile("empty_file", "the file has zero bytes")


def decode_source(source: SourceFile, options: DecodeOptions) -> DecodedFile:
    """Decode one input file; raises RejectedFile when it yields no image."""
    with open_regular_file(source.path) as file:
        if source.path.lower().endswith(IMAGE_EXTENSIONS):
            return decode_image_file(file, source.modality or "other", options)
        decoded = decode_dicom(file, options)
    if decoded.modality == "other" and source.modality:
        decoded.modality = source.modality
    return decoded


def decode_or_reject(source: SourceFile, options: DecodeOptions) -> tuple[DecodedFile | None, str]:
    """Return (decoded file, "") or (None, reject reason); never raises for a bad file."""
    try:
        return decode_source(source, options), ""
    except RejectedFile as rejected:
        return None, rejected.reason
    except MemoryError:
        return None, "too_large: decoding needed more memory than the worker memory limit"
    except Exception as error:  # noqa: BLE001 - one bad file must never stop a corpus run.
        return None, f"decode_failed: unexpected {type(error).__name__} while decoding"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as error:
        # Decoders written in Rust (pylibjpeg-rle) turn a panic on a corrupt codestream into
        # pyo3's PanicException, which derives from BaseException. The panic has unwound, and
        # these decoders keep no state between calls, so the worker can go on.
        return None, f"decode_failed: the decoder panicked ({type(error).__name__})"


def _failed_decode(source: SourceFile, reason: str) -> tuple[None, str]:
    return None, reason


# Defaults of the decoding limits. Decoding one 16-bit CT frame of the default max_pixels
# (8192 x 8192, a 128 MiB file) peaked at 2.6 GB resident and failed under a 2 GiB limit, so
# 4 GiB leaves about 1.4 GB for the rest of the file, which pydicom reads whole.
FILE_TIMEOUT_S = 300.0
WORKER_MEMORY_MIB = 4096


def _decode_all(
    sources: Sequence[SourceFile],
    options: DecodeOptions,
    num_workers: int,
    file_timeout_s: float,
    worker_memory_mib: int,
) -> Iterator[tuple[DecodedFile | None, str]]:
    """Yield decode results in input order, in worker processes unless num_workers is 0."""
    decode = functools.partial(decode_or_reject, options=options)
    if num_workers == 0:
        yield from map(decode, sources)
        return

    pool = WorkerPool(
        decode,
        num_workers,
        timeout_s=file_timeout_s,
        failure=_failed_decode,
        memory_limit_bytes=worker_memory_mib * 2**20,
    )
    try:
        yield from pool.map(sources)
    finally:  # Also when the caller closes this generator after the last result.
        logging.info(
            "Decoding workers: peak resident memory %.0f MiB per worker; %d replaced after a "
            "timeout or crash.",
            pool.peak_rss_bytes / 2**20, pool.num_replaced,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Output files.


def _write_atomically(path: str, data: bytes) -> None:
    """Write `data` to a temporary name, then rename it over `path`."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def _json_bytes(value) -> bytes:
    return (json.dumps(value, sort_keys=True, indent=1) + "\n").encode()


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()


def _salted_hash(salt: str, kind: str, value: str) -> str:
    return hashlib.blake2b(f"{salt}\0{kind}\0{value}".encode(), digest_size=16).hexdigest()


def source_hash(salt: str, path: str) -> str:
    """Return the salted hash that identifies an input path in manifests and rejects."""
    return _salted_hash(salt, "path", path)


def relative_path(source: SourceFile) -> str:
    """Return the path relative to its input folder, or as listed for files given one by one."""
    if source.root is None:
        return source.path
    return os.path.relpath(source.path, source.root)


def find_sources_by_hash(sources: Sequence[SourceFile], salt: str, hashes: Sequence[str]):
    """Map each source_hash in `hashes` to the input path it was computed from (absent if none)."""
    wanted = set(hashes)
    found = {}
    for source in sources:
        digest = source_hash(salt, source.path)
        if digest in wanted:
            found[digest] = source.path
    return found


def shard_name(shard: int) -> str:
    return f"images-{shard:05d}"


def _load_or_create_salt(output_dir: str, path_salt: str | None) -> str:
    """Return the salt of source hashes: the given one, the stored one, or a new random one."""
    salt_path = os.path.join(output_dir, SALT_FILE)
    if path_salt:
        stored = None
        if os.path.exists(salt_path):
            with open(salt_path, encoding="utf-8") as file:
                stored = file.read().strip()
        if stored is not None and stored != path_salt:
            raise ValueError(
                f"--path_salt differs from the salt in {salt_path}; resume with the same salt "
                "or use a new --output_dir."
            )
        salt = path_salt
    elif os.path.exists(salt_path):
        with open(salt_path, encoding="utf-8") as file:
            return file.read().strip()
    else:
        salt = secrets.token_hex(16)
    _write_atomically(salt_path, (salt + "\n").encode())
    return salt


def _check_or_write_config(output_dir: str, config: dict) -> None:
    """Store the preparation config, or check that a resumed run uses the same one."""
    config_path = os.path.join(output_dir, CONFIG_FILE)
    if os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as file:
            stored = json.load(file)
        changed = sorted(
            key for key in set(stored) | set(config) if stored.get(key) != config.get(key)
        )
        if changed:
            raise ValueError(
                f"{output_dir} was prepared with different inputs or options "
                f"({', '.join(changed)}); rerun with the original ones to resume, or use a new "
                "--output_dir."
            )
        return
    _write_atomically(config_path, _json_bytes(config))


@dataclasses.dataclass
class _DuplicateIndex:
    """Keys of images already stored: salted SOP Instance UIDs and raw-pixel hashes."""

    uid_keys: set[str] = dataclasses.field(default_factory=set)
    pixel_keys: set[str] = dataclasses.field(default_factory=set)


class _ShardBuilder:
    """Collect the images, manifest rows and rejects of one shard, in input order."""

    def __init__(
        self, shard: int, salt: str, duplicates: _DuplicateIndex, rejects_with_paths: bool
    ):
        self.shard = shard
        self.salt = salt
        self.duplicates = duplicates
        self.rejects_with_paths = rejects_with_paths
        self.images: list[bytes] = []
        self.meta = {"shard": shard, "records": [], "rejects": [], "uid_keys": [], "pixel_keys": []}

    def _reject(self, source: SourceFile, reason: str, frame: int | None = None) -> None:
        row = {"source_hash": source_hash(self.salt, source.path), "reason": reason}
        if frame is not None:
            row["frame"] = frame
        if self.rejects_with_paths:
            row["path"] = relative_path(source)
        self.meta["rejects"].append(row)

    def add(self, source: SourceFile, decoded: DecodedFile | None, reason: str) -> None:
        if decoded is None:
            self._reject(source, reason)
            return

        if decoded.sop_instance_uid:
            uid_key = _salted_hash(self.salt, "uid", decoded.sop_instance_uid)
            if uid_key in self.duplicates.uid_keys:
                self._reject(source, "duplicate: SOP Instance UID already stored")
                return
            self.duplicates.uid_keys.add(uid_key)
            self.meta["uid_keys"].append(uid_key)

        path_hash = source_hash(self.salt, source.path)
        for frame in decoded.frames:
            if frame.pixel_hash in self.duplicates.pixel_keys:
                self._reject(source, "duplicate: identical pixels already stored", frame.frame)
                continue
            self.duplicates.pixel_keys.add(frame.pixel_hash)
            self.meta["pixel_keys"].append(frame.pixel_hash)
            self.meta["records"].append(
                {
                    "index": len(self.images),
                    "modality": decoded.modality,
                    "height": decoded.height,
                    "width": decoded.width,
                    "frame": frame.frame,
                    "source_hash": path_hash,
                }
            )
            self.images.append(frame.image.tobytes())

    def write(self, output_dir: str, compression: str) -> dict:
        """Write the shard's ArrayRecord file, then its .json (which marks it finished)."""
        base = os.path.join(output_dir, SHARD_DIR, shard_name(self.shard))
        temporary = f"{base}.array_record.tmp-{os.getpid()}"
        writer = array_record_module.ArrayRecordWriter(temporary, f"group_size:1,{compression}")
        for image in self.images:
            writer.write(image)
        writer.close()
        os.replace(temporary, f"{base}.array_record")
        _write_atomically(f"{base}.json", _json_bytes(self.meta))
        return self.meta


def _shard_meta_path(output_dir: str, shard: int) -> str:
    return os.path.join(output_dir, SHARD_DIR, f"{shard_name(shard)}.json")


def _read_shard_meta(output_dir: str, shard: int) -> dict:
    with open(_shard_meta_path(output_dir, shard), encoding="utf-8") as file:
        return json.load(file)


def _count_finished_shards(output_dir: str, num_shards: int) -> int:
    """Return k such that shards 0..k-1 are finished (shards finish in order)."""
    for shard in range(num_shards):
        data_path = os.path.join(output_dir, SHARD_DIR, f"{shard_name(shard)}.array_record")
        if not (os.path.exists(_shard_meta_path(output_dir, shard)) and os.path.exists(data_path)):
            return shard
    return num_shards


def _remove_stale_files(output_dir: str, first_unfinished: int) -> None:
    """Delete temporary files and outputs of unfinished shards left by a killed run."""
    shard_dir = os.path.join(output_dir, SHARD_DIR)
    temporary = glob.glob(os.path.join(shard_dir, "*.tmp-*"))
    temporary += glob.glob(os.path.join(output_dir, "*.tmp-*"))
    for path in temporary:
        os.remove(path)
    for path in glob.glob(os.path.join(shard_dir, "images-*")):
        shard = int(os.path.basename(path).split("-")[1].split(".")[0])
        if shard >= first_unfinished:
            os.remove(path)


@dataclasses.dataclass
class _Totals:
    """Counts over finished shards; the rows themselves stay in the shard .json files."""

    shards: list[dict] = dataclasses.field(default_factory=list)
    images_per_modality: collections.Counter = dataclasses.field(
        default_factory=collections.Counter
    )
    rejects_per_reason: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def add(self, meta: dict) -> None:
        self.shards.append(
            {
                "file": f"{SHARD_DIR}/{shard_name(meta['shard'])}.array_record",
                "num_records": len(meta["records"]),
            }
        )
        self.images_per_modality.update(row["modality"] for row in meta["records"])
        self.rejects_per_reason.update(row["reason"].split(":")[0] for row in meta["rejects"])


def _write_corpus_files(output_dir: str, totals: _Totals, config: dict) -> dict:
    """Write summary.json, and manifest.jsonl and rejects.jsonl streamed from the shard files."""
    manifest_path = os.path.join(output_dir, "manifest.jsonl")
    rejects_path = os.path.join(output_dir, "rejects.jsonl")
    manifest_temporary = f"{manifest_path}.tmp-{os.getpid()}"
    rejects_temporary = f"{rejects_path}.tmp-{os.getpid()}"
    with open(manifest_temporary, "wb") as manifest, open(rejects_temporary, "wb") as rejects:
        for shard in range(len(totals.shards)):
            meta = _read_shard_meta(output_dir, shard)
            manifest.write(_jsonl_bytes([{"shard": shard, **row} for row in meta["records"]]))
            rejects.write(_jsonl_bytes(meta["rejects"]))
    os.replace(manifest_temporary, manifest_path)
    os.replace(rejects_temporary, rejects_path)

    summary = {
        "image_size": config["image_size"],
        "channels": config["channels"],
        "record_format": RECORD_FORMAT,
        "num_files": config["num_files"],
        "num_images": sum(shard["num_records"] for shard in totals.shards),
        "num_rejects": sum(totals.rejects_per_reason.values()),
        "images_per_modality": dict(sorted(totals.images_per_modality.items())),
        "rejects_per_reason": dict(sorted(totals.rejects_per_reason.items())),
        "shards": totals.shards,
    }
    _write_atomically(os.path.join(output_dir, "summary.json"), _json_bytes(summary))
    return summary


def _preparation_config(
    sources, options, files_per_shard, compression, rejects_with_paths, salt
) -> dict:
    """Return everything that must match for a rerun to resume an existing output."""
    # Salted, so that the digest of a one-file corpus cannot confirm a guessed path.
    inputs_digest = hashlib.sha256(f"{salt}\n".encode())
    for source in sources:
        inputs_digest.update(f"{source.path}\t{source.modality}\n".encode())
    config = {
        **dataclasses.asdict(options),
        "channels": options.channels,
        "files_per_shard": files_per_shard,
        "compression": compression,
        "rejects_with_paths": rejects_with_paths,
        "num_files": len(sources),
        "inputs_sha256": inputs_digest.hexdigest(),
    }
    return json.loads(json.dumps(config))  # Tuples become lists, as when read back.


def prepare_corpus(
    sources: Sequence[SourceFile],
    output_dir: str,
    options: DecodeOptions,
    *,
    files_per_shard: int = 1024,
    num_workers: int = 1,
    file_timeout_s: float = FILE_TIMEOUT_S,
    worker_memory_mib: int = WORKER_MEMORY_MIB,
    compression: str = "uncompressed",
    path_salt: str | None = None,
    rejects_with_paths: bool = False,
    progress: bool = True,
) -> dict:
    """Decode `sources` into ArrayRecord shards under `output_dir` and return the summary.

    Resumes a killed run in the same `output_dir`: finished shards are kept and their files are
    not decoded again. `compression` is an ArrayRecord option (`uncompressed`, `zstd:3`, ...).

    Files are decoded in `num_workers` processes, each file within `file_timeout_s` seconds
    and each process within `worker_memory_mib` MiB of address space (0: no limit); a file
    over either limit, or whose worker crashes, is rejected. num_workers=0 decodes in this
    process without those limits, for debugging.
    Rejected files appear in rejects.jsonl by source hash; `rejects_with_paths` adds their
    paths relative to the input folder, which may contain patient names.
    """
    if files_per_shard < 1:
        raise ValueError(f"files_per_shard must be >= 1, got {files_per_shard}.")
    sources = sorted(sources)
    os.makedirs(os.path.join(output_dir, SHARD_DIR), exist_ok=True)
    salt = _load_or_create_salt(output_dir, path_salt)
    config = _preparation_config(
        sources, options, files_per_shard, compression, rejects_with_paths, salt
    )
    _check_or_write_config(output_dir, config)

    shards = [sources[i : i + files_per_shard] for i in range(0, len(sources), files_per_shard)]
    num_finished = _count_finished_shards(output_dir, len(shards))
    _remove_stale_files(output_dir, num_finished)
    totals, duplicates = _Totals(), _DuplicateIndex()
    for shard in range(num_finished):
        meta = _read_shard_meta(output_dir, shard)
        totals.add(meta)
        duplicates.uid_keys.update(meta["uid_keys"])
        duplicates.pixel_keys.update(meta["pixel_keys"])

    logging.info(
        "Preparing %d files into %d shards in %s (%d shards already finished).",
        len(sources), len(shards), output_dir, num_finished,
    )  # fmt: skip
    remaining = list(itertools.chain.from_iterable(shards[num_finished:]))
    results = _decode_all(remaining, options, num_workers, file_timeout_s, worker_memory_mib)
    files_done = len(sources) - len(remaining)
    with tqdm(
        total=len(sources), initial=files_done, unit="file", disable=not progress, file=sys.stderr
    ) as bar:
        for shard in range(num_finished, len(shards)):
            builder = _ShardBuilder(shard, salt, duplicates, rejects_with_paths)
            for source in shards[shard]:
                decoded, reason = next(results)
                builder.add(source, decoded, reason)
                bar.update(1)
            totals.add(builder.write(output_dir, compression))
            bar.set_postfix(images=sum(totals.images_per_modality.values()), refresh=False)
    results.close()

    summary = _write_corpus_files(output_dir, totals, config)
    logging.info(
        "Prepared %d images from %d files; %d rejects by reason: %s",
        summary["num_images"], summary["num_files"], summary["num_rejects"],
        summary["rejects_per_reason"],
    )  # fmt: skip
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def define_flags() -> None:
    """Define the command-line flags of `python -m vismae_jax.data.prepare` in absl's FLAGS.

    Importing this module defines no flags, so programs that import it keep their own
    `--image_size` and the like. `run_cli` calls this before parsing.
    """
    flags.DEFINE_list("input", [], "Folders or files, each optionally DIR:MODALITY.")
    flags.DEFINE_string("file_list", None, "Text file: one path per line [TAB modality].")
    flags.DEFINE_bool("demo", False, "Prepare the demo corpus from pydicom/pydicom-data.")
    flags.DEFINE_string("output_dir", None, "Folder for shards and manifests.")
    flags.DEFINE_integer("image_size", 224, "Side of the stored square images, pixels.")
    flags.DEFINE_bool("keep_colour", False, "Store RGB (3 channels) instead of gray.")
    flags.DEFINE_bool("letterbox", False, "Keep aspect ratio and pad instead of stretch.")
    flags.DEFINE_list("ct_window", ["40", "400"], "CENTER,WIDTH in HU for CT without a window.")
    flags.DEFINE_list(
        "percentiles",
        ["0.5", "99.5"],
        "LOW,HIGH percentiles mapped to [0, 1] when there is no window.",
    )
    flags.DEFINE_integer("max_frames", 0, "Evenly spaced frames per file; 0 = all.")
    flags.DEFINE_integer(
        "max_pixels", DecodeOptions.max_pixels, "Largest frame accepted, rows x columns, in pixels."
    )
    flags.DEFINE_integer("files_per_shard", 1024, "Input files per output shard.")
    flags.DEFINE_integer(
        "num_workers", os.cpu_count() or 1, "Decoding processes; 0 decodes in this process."
    )
    flags.DEFINE_float("file_timeout_s", FILE_TIMEOUT_S, "Time limit per file, seconds.")
    flags.DEFINE_integer(
        "worker_memory_mib",
        WORKER_MEMORY_MIB,
        "Address-space limit of each decoding process, MiB; 0 = no limit.",
    )
    flags.DEFINE_string(
        "compression", "uncompressed", "ArrayRecord compression: uncompressed, zstd:LEVEL, snappy."
    )
    flags.DEFINE_string(
        "path_salt", None, "Salt of source_hash; default: random (with --demo: 'demo'), stored."
    )
    flags.DEFINE_bool(
        "rejects_with_paths",
        False,
        "Also write each rejected file's path, relative to its input folder, to rejects.jsonl. "
        "Folder and file names often contain patient names or IDs.",
    )
    flags.DEFINE_list(
        "lookup_hash",
        [],
        "Print the input paths of these source_hash values (from manifest.jsonl or rejects.jsonl) "
        "and exit. Needs the same --input or --file_list as the run and its --output_dir.",
    )


def _list_sources(path_salt: str | None) -> tuple[list[SourceFile], str | None]:
    """Return the sources named on the command line and the salt to use for them."""
    if FLAGS.demo:
        # Public files: a fixed salt keeps reruns identical.
        return [SourceFile(path) for path in demo.demo_paths()], path_salt or "demo"
    return list_input_files(FLAGS.input, FLAGS.file_list), path_salt


def _lookup(sources: Sequence[SourceFile], output_dir: str, hashes: Sequence[str]) -> None:
    """Print `hash<TAB>path` for every hash found among the sources; exit 1 if any is missing."""
    salt_path = os.path.join(output_dir, SALT_FILE)
    if not os.path.exists(salt_path):
        raise app.UsageError(f"{salt_path} not found; pass the --output_dir of the run.")
    with open(salt_path, encoding="utf-8") as file:
        salt = file.read().strip()

    found = find_sources_by_hash(sources, salt, hashes)
    for digest in hashes:
        print(f"{digest}\t{found.get(digest, 'NOT FOUND')}")
    if len(found) < len(set(hashes)):
        sys.exit(
            "Some hashes matched no input file: pass --input or --file_list exactly as in the "
            "run, since the hash covers the path as listed."
        )


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.output_dir:
        raise app.UsageError("--output_dir is required.")
    sources, path_salt = _list_sources(FLAGS.path_salt)
    if not sources:
        raise app.UsageError("No input files: pass --input, --file_list or --demo.")
    if FLAGS.lookup_hash:
        _lookup(sources, FLAGS.output_dir, FLAGS.lookup_hash)
        return

    options = DecodeOptions(
        image_size=FLAGS.image_size,
        keep_colour=FLAGS.keep_colour,
        letterbox=FLAGS.letterbox,
        ct_window=tuple(float(v) for v in FLAGS.ct_window),
        percentiles=tuple(float(v) for v in FLAGS.percentiles),
        max_frames=FLAGS.max_frames,
        max_pixels=FLAGS.max_pixels,
    )
    summary = prepare_corpus(
        sources,
        FLAGS.output_dir,
        options,
        files_per_shard=FLAGS.files_per_shard,
        num_workers=FLAGS.num_workers,
        file_timeout_s=FLAGS.file_timeout_s,
        worker_memory_mib=FLAGS.worker_memory_mib,
        compression=FLAGS.compression,
        path_salt=path_salt,
        rejects_with_paths=FLAGS.rejects_with_paths,
    )
    print(json.dumps({k: summary[k] for k in summary if k != "shards"}, indent=1))


def run_cli(argv: Sequence[str] | None = None) -> None:
    """Define the flags, parse `argv` (default sys.argv) and run `main`; exits the process."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run_cli()
