"""Fine-tuning reports: results.csv/json, label-efficiency plots and segmentation overlays.

`runs` are the per-run test results written by the fine-tuning CLI: one dict per
(initialisation, split, label fraction) with the test metrics. The summary averages each metric
over splits (folds) and gives the sample standard deviation (ddof=1; 0 for a single split).
"""

import csv
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

KEY_COLUMNS = ("initialisation", "split", "label_fraction")
INFO_COLUMNS = ("num_train", "num_validation", "num_test", "best_epoch", "seconds")
# Written to results.csv when the runs have them (segmentation only).
OPTIONAL_COLUMNS = ("empty_agreement_images",)
# Overlay colours (RGB in [0, 1]): ground truth green, prediction red, overlap yellow.
GROUND_TRUTH_COLOUR = np.array([0.0, 1.0, 0.0])
PREDICTION_COLOUR = np.array([1.0, 0.0, 0.0])


def summarise(runs: list[dict], metric_names: list[str]) -> list[dict]:
    """Return one row per (initialisation, label fraction) with mean and std of each metric."""
    summary = []
    keys = sorted(
        {(run["initialisation"], run["label_fraction"]) for run in runs}, key=lambda k: (k[0], k[1])
    )
    for initialisation, fraction in keys:
        group = [
            run
            for run in runs
            if run["initialisation"] == initialisation and run["label_fraction"] == fraction
        ]
        row = {
            "initialisation": initialisation,
            "label_fraction": fraction,
            "num_splits": len(group),
        }
        for metric in metric_names:
            values = np.array([run[metric] for run in group], dtype=np.float64)
            row[f"{metric}_mean"] = float(np.mean(values))
            row[f"{metric}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary.append(row)
    return summary


def write_results(workdir: pathlib.Path, runs: list[dict], metric_names: list[str]) -> list[dict]:
    """Write results.json ({"runs", "summary"}) and results.csv; return the summary.

    results.csv has one row per run, then rows whose `split` is "mean" and "std" per
    (initialisation, label fraction).
    """
    summary = summarise(runs, metric_names)
    with open(workdir / "results.json", "w") as file:
        json.dump({"metrics": metric_names, "runs": runs, "summary": summary}, file, indent=2)

    optional = [column for column in OPTIONAL_COLUMNS if any(column in run for run in runs)]
    columns = [*KEY_COLUMNS, *metric_names, *INFO_COLUMNS, *optional]
    with open(workdir / "results.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for run in sorted(
            runs, key=lambda r: (r["initialisation"], r["label_fraction"], r["split"])
        ):
            writer.writerow(run)
        for row in summary:
            for statistic in ("mean", "std"):
                writer.writerow(
                    {
                        "initialisation": row["initialisation"],
                        "split": statistic,
                        "label_fraction": row["label_fraction"],
                        **{metric: row[f"{metric}_{statistic}"] for metric in metric_names},
                    }
                )
    return summary


def plot_label_efficiency(workdir: pathlib.Path, summary: list[dict], metric: str) -> pathlib.Path:
    """Plot mean +- std of `metric` against the label fraction, one line per initialisation."""
    figure, axes = plt.subplots(figsize=(5, 3.5), dpi=120)
    for initialisation in sorted({row["initialisation"] for row in summary}):
        rows = sorted(
            (r for r in summary if r["initialisation"] == initialisation),
            key=lambda r: r["label_fraction"],
        )
        fractions = [100 * row["label_fraction"] for row in rows]
        means = [row[f"{metric}_mean"] for row in rows]
        stds = [row[f"{metric}_std"] for row in rows]
        axes.errorbar(fractions, means, yerr=stds, marker="o", capsize=3, label=initialisation)

    axes.set_xscale("log")
    axes.set_xticks([5, 10, 25, 50, 80, 100], labels=["5", "10", "25", "50", "80", "100"])
    axes.set_xlabel("training labels used (%)")
    axes.set_ylabel(metric)
    axes.set_title(f"Label efficiency: test {metric} (mean ± std over splits)", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()

    path = workdir / f"label_efficiency_{metric}.png"
    figure.savefig(path)
    plt.close(figure)
    return path


def overlay(image: np.ndarray, ground_truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """Blend masks onto a gray image: image uint8 [H, W], masks [H, W] -> RGB float [H, W, 3]."""
    gray = np.repeat(image[..., None].astype(np.float64) / 255.0, 3, axis=-1)
    colour = gray.copy()
    truth, predicted = ground_truth > 0, prediction > 0
    colour[truth] = 0.5 * gray[truth] + 0.5 * GROUND_TRUTH_COLOUR
    colour[predicted] = 0.5 * gray[predicted] + 0.5 * PREDICTION_COLOUR
    colour[truth & predicted] = 0.5 * gray[truth & predicted] + 0.5 * (
        GROUND_TRUTH_COLOUR + PREDICTION_COLOUR
    )
    return colour


def plot_overlays(
    path: pathlib.Path,
    images: np.ndarray,
    ground_truth: np.ndarray,
    prediction: np.ndarray,
    title: str,
) -> pathlib.Path:
    """Save a row of overlays (green truth, red prediction).

    images: uint8 [N, H, W]; ground_truth, prediction: [N, H, W] class ids.
    """
    count = len(images)
    figure, axes = plt.subplots(1, count, figsize=(2.2 * count, 2.6), dpi=120, squeeze=False)
    for column in range(count):
        axes[0, column].imshow(overlay(images[column], ground_truth[column], prediction[column]))
        axes[0, column].axis("off")
    figure.suptitle(f"{title}\ngreen: ground truth, red: prediction, yellow: both", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path
