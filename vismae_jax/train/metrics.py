"""Training metrics: kept on the devices between logging steps, then logged and sent to TensorBoard.

The train step returns a dict of scalar device arrays. The loop only keeps references to them
(no computation, no transfer) until `MetricBuffer.fetch` copies them to the host at logging
steps. So fetching metrics costs no host sync on other steps, and the loop itself waits only
for the step before the one it has just dispatched. clu's metric writers import TensorFlow, so
TensorBoard event files are written with tensorboardX.
"""

import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import tensorboardX
from absl import logging

from vismae_jax.train import hooks

# Metrics logged as the value of the interval's last step; all others are averaged over it.
LAST_VALUE_METRICS = frozenset({"learning_rate", "param_norm"})


class MetricBuffer:
    """Buffer of the per-step metric dicts (device arrays) of steps not yet fetched."""

    def __init__(self):
        self._steps: list[int] = []
        self._metrics: list[Mapping[str, jax.Array]] = []

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        """Keep a reference to `metrics` of `step` (does not wait for the devices)."""
        self._steps.append(step)
        self._metrics.append(metrics)

    def fetch(self) -> list[tuple[int, dict[str, float]]]:
        """Copy all buffered metrics to the host, empty the buffer and check the loss.

        Blocks until the newest buffered step has finished on the devices.

        Raises:
            FloatingPointError: a step's loss is NaN or infinite; the message names the first
                such step.
        """
        host_metrics = jax.device_get(self._metrics)
        fetched = [
            (step, {name: float(np.asarray(value)) for name, value in metrics.items()})
            for step, metrics in zip(self._steps, host_metrics, strict=True)
        ]
        self._steps, self._metrics = [], []

        for step, metrics in fetched:
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(
                    f"The training loss is {metrics['loss']} at step {step}; stopping. Lower "
                    "config.train.learning_rate, set config.train.grad_clip_norm, or resume from "
                    "an earlier checkpoint."
                )
        return fetched


def summarize(fetched: list[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """Combine the per-step metrics of one interval: the mean, or the last value for
    `LAST_VALUE_METRICS` (learning rate, parameter norm)."""
    if not fetched:
        return {}
    names = fetched[-1][1].keys()
    summary = {}
    for name in names:
        values = [metrics[name] for _, metrics in fetched]
        summary[name] = values[-1] if name in LAST_VALUE_METRICS else float(np.mean(values))
    return summary


def format_log_line(step: int, total_steps: int, scalars: Mapping[str, float]) -> str:
    """Format one progress line, e.g. `step 50/600 loss 0.8123 lr 1.0e-03 ... ETA 3m02s`."""
    parts = [f"step {step}/{total_steps}"]
    formats = {
        "loss": ("loss", "{:.4f}"),
        "learning_rate": ("lr", "{:.2e}"),
        "grad_norm": ("grad_norm", "{:.3f}"),
        "param_norm": ("param_norm", "{:.2f}"),
        "images_per_sec": ("img/s", "{:.1f}"),
        "images_per_sec_per_device": ("img/s/device", "{:.1f}"),
        "tflops_per_sec_per_device": ("TFLOP/s/device", "{:.2f}"),
        "mfu": ("MFU", "{:.1%}"),
        "data_wait_share": ("data_wait", "{:.0%}"),
    }
    for name, (label, spec) in formats.items():
        if name in scalars:
            parts.append(f"{label} {spec.format(scalars[name])}")
    if "eta_seconds" in scalars:
        parts.append(f"ETA {hooks.format_duration(scalars['eta_seconds'])}")
    return " | ".join(parts)


class MetricWriter:
    """TensorBoard event writer of process 0. On other processes every call does nothing."""

    def __init__(self, logdir: str | pathlib.Path, enabled: bool = True):
        self._writer = tensorboardX.SummaryWriter(str(logdir)) if enabled else None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Write each scalar under `train/NAME` at `step`."""
        if self._writer is None:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(f"train/{name}", value, step)

    def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Write one image: uint8 [H, W, 3] or [H, W]."""
        if self._writer is None:
            return
        dataformats = "HWC" if image.ndim == 3 else "HW"
        self._writer.add_image(tag, image, step, dataformats=dataformats)

    def write_text(self, tag: str, text: str) -> None:
        """Write a text summary (for example the config) at step 0."""
        if self._writer is not None:
            self._writer.add_text(tag, text, 0)

    def flush(self) -> None:
        """Flush pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def log_scalars(step: int, total_steps: int, scalars: Mapping[str, Any]) -> None:
    """Log one progress line (every process logs; only process 0 writes TensorBoard)."""
    logging.info(format_log_line(step, total_steps, scalars))
