"""Fine-tune and evaluate SwinUNet / SwinClassifier under the VIS-MAE downstream protocol (PyTorch).

  python -m vismae_jax.finetune --config=configs/finetune_seg.py:demo --workdir=/tmp/seg_demo
  python -m vismae_jax.finetune --config=configs/finetune_cls.py:demo --workdir=/tmp/cls_demo

For every initialisation, cross-validation split and label fraction, the model is fine-tuned on
the training subset, its best epoch is picked on the validation fold, and it is scored on the
test fold. Each finished run is saved under WORKDIR/runs/, so rerunning the same command skips
it and resumes with the next one. At the end WORKDIR contains results.csv, results.json,
label_efficiency_METRIC.png and, for segmentation, overlays/.
"""

import hashlib
import json
import logging
import pathlib
import time

import ml_collections
import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags

from vismae_jax.torch import data as data_lib
from vismae_jax.torch import demo_data, finetune_loop, protocol, report

# Test metrics reported, plotted and summarised per task.
METRICS = {
    "segmentation": ["dice", "precision", "recall"],
    "classification": ["roc_auc", "pr_auc", "accuracy"],
}

config_flags.DEFINE_config_file(
    "config", None, "Fine-tuning config file and variant, FILE:VARIANT[,key=value]."
)
flags.DEFINE_string("workdir", None, "Folder for per-run results, results.csv/json and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def load_task_data(
    config: ml_collections.ConfigDict, workdir: pathlib.Path
) -> data_lib.DownstreamData:
    """Decode the configured CSV (or the demo task) into memory."""
    if config.data.demo:
        csv_path = demo_data.demo_csv(config.task, config.data.demo_cache_dir, workdir / "demo_csv")
    elif config.data.csv:
        csv_path = pathlib.Path(config.data.csv)
    else:
        raise ValueError("Set data.csv to the task's CSV, or data.demo=True for the demo data.")

    options = data_lib.LoadOptions(
        image_size=config.data.image_size,
        window=tuple(config.data.window),
        percentiles=tuple(config.data.percentiles),
        slice_axis=config.data.slice_axis,
        empty_slice_margin=config.data.get("empty_slice_margin", -1),
    )
    return data_lib.load_dataset(data_lib.read_table(csv_path, config.task), config.task, options)


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def select_splits(splits: list[protocol.Split], indices: tuple[int, ...]) -> list[protocol.Split]:
    """Keep the splits at `indices` (all of them when `indices` is empty)."""
    if not indices:
        return splits
    invalid = [index for index in indices if not 0 <= index < len(splits)]
    if invalid:
        raise ValueError(
            f"protocol.splits_to_run {list(indices)} has indices outside 0..{len(splits) - 1}."
        )
    return [splits[index] for index in indices]


def make_dataset(
    config: ml_collections.ConfigDict,
    data: data_lib.DownstreamData,
    indices: np.ndarray,
    channels: int,
    train: bool,
) -> data_lib.SliceDataset:
    augmentation = data_lib.Augmentation(**config.augment.to_dict()) if train else None
    return data_lib.SliceDataset(
        data,
        indices,
        channels=channels,
        pixel_mean=config.data.pixel_mean,
        pixel_std=config.data.pixel_std,
        augmentation=augmentation,
        seed=config.seed,
    )


def run_one(
    config: ml_collections.ConfigDict,
    data: data_lib.DownstreamData,
    initialisation: finetune_loop.Initialisation,
    split: protocol.Split,
    train_indices: np.ndarray,
    device: torch.device,
    log_prefix: str,
) -> tuple[dict, finetune_loop.Predictions]:
    """Fine-tune one model and score it on the split's test set.

    Returns the result row (test metrics, subset sizes, best epoch, history) and the test
    predictions.
    """
    weights = finetune_loop.read_weights(initialisation)
    channels = finetune_loop.input_channels(config.data.channels, weights)
    torch.manual_seed(config.seed)
    model = finetune_loop.build_model(config, data.num_classes, channels)
    load_report = finetune_loop.initialise_model(model, weights)

    fit = finetune_loop.fit(
        model,
        make_dataset(config, data, train_indices, channels, train=True),
        make_dataset(config, data, split.validation, channels, train=False),
        config,
        data.num_classes,
        device,
        log_prefix,
    )
    test_set = make_dataset(config, data, split.test, channels, train=False)
    test_loader = finetune_loop.make_loader(
        test_set, config.train.eval_batch_size, False, config.data.num_workers, 0
    )
    predictions = finetune_loop.predict(
        model, test_loader, config.task, device, config.train.precision
    )
    test = finetune_loop.score(config.task, predictions, data.num_classes)

    result = {
        "num_train": len(train_indices),
        "num_validation": len(split.validation),
        "num_test": len(split.test),
        "best_epoch": fit.best_epoch,
        "seconds": round(fit.seconds, 1),
        **test,
        "validation": fit.best_validation,
        "history": fit.history,
        "input_channels": channels,
        "pretrained_tensors_loaded": 0 if load_report is None else len(load_report.loaded),
        "tensors_newly_initialised": None if load_report is None else len(load_report.initialised),
    }
    return result, predictions


def save_overlay(
    path: pathlib.Path,
    data: data_lib.DownstreamData,
    test_indices: np.ndarray,
    predictions,
    count: int,
    title: str,
) -> None:
    """Plot the `count` test images with the largest ground-truth lesions and their predictions."""
    lesion_pixels = (predictions.targets > 0).reshape(len(test_indices), -1).sum(axis=1)
    chosen = np.argsort(-lesion_pixels, kind="stable")[:count]
    report.plot_overlays(
        path,
        data.images[test_indices[chosen]],
        predictions.targets[chosen],
        predictions.outputs[chosen],
        title,
    )


# Fields that do not change the result of a single run: a workdir's finished runs stay valid
# when only these differ (for example when an initialisation or a label fraction is added).
RUN_INDEPENDENT_FIELDS = (
    "initialisations",
    "protocol.splits_to_run",
    "protocol.label_fractions",
    "data.demo_cache_dir",
    "data.num_workers",
    "train.device",
    "train.num_threads",
    "report",
)


def run_fingerprint(config: ml_collections.ConfigDict) -> str:
    """Hash the config fields that determine a single run's result (12 hex digits)."""
    relevant = config.to_dict()
    for dotted in RUN_INDEPENDENT_FIELDS:
        *parents, leaf = dotted.split(".")
        node = relevant
        for name in parents:
            node = node.get(name, {})
        node.pop(leaf, None)
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_finished_run(run_path: pathlib.Path, fingerprint: str) -> dict | None:
    """Return the saved result of a finished run, or None if it has not run yet."""
    if not run_path.exists():
        return None
    result = json.loads(run_path.read_text())
    if result.get("config_fingerprint") != fingerprint:
        raise ValueError(
            f"{run_path} was produced with a different config. Use a new --workdir, or delete "
            f"{run_path.parent} to recompute every run."
        )
    logging.info("%s: already done, loaded from %s.", run_path.stem, run_path)
    return result


def run_and_save(
    config: ml_collections.ConfigDict,
    data: data_lib.DownstreamData,
    initialisation: finetune_loop.Initialisation,
    split: protocol.Split,
    fraction: float,
    train_indices: np.ndarray,
    device: torch.device,
    workdir: pathlib.Path,
) -> dict:
    """Run one (initialisation, split, fraction), or load it if finished; return its result."""
    run_name = f"{initialisation.name}_{split.name}_{round(100 * fraction)}pct"
    run_path = workdir / "runs" / f"{run_name}.json"
    fingerprint = run_fingerprint(config)
    finished = load_finished_run(run_path, fingerprint)
    if finished is not None:
        return finished

    result, predictions = run_one(
        config, data, initialisation, split, train_indices, device, f"{run_name}: "
    )
    keys = {
        "initialisation": initialisation.name,
        "weights": initialisation.path,
        "split": split.name,
        "label_fraction": fraction,
        "config_fingerprint": fingerprint,
    }
    result = keys | result
    temporary = run_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(run_path)

    if config.task == "segmentation" and fraction == max(config.protocol.label_fractions):
        title = f"{initialisation.name}, {split.name}, {round(100 * fraction)}% labels (test set)"
        overlay_path = workdir / "overlays" / f"{run_name}.png"
        count = config.report.num_overlays
        save_overlay(overlay_path, data, split.test, predictions, count, title)
    return result


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Run every (initialisation, split, label fraction) and write the reports.

    Returns {"runs": [...], "summary": [...]} as written to results.json.
    """
    workdir = pathlib.Path(workdir)
    (workdir / "runs").mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    if config.train.num_threads > 0:
        torch.set_num_threads(config.train.num_threads)

    initialisations = finetune_loop.parse_initialisations(config.initialisations)
    data = load_task_data(config, workdir)
    splits = protocol.make_splits(
        data.groups, data.strata, data.folds, config.protocol.num_folds, config.seed
    )
    splits = select_splits(splits, tuple(config.protocol.splits_to_run))
    device = choose_device(config.train.device)
    metric_names = METRICS[config.task]
    logging.info(
        "Fine-tuning on %s: %d initialisations x %d splits x %d label fractions.",
        device, len(initialisations), len(splits), len(config.protocol.label_fractions),
    )  # fmt: skip

    runs = []
    start = time.perf_counter()
    for initialisation in initialisations:
        for split in splits:
            subsets = protocol.label_fraction_subsets(
                split.train, data.strata, config.protocol.label_fractions, config.seed
            )
            for fraction, train_indices in subsets.items():
                result = run_and_save(
                    config, data, initialisation, split, fraction, train_indices, device, workdir
                )
                runs.append(result)
                scores = ", ".join(f"{metric} {result[metric]:.4f}" for metric in metric_names)
                elapsed = time.perf_counter() - start
                logging.info("%s %s %d%%: test %s (%.0f s since start).", initialisation.name,
                             split.name, round(100 * fraction), scores, elapsed)  # fmt: skip

    summary = report.write_results(workdir, runs, metric_names)
    for metric in metric_names:
        report.plot_label_efficiency(workdir, summary, metric)
    logging.info("Wrote results.csv, results.json and plots to %s.", workdir)
    return {"runs": runs, "summary": summary}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
