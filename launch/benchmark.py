"""Side-by-side throughput benchmarks of vismae-jax on one machine, in one run.

The default suite (`--suite=cpu`) measures three pairs, alternating the two sides of each pair
and reporting medians over repeats:

  train     images/s of the JAX pretraining step against the PyTorch twin (vismae_jax.torch):
            same architecture, batch, float32 precision and CPU thread count;
  pipeline  Grain images/s from prepared ArrayRecord shards, in-process (one worker's rate) and
            with worker processes;
  prepare   DICOM slices/s per core of vismae_jax.data.prepare against a plain pydicom + Pillow
            loop (decode, rescale, window, resize, PNG file) over the same demo files.

`--parts=profile` (not in the default set) profiles one train step of each side with
jax.profiler and torch.profiler and splits its time into matrix products, layout copies and
other work, the breakdown behind the train-step ratio. Run it with --threads=1: with more
threads, XLA's op times add up over its worker threads while PyTorch's do not. Its ratio column
is PyTorch's seconds over ours, so above 1 means the JAX step spends less time there.

`--suite=gpu` instead sweeps per-device batch sizes of the JAX step on one accelerator in
bfloat16, with device-resident synthetic batches and then fed by the real pipeline, and
reports images/s and MFU (launch/gpu_benchmark.sh runs it).

  python launch/benchmark.py --json=/tmp/benchmark.json      # a few minutes on 2 cores
  python launch/benchmark.py --parts=train --resolution=64 --batch_size=4
"""

import contextlib
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# JAX and torch are imported only after `pin_threads` has restricted the CPUs this process may
# use, because XLA sizes its CPU thread pool from that set when its backend starts.

SUITE = flags.DEFINE_enum("suite", "cpu", ["cpu", "gpu"], "cpu: side by side; gpu: sweep.")
PARTS = flags.DEFINE_list("parts", ["train", "pipeline", "prepare"], "Parts to run.")
RESOLUTION = flags.DEFINE_integer(
    "resolution", 224, "Image side in pixels; the architecture is full-size."
)
BATCH_SIZE = flags.DEFINE_integer("batch_size", 4, "Train-step batch of the CPU suite.")
BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["128", "256", "512"], "GPU suite batch sizes.")
REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per contender; medians are reported.")
STEPS = flags.DEFINE_integer("steps", 1, "Train steps per timed repeat (CPU suite).")
GPU_STEPS = flags.DEFINE_integer("gpu_steps", 20, "Train steps per timed repeat (GPU suite).")
THREADS = flags.DEFINE_integer("threads", 0, "CPU threads for JAX and torch; 0 = all allowed.")
WORKERS = flags.DEFINE_integer("workers", 2, "Grain worker processes of the multi-worker run.")
PIPELINE_BATCH = flags.DEFINE_integer("pipeline_batch_size", 64, "Pipeline batch size.")
PIPELINE_BATCHES = flags.DEFINE_integer("pipeline_batches", 40, "Batches per pipeline repeat.")
CORPUS_DIR = flags.DEFINE_string("corpus_dir", "", "Prepared corpus; empty prepares the demo.")
JSON_PATH = flags.DEFINE_string("json", "", "Write the results as JSON to this file.")
TABLE_PATH = flags.DEFINE_string("table", "", "Write the printed table to this file too.")
REMAT = flags.DEFINE_bool("remat", False, "Recompute block activations in the backward pass.")
TIME_BUDGET = flags.DEFINE_float(
    "time_budget_s", 0.0, "GPU suite: skip sizes after this; 0 = none."
)

GIB = 2.0**30


def pin_threads(threads: int) -> list[int]:
    """Restrict this process to its first `threads` allowed CPUs (0 = all); return them."""
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:threads] if threads > 0 else allowed
    os.sched_setaffinity(0, chosen)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(len(chosen))
    return chosen


def median_rate(items: int, seconds: list[float]) -> float:
    """Return items per second of the median repeat."""
    return items / statistics.median(seconds)


def alternate(runs: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    """Time each run `repeats` times, alternating which goes first; return seconds per run."""
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def pretrain_config(image_size: int, dtype: str, remat: bool = False):
    """Return the full-size pretraining config at `image_size` with this dtype and remat."""
    from configs import pretrain

    config = pretrain.get_config("generic")
    config.model.image_size = image_size
    config.model.dtype = dtype
    config.model.remat = remat
    config.train.learning_rate = 1e-4
    return config


# --------------------------------------------------------------------------------------------
# JAX train step

JAX_STEP = "vismae_jax.train.step.make_train_step"


class JaxTrainStep:
    """The trainer's step (`JAX_STEP`), compiled ahead of time, on a device-resident uint8 batch."""

    def __init__(self, config, batch_size: int, seed: int = 0):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        from vismae_jax.models import mae
        from vismae_jax.train import optim
        from vismae_jax.train import state as state_lib
        from vismae_jax.train import step as step_lib

        model = mae.SwinMAE.from_config(config.model)
        schedule = optax.constant_schedule(config.train.learning_rate)
        tx = optim.make_optimizer(config.train, schedule)
        train_step = step_lib.make_train_step(model, tx, schedule, config)

        side, channels = config.model.image_size, config.model.channels
        tokens = (side // config.model.patch_size) ** 2
        init_images = np.zeros((1, side, side, channels), np.float32)
        init_mask = np.zeros((1, tokens), bool)
        params = jax.jit(lambda key: model.init(key, init_images, init_mask)["params"])(
            jax.random.key(seed)
        )
        self.state = state_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
        )

        pixels = np.random.default_rng(seed).integers(0, 256, (batch_size, side, side, channels))
        self.batch = {"image": jax.device_put(pixels.astype(np.uint8))}

        start = time.perf_counter()
        self.compiled = (
            jax.jit(train_step, donate_argnums=(0,)).lower(self.state, self.batch).compile()
        )
        self.compile_seconds = time.perf_counter() - start
        self.memory = self.compiled.memory_analysis()

    def run(self, steps: int) -> None:
        """Run `steps` steps without host syncs in between, then wait for the last one."""
        import jax

        metrics = None
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])

    def feed(self, batches, steps: int) -> None:
        """Run `steps` steps on host batches from `batches`, copying each to the device."""
        import jax

        metrics = None
        for _ in range(steps):
            batch = {"image": jax.device_put(next(batches)["image"])}
            self.state, metrics = self.compiled(self.state, batch)
        jax.block_until_ready(metrics["loss"])


# --------------------------------------------------------------------------------------------
# PyTorch twin


class TorchTrainStep:
    """The same step in PyTorch: normalise, flip, mask, forward, MSE on masked patches, AdamW."""

    def __init__(self, config, batch_size: int, seed: int = 0):
        import torch

        from vismae_jax.export import convert
        from vismae_jax.torch import models

        torch.manual_seed(seed)
        model_config, train = config.model, config.train
        self.data = config.data
        kwargs = convert.torch_kwargs(model_config, model_config.channels)
        self.model = models.SwinMAE(**kwargs).train()

        # Weight decay on matrices and kernels only, as in the JAX optimiser.
        no_decay = ("mask_token", "relative_position_bias_table")
        decay, other = [], []
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            exempt = param.ndim < 2 or name.rsplit(".", 1)[-1] in no_decay
            (other if exempt else decay).append(param)
        groups = [{"params": decay}, {"params": other, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=train.learning_rate,
            betas=(train.b1, train.b2),
            weight_decay=train.weight_decay,
            foreach=True,
        )

        side, channels = model_config.image_size, model_config.channels
        self.images = torch.randint(0, 256, (batch_size, channels, side, side), dtype=torch.uint8)

    def run(self, steps: int) -> None:
        """Run `steps` eager steps (each ends when the optimiser update is done)."""
        import torch

        batch_size = self.images.shape[0]
        for _ in range(steps):
            images = (self.images.float() / 255 - self.data.pixel_mean) / self.data.pixel_std
            flip = torch.rand(batch_size) < self.data.flip_probability
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            mask = self.model.random_mask(batch_size)
            loss, _, _ = self.model(images, mask)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()


def bench_train(threads: list[int]) -> dict[str, Any]:
    """Alternate the JAX and PyTorch steps on the same batch; return images/s and settings."""
    import jax
    import torch

    torch.set_num_threads(len(threads))
    config = pretrain_config(RESOLUTION.value, "float32", REMAT.value)
    batch, steps = BATCH_SIZE.value, STEPS.value

    jax_step = JaxTrainStep(config, batch)
    torch_step = TorchTrainStep(config, batch)
    jax_step.run(1)  # Warm-up: first-run allocations and caches stay out of the timings.
    torch_step.run(1)

    seconds = alternate(
        {"jax": lambda: jax_step.run(steps), "torch": lambda: torch_step.run(steps)}, REPEATS.value
    )
    jax_rate = median_rate(batch * steps, seconds["jax"])
    torch_rate = median_rate(batch * steps, seconds["torch"])
    return {
        "jax_images_per_s": jax_rate,
        "torch_images_per_s": torch_rate,
        "speedup": jax_rate / torch_rate,
        "batch": batch,
        "threads": len(threads),
        "torch_num_threads": torch.get_num_threads(),
        "cpu_affinity": threads,
        "image_size": RESOLUTION.value,
        "precision": "float32",
        "steps_per_repeat": steps,
        "repeats": REPEATS.value,
        "jax_seconds": seconds["jax"],
        "torch_seconds": seconds["torch"],
        "jax_step": JAX_STEP,
        "jax_compile_seconds": jax_step.compile_seconds,
        "jax_device_kind": jax.devices()[0].device_kind,
    }


# --------------------------------------------------------------------------------------------
# Where a train step's time goes

TORCH_MATMUL_OPS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution",
    "aten::convolution_backward", "aten::_convolution",
}  # fmt: skip
TORCH_COPY_OPS = {"aten::copy_", "aten::cat", "aten::clone", "aten::contiguous"}


def _matmul_computations(hlo_text: str) -> set[str]:
    """Return the names of HLO computations whose body contains a dot or a convolution."""
    names, current = set(), None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
        elif current and (" dot(" in line or " convolution(" in line):
            names.add(current)
    return names


def _classify_hlo_ops(hlo_text: str) -> dict[str, str]:
    """Map each HLO instruction name to "matmul", "copy" or "other"."""
    matmul_bodies = _matmul_computations(hlo_text)
    kinds = {}
    for line in hlo_text.splitlines():
        parts = line.strip().removeprefix("ROOT ").split(" = ", 1)
        if len(parts) != 2 or not parts[0].startswith("%"):
            continue
        name = parts[0].lstrip("%")
        called = parts[1].split("calls=%", 1)[1].split(",")[0] if "calls=%" in parts[1] else ""
        if (
            " dot(" in f" {parts[1]}"
            or " convolution(" in f" {parts[1]}"
            or (called in matmul_bodies)
        ):
            kinds[name] = "matmul"
        elif "copy" in name or "transpose" in name:
            kinds[name] = "copy"
        else:
            kinds[name] = "other"
    return kinds


def profile_jax_step(step: JaxTrainStep, steps: int, trace_dir: pathlib.Path) -> dict[str, float]:
    """Return the seconds per step that XLA's CPU ops spend in matmuls, copies and other work."""
    import jax
    from jax.profiler import ProfileData

    with jax.profiler.trace(str(trace_dir)):
        step.run(steps)
    kinds = _classify_hlo_ops(step.compiled.as_text())
    totals = {"matmul": 0.0, "copy": 0.0, "other": 0.0}
    for path in trace_dir.rglob("*.xplane.pb"):
        for plane in ProfileData.from_file(str(path)).planes:
            for line in plane.lines:
                for event in line.events:
                    if event.name in kinds:
                        totals[kinds[event.name]] += event.duration_ns * 1e-9 / steps
    return totals


def profile_torch_step(step: TorchTrainStep, steps: int) -> dict[str, float]:
    """Return the seconds per step (self time) of PyTorch's matmul, copy and other operators."""
    from torch import profiler

    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
        step.run(steps)
    totals = {"matmul": 0.0, "copy": 0.0, "other": 0.0}
    for event in prof.key_averages():
        kind = "matmul" if event.key in TORCH_MATMUL_OPS else "other"
        kind = "copy" if event.key in TORCH_COPY_OPS else kind
        totals[kind] += event.self_cpu_time_total * 1e-6 / steps
    return totals


def bench_profile(threads: list[int], scratch: pathlib.Path) -> dict[str, Any]:
    """Profile one step of each side at the batch and size of `train`, in seconds per kind."""
    import torch

    torch.set_num_threads(len(threads))
    config = pretrain_config(RESOLUTION.value, "float32", REMAT.value)
    jax_step = JaxTrainStep(config, BATCH_SIZE.value)
    torch_step = TorchTrainStep(config, BATCH_SIZE.value)
    jax_step.run(1)
    torch_step.run(1)
    steps = max(1, STEPS.value)
    result = {
        "jax": profile_jax_step(jax_step, steps, scratch / "jax_trace"),
        "torch": profile_torch_step(torch_step, steps),
    }
    result.update(batch=BATCH_SIZE.value, threads=len(threads), image_size=RESOLUTION.value)
    return result


# --------------------------------------------------------------------------------------------
# Grain pipeline and preparation


def prepare_demo_corpus(output_dir: pathlib.Path, image_size: int) -> dict[str, Any]:
    """Prepare the demo corpus with the project CLI; return its summary.json and the seconds."""
    command = [
        sys.executable,
        "-m",
        "vismae_jax.data.prepare",
        "--demo",
        f"--output_dir={output_dir}",
        f"--image_size={image_size}",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    summary = json.loads((output_dir / "summary.json").read_text())
    return {"summary": summary, "seconds": seconds}


def replicate_corpus(
    source_dir: pathlib.Path,
    target_dir: pathlib.Path,
    min_images: int,
    distinct_bytes: int = 256 * 2**20,
) -> pathlib.Path:
    """Return a corpus of at least `min_images` images: `source_dir`, or copies of its shards.

    The demo corpus has about 60 images, fewer than one GPU batch. Up to `distinct_bytes` of
    its shards are copied as real files, and the remaining copies are symlinks to those. So the
    reads come from the page cache (this measures the pipeline's CPU cost, not the disk), but
    from more memory than the CPU caches hold, as with a real corpus. Every copy, link or not,
    is a shard of its own with its own reader. Only summary.json and manifest.jsonl are
    rewritten.
    """
    summary = json.loads((source_dir / "summary.json").read_text())
    copies = -(-min_images // summary["num_images"])
    if copies <= 1:
        return source_dir

    (target_dir / "shards").mkdir(parents=True)
    shard_bytes = sum((source_dir / shard["file"]).stat().st_size for shard in summary["shards"])
    file_copies = max(1, min(copies, distinct_bytes // max(1, shard_bytes)))
    manifest = (source_dir / "manifest.jsonl").read_text()
    shards = []
    for copy in range(copies):
        for shard in summary["shards"]:
            name = f"shards/copy{copy:05d}-{pathlib.Path(shard['file']).name}"
            if copy < file_copies:
                (target_dir / name).write_bytes((source_dir / shard["file"]).read_bytes())
            else:
                original = f"shards/copy{copy % file_copies:05d}-{pathlib.Path(shard['file']).name}"
                (target_dir / name).symlink_to((target_dir / original).resolve())
            shards.append({**shard, "file": name})
    summary.update(
        shards=shards,
        num_images=copies * summary["num_images"],
        num_files=copies * summary["num_files"],
        images_per_modality={k: copies * v for k, v in summary["images_per_modality"].items()},
    )
    (target_dir / "summary.json").write_text(json.dumps(summary))
    (target_dir / "manifest.jsonl").write_text(manifest * copies)
    return target_dir


def time_iterator(iterator, batches: int, repeats: int) -> list[float]:
    """Time `repeats` consecutive chunks of `batches` batches each; return seconds per chunk."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds.append(time.perf_counter() - start)
    return seconds


def make_iterator(corpus_dir: pathlib.Path, workers: int, batch_size: int, image_size: int):
    """Return the training iterator over `corpus_dir` with `workers` Grain worker processes."""
    from configs import pretrain
    from vismae_jax.data import pipeline

    data_config = pretrain.get_config("generic").data
    data_config.corpus_dir = str(corpus_dir)
    data_config.num_workers = workers
    return pipeline.make_train_iterator(
        data_config, batch_size=batch_size, image_size=image_size, channels=1, seed=0
    )


def bench_pipeline(corpus_dir: pathlib.Path) -> dict[str, Any]:
    """Measure images/s of the Grain iterator in-process and with worker processes."""
    batch, batches, repeats = PIPELINE_BATCH.value, PIPELINE_BATCHES.value, REPEATS.value
    results: dict[str, Any] = {"batch": batch, "batches_per_repeat": batches}

    # A warm-up pass over the whole corpus starts the workers, fills their buffers and opens
    # every shard's reader (about 0.1 ms each). The replicated corpus has 59 images per shard,
    # where a real one has about 1,000 or more, so timing the openings would overstate their
    # cost. Each configuration runs on its own, because live worker processes would steal CPU
    # time from the in-process measurement.
    num_images = json.loads((corpus_dir / "summary.json").read_text())["num_images"]
    warmup_batches = 3 + -(-num_images // batch)
    results["warmup_batches"] = warmup_batches
    for workers in (0, WORKERS.value):
        iterator = make_iterator(corpus_dir, workers, batch, RESOLUTION.value)
        for _ in range(warmup_batches):
            next(iterator)
        seconds = time_iterator(iterator, batches, repeats)
        results[f"images_per_s_workers_{workers}"] = median_rate(batch * batches, seconds)
        results[f"seconds_workers_{workers}"] = seconds
        del iterator

    results["images_per_s_per_worker"] = results["images_per_s_workers_0"]
    results["workers"] = WORKERS.value
    results["images_per_s_with_workers"] = results[f"images_per_s_workers_{WORKERS.value}"]
    return results


def plain_loop_slices(paths: list[str], image_size: int, output_dir: pathlib.Path) -> int:
    """Run the baseline: pydicom decode, rescale, VOI window, Pillow resize and PNG per frame.

    Palette-colour files get their palette applied (once per file, to all frames) and colour
    frames are averaged to gray, so that every PNG shows the picture, as the project's output
    does. Writes one PNG per slice into `output_dir` and returns the number written. Files the
    plain loop cannot decode are skipped.
    """
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    slices = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array
            if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                pixels = apply_color_lut(pixels, ds)
        except Exception:  # noqa: BLE001 - the baseline skips what it cannot read.
            continue
        frames = pixels if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 else pixels[None]
        for frame in frames:
            if frame.ndim == 3:  # Colour: average the channels to gray.
                frame = frame.mean(axis=-1)
            values = apply_voi_lut(apply_modality_lut(frame, ds), ds).astype(np.float32)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / max(high - low, 1e-6)
            if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
                scaled = 1.0 - scaled
            image = Image.fromarray((scaled * 255).astype(np.uint8))
            image = image.resize((image_size, image_size), Image.BILINEAR)
            image.save(output_dir / f"{slices:06d}.png")
            slices += 1
    return slices


def bench_prepare() -> dict[str, Any]:
    """Measure slices/s per core of the project's preparation and of the plain loop."""
    from vismae_jax.data import demo, dicom

    paths = demo.demo_paths()
    image_size = RESOLUTION.value
    seconds: dict[str, list[float]] = {"prepare": [], "plain": []}
    cpu_seconds: dict[str, list[float]] = {"prepare": [], "plain": []}
    slices = {"prepare": 0, "plain": 0}

    with tempfile.TemporaryDirectory(prefix="vismae_bench_prepare_") as scratch:

        def run(name: str, label: str) -> None:
            output_dir = pathlib.Path(scratch) / f"{name}-{label}"
            if name == "prepare":
                # Expanded palettes stay cached across files, so each repeat starts empty.
                dicom.clear_palette_cache()
                slices[name] = summary_slices(run_prepare(paths, output_dir, image_size))
            else:
                output_dir.mkdir()
                slices[name] = plain_loop_slices(paths, image_size, output_dir)

        # One untimed run of each side first: imports, decoder plugins and file cache.
        for name in seconds:
            run(name, "warmup")
        for repeat in range(REPEATS.value):
            for name in ["prepare", "plain"] if repeat % 2 == 0 else ["plain", "prepare"]:
                start, start_cpu = time.perf_counter(), time.process_time()
                run(name, str(repeat))
                seconds[name].append(time.perf_counter() - start)
                cpu_seconds[name].append(time.process_time() - start_cpu)

    return {
        "slices_per_s_per_core": median_rate(slices["prepare"], seconds["prepare"]),
        "baseline_slices_per_s_per_core": median_rate(slices["plain"], seconds["plain"]),
        "files": len(paths),
        "prepared_slices": slices["prepare"],
        "baseline_slices": slices["plain"],
        "prepare_seconds": seconds["prepare"],
        "baseline_seconds": seconds["plain"],
        # CPU time of this process: on shared cores it leaves out the waits for other jobs.
        "cpu_slices_per_s_per_core": median_rate(slices["prepare"], cpu_seconds["prepare"]),
        "baseline_cpu_slices_per_s_per_core": median_rate(slices["plain"], cpu_seconds["plain"]),
        "prepare_cpu_seconds": cpu_seconds["prepare"],
        "baseline_cpu_seconds": cpu_seconds["plain"],
    }


def run_prepare(paths: list[str], output_dir: pathlib.Path, image_size: int) -> dict[str, Any]:
    """Prepare `paths` on one core: decoding in this process (num_workers=0), no worker pool.

    Returns the corpus summary. A worker pool would add process start-up, which a corpus of
    millions of files amortises but the 23 demo files do not.
    """
    from vismae_jax.data import images, prepare

    sources = [prepare.SourceFile(path) for path in paths]
    options = images.DecodeOptions(image_size=image_size)
    return prepare.prepare_corpus(sources, str(output_dir), options, num_workers=0, progress=False)


def summary_slices(summary: dict[str, Any]) -> int:
    """Return the number of images written, from a preparation summary."""
    return int(summary["num_images"])


# --------------------------------------------------------------------------------------------
# GPU sweep


def bench_gpu(corpus_dir: pathlib.Path | None) -> dict[str, Any]:
    """Measure images/s and MFU of the bfloat16 step per batch size, synthetic then real."""
    import jax

    from vismae_jax.models import flops

    device = jax.devices()[0]
    config = pretrain_config(RESOLUTION.value, "bfloat16", REMAT.value)
    flops_per_image = flops.train_flops_per_image(config.model)
    peak = flops.peak_flops_per_device(device.device_kind)
    start_all = time.perf_counter()
    rows, best = [], None

    for batch in (int(size) for size in BATCH_SIZES.value):
        if TIME_BUDGET.value and time.perf_counter() - start_all > TIME_BUDGET.value:
            rows.append({"batch": batch, "skipped": "time budget spent"})
            continue
        # Out of memory can surface at compile time or at the first run: either ends the sweep
        # with the sizes measured so far, not the whole benchmark.
        try:
            step = JaxTrainStep(config, batch)
            step.run(2)
            seconds = [_timed(step.run, GPU_STEPS.value) for _ in range(REPEATS.value)]
        except Exception as error:  # noqa: BLE001
            rows.append({"batch": batch, "skipped": f"{type(error).__name__}: {error}"[:200]})
            break
        rate = median_rate(batch * GPU_STEPS.value, seconds)
        memory = step.memory
        rows.append(
            {
                "batch": batch,
                "images_per_s": rate,
                "tflops_per_s": rate * flops_per_image / 1e12,
                "mfu": rate * flops_per_image / peak if peak else None,
                "step_ms": 1e3 * statistics.median(seconds) / GPU_STEPS.value,
                "compile_s": step.compile_seconds,
                "temp_gib": memory.temp_size_in_bytes / GIB if memory else None,
            }
        )
        best = (batch, step)

    results: dict[str, Any] = {
        "device_kind": device.device_kind,
        "jax_step": JAX_STEP,
        "peak_flops": peak,
        "train_flops_per_image": flops_per_image,
        "synthetic": rows,
    }
    if best and corpus_dir is not None:
        batch, step = best
        iterator = make_iterator(corpus_dir, WORKERS.value, batch, RESOLUTION.value)
        step.feed(iterator, 3)
        seconds = [_timed(step.feed, iterator, GPU_STEPS.value) for _ in range(REPEATS.value)]
        rate = median_rate(batch * GPU_STEPS.value, seconds)
        results["pipeline"] = {
            "batch": batch,
            "workers": WORKERS.value,
            "images_per_s": rate,
            "mfu": rate * flops_per_image / peak if peak else None,
        }
    return results


def _timed(function: Callable[..., None], *args: Any) -> float:
    """Return the seconds that `function(*args)` takes."""
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Report


def machine_info(threads: list[int]) -> dict[str, Any]:
    """Return the CPU model, cores, library versions, date and commit of this run."""
    import jax

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    info = {
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
        "cpu_model": cpu_model,
        "cpus_online": os.cpu_count(),
        "cpus_used": len(threads),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "commit": commit,
    }
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
    return info


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x" if theirs else ""


def _mfu(row: dict[str, Any]) -> str:
    return f"MFU {100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "MFU n/a"


def _cpu_rows(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Return table rows of the CPU suite: measure, ours, compared with, ratio."""
    rows = []
    if train := results.get("train_step"):
        ours, theirs = train["jax_images_per_s"], train["torch_images_per_s"]
        label = f"train step img/s (batch {train['batch']}, {train['threads']} threads, fp32)"
        rows.append((label, f"{ours:.2f}", f"PyTorch twin {theirs:.2f}", _ratio(ours, theirs)))
    if pipe := results.get("pipeline"):
        ours = pipe["images_per_s_per_worker"]
        rows.append(("pipeline img/s, in-process", f"{ours:.0f}", "goal 5000", _ratio(ours, 5000)))
        label = f"pipeline img/s, {pipe['workers']} workers"
        rows.append((label, f"{pipe['images_per_s_with_workers']:.0f}", "", ""))
    if prep := results.get("prepare"):
        ours, theirs = prep["slices_per_s_per_core"], prep["baseline_slices_per_s_per_core"]
        label = "prepare slices/s per core"
        rows.append((label, f"{ours:.1f}", f"pydicom+Pillow {theirs:.1f}", _ratio(ours, theirs)))
    if profile := results.get("profile"):
        for kind in ("matmul", "copy", "other"):
            ours, theirs = profile["jax"][kind], profile["torch"][kind]
            label = f"train step s in {kind} ops (profiled, batch {profile['batch']})"
            rows.append((label, f"{ours:.3f}", f"PyTorch twin {theirs:.3f}", _ratio(theirs, ours)))
    return rows


def _gpu_rows(gpu: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Return table rows of the GPU suite: measure, images/s, TFLOP/s or workers, MFU."""
    rows = []
    for row in gpu["synthetic"]:
        label = f"GPU train img/s, batch {row['batch']}, synthetic"
        if "skipped" in row:
            rows.append((label, "skipped", row["skipped"][:60], ""))
        else:
            tflops = f"{row['tflops_per_s']:.1f} TFLOP/s"
            rows.append((label, f"{row['images_per_s']:.0f}", tflops, _mfu(row)))
    if row := gpu.get("pipeline"):
        label = f"GPU train img/s, batch {row['batch']}, real pipeline"
        rows.append((label, f"{row['images_per_s']:.0f}", f"{row['workers']} workers", _mfu(row)))
    return rows


def _align(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def format_table(results: dict[str, Any]) -> str:
    """Return the results as aligned text tables, one for the CPU suite, one for the GPU suite."""
    tables = []
    if cpu_rows := _cpu_rows(results):
        tables.append(_align([("measure", "vismae-jax", "compared with", "ratio"), *cpu_rows]))
    if "gpu" in results:
        header = ("measure", "images/s", "TFLOP/s or feed", "MFU")
        tables.append(_align([header, *_gpu_rows(results["gpu"])]))
    return "\n\n".join(tables)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    threads = pin_threads(THREADS.value)
    parts = set(PARTS.value)
    results: dict[str, Any] = {}

    with tempfile.TemporaryDirectory(prefix="vismae_bench_") as scratch:
        corpus_dir = pathlib.Path(CORPUS_DIR.value) if CORPUS_DIR.value else None
        if corpus_dir is None and "pipeline" in parts:
            print("Preparing the demo corpus ...", flush=True)
            corpus_dir = pathlib.Path(scratch) / "corpus"
            results["demo_corpus"] = prepare_demo_corpus(corpus_dir, RESOLUTION.value)
        if corpus_dir is not None:
            largest_batch = max([PIPELINE_BATCH.value, *(int(b) for b in BATCH_SIZES.value)])
            min_images = 50 * largest_batch
            corpus_dir = replicate_corpus(corpus_dir, pathlib.Path(scratch) / "large", min_images)

        if SUITE.value == "gpu":
            if "train" in parts:
                print("GPU train-step sweep ...", flush=True)
                results["gpu"] = bench_gpu(corpus_dir if "pipeline" in parts else None)
        else:
            if "train" in parts:
                print(f"Train step: JAX ({JAX_STEP}) against the PyTorch twin ...", flush=True)
                results["train_step"] = bench_train(threads)
            if "pipeline" in parts:
                print("Grain pipeline ...", flush=True)
                results["pipeline"] = bench_pipeline(corpus_dir)
            if "prepare" in parts:
                print("Preparation against a plain loop ...", flush=True)
                results["prepare"] = bench_prepare()
            if "profile" in parts:
                print("Profiling one train step of each side ...", flush=True)
                results["profile"] = bench_profile(threads, pathlib.Path(scratch))

    results["machine"] = machine_info(threads)
    table = format_table(results)
    print(table)
    if TABLE_PATH.value:
        pathlib.Path(TABLE_PATH.value).write_text(table + "\n")
    if JSON_PATH.value:
        pathlib.Path(JSON_PATH.value).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    app.run(main)
