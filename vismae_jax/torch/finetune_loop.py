"""Fine-tune one SwinUNet or SwinClassifier on one training subset and pick its best epoch.

AdamW (no weight decay on biases, norms and relative position tables) with a per-step linear
warmup and cosine decay to 0; bfloat16 autocast on CUDA, float32 on CPU. After every epoch the
model is scored on the validation set, and the weights of the best epoch are kept in memory.
"""

import contextlib
import copy
import dataclasses
import logging
import math
import pathlib
import time

import ml_collections
import numpy as np
import torch

from vismae_jax.torch import data as data_lib
from vismae_jax.torch import losses, metrics, models

SEGMENTATION = "segmentation"
CLASSIFICATION = "classification"
# Metrics where lower is better; every other selection metric is maximised.
LOWER_IS_BETTER = ("loss",)


@dataclasses.dataclass(frozen=True)
class Initialisation:
    """Source of a model's starting weights: a file, or random initialisation when `path` is ""."""

    name: str  # Label in the results, for example "random" or "vismae_mae".
    path: str  # .pth ({"model": state_dict} or a bare state_dict) or .safetensors file.


def parse_initialisations(entries: tuple[str, ...] | list[str]) -> list[Initialisation]:
    """Parse "random", "PATH" or "NAME=PATH" entries; the name defaults to the file stem."""
    parsed = []
    for entry in entries:
        entry = entry.strip()
        if entry == "random":
            parsed.append(Initialisation("random", ""))
            continue
        name, _, path = entry.rpartition("=") if "=" in entry else ("", "", entry)
        path = str(pathlib.Path(path).expanduser())
        if not pathlib.Path(path).is_file():
            raise FileNotFoundError(
                f"Initialisation weights {path} not found; export pretrained weights with "
                "`python -m vismae_jax.export --workdir=DIR` or list only 'random'."
            )
        parsed.append(Initialisation(name or pathlib.Path(path).stem, path))

    names = [item.name for item in parsed]
    if len(set(names)) != len(names):
        raise ValueError(
            f"Initialisation names {names} repeat; write NAME=PATH to tell them apart."
        )
    return parsed


def read_weights(initialisation: Initialisation) -> dict[str, torch.Tensor] | None:
    """Read the initialisation's state_dict on CPU (None for random initialisation)."""
    if not initialisation.path:
        return None
    return models.read_state_dict(initialisation.path)


def input_channels(configured: int, weights: dict[str, torch.Tensor] | None) -> int:
    """Return the model's input channels: `configured` if > 0, else the weights' (random: 1).

    Exports default to 3 channels (gray replicated, the public layout) and can be written with
    1, so 0 follows whatever the weights were exported with.
    """
    if configured > 0:
        return configured
    if weights is not None and "patch_embed.proj.weight" in weights:
        return int(weights["patch_embed.proj.weight"].shape[1])
    return 1


def build_model(
    config: ml_collections.ConfigDict, num_classes: int, channels: int
) -> torch.nn.Module:
    """Build the task's model (SwinUNet or SwinClassifier) from `config.model`."""
    model_class = models.SwinUNet if config.task == SEGMENTATION else models.SwinClassifier
    return model_class(
        num_classes=num_classes,
        patch_size=config.model.patch_size,
        in_chans=channels,
        embed_dim=config.model.embed_dim,
        depths=tuple(config.model.depths),
        num_heads=tuple(config.model.num_heads),
        window_size=config.model.window_size,
        mlp_ratio=config.model.mlp_ratio,
        drop_path_rate=config.model.drop_path_rate,
    )


def initialise_model(
    model: torch.nn.Module, weights: dict[str, torch.Tensor] | None
) -> models.LoadReport | None:
    """Load pretrained weights into `model` (None: keep the random initialisation)."""
    if weights is None:
        return None
    return models.load_pretrained(model, weights)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decayed (weight matrices, kernels) and undecayed ones."""
    decayed, undecayed = [], []
    for name, parameter in model.named_parameters():
        if (
            parameter.ndim <= 1
            or name.endswith("relative_position_bias_table")
            or name == "mask_token"
        ):
            undecayed.append(parameter)
        else:
            decayed.append(parameter)
    return [
        {"params": decayed, "weight_decay": weight_decay},
        {"params": undecayed, "weight_decay": 0.0},
    ]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier: linear from 0 to 1 over warmup, then cosine from 1 to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Return bfloat16 autocast for "bfloat16", or "auto" on CUDA; else no autocast (float32)."""
    # NOTE: the tests run the bfloat16 path on CPU only; the CUDA path has not been run yet.
    if device.type == "cuda" and precision in ("auto", "bfloat16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == SEGMENTATION:
        return losses.segmentation_loss(logits, targets)
    return losses.classification_loss(logits, targets)


@dataclasses.dataclass
class Predictions:
    """Model outputs on one evaluation set."""

    loss: float  # Mean loss over batches.
    targets: np.ndarray  # Masks uint8 [N, H, W] or labels int64 [N].
    outputs: np.ndarray  # Predicted masks uint8 [N, H, W] or probabilities float32 [N, K].


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    task: str,
    device: torch.device,
    precision: str,
) -> Predictions:
    """Run `model` over `loader` in eval mode and collect targets and outputs."""
    model.eval()
    batch_losses, targets, outputs = [], [], []
    for images, batch_targets in loader:
        images, batch_targets = images.to(device), batch_targets.to(device)
        with autocast(device, precision):
            logits = model(images)
        batch_losses.append(compute_loss(task, logits, batch_targets).item())

        logits = logits.float()
        if task == SEGMENTATION:
            outputs.append(logits.argmax(dim=1).to(torch.uint8).cpu().numpy())
            targets.append(batch_targets.to(torch.uint8).cpu().numpy())
        else:
            outputs.append(torch.softmax(logits, dim=1).cpu().numpy())
            targets.append(batch_targets.cpu().numpy())
    return Predictions(
        float(np.mean(batch_losses)), np.concatenate(targets), np.concatenate(outputs)
    )


def score(task: str, predictions: Predictions, num_classes: int) -> dict[str, float]:
    """Return the task's metrics and the loss for `predictions`."""
    if task == SEGMENTATION:
        result = metrics.segmentation_metrics(predictions.outputs, predictions.targets, num_classes)
    else:
        result = metrics.classification_metrics(predictions.outputs, predictions.targets)
    return {"loss": predictions.loss, **result}


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Return True if `value` beats `best` (None: nothing yet); NaN never beats a number."""
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


@dataclasses.dataclass
class FitResult:
    """Outcome of `fit`: the best epoch (1-based), its validation scores and the history."""

    best_epoch: int
    best_validation: dict[str, float]
    history: list[dict[str, float]]  # One entry per epoch: train_loss, learning_rate, val_*.
    seconds: float


def make_loader(
    dataset: data_lib.SliceDataset, batch_size: int, shuffle: bool, num_workers: int, seed: int
) -> torch.utils.data.DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=min(batch_size, len(dataset)),
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
    )


def fit(
    model: torch.nn.Module,
    train_set: data_lib.SliceDataset,
    validation_set: data_lib.SliceDataset,
    config: ml_collections.ConfigDict,
    num_classes: int,
    device: torch.device,
    log_prefix: str = "",
) -> FitResult:
    """Train `model` for `config.train.num_epochs` and load the weights of its best epoch.

    The best epoch maximises `config.train.selection_metric` on `validation_set` (minimises
    it for "loss"). `model` is left on `device` with the best epoch's weights.
    """
    train = config.train
    train_loader = make_loader(
        train_set, train.batch_size, True, config.data.num_workers, config.seed
    )
    validation_loader = make_loader(
        validation_set, train.eval_batch_size, False, config.data.num_workers, 0
    )

    steps_per_epoch = len(train_loader)
    total_steps = train.num_epochs * steps_per_epoch
    warmup_steps = min(total_steps, round(train.warmup_epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(
        parameter_groups(model, train.weight_decay),
        lr=train.learning_rate,
        betas=(train.b1, train.b2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps)
    )

    model.to(device)
    start = time.perf_counter()
    best_value, best_epoch, best_state, best_validation = None, 0, None, {}
    history = []
    for epoch in range(1, train.num_epochs + 1):
        train_set.set_epoch(epoch)
        learning_rate = scheduler.get_last_lr()[0]
        train_loss = train_epoch(model, train_loader, optimizer, scheduler, config, device)

        validation = score(
            config.task,
            predict(model, validation_loader, config.task, device, train.precision),
            num_classes,
        )
        value = validation[train.selection_metric]
        if is_better(value, best_value, train.selection_metric):
            best_value, best_epoch, best_validation = value, epoch, validation
            best_state = copy.deepcopy(model.state_dict())

        history.append(
            {"epoch": epoch, "train_loss": train_loss, "learning_rate": learning_rate}
            | {f"val_{key}": value for key, value in validation.items()}
        )
        logging.info(
            "%sepoch %d/%d: train loss %.4f, validation %s %.4f (best %.4f at epoch %d), %.0f s",
            log_prefix, epoch, train.num_epochs, train_loss, train.selection_metric, value,
            best_value, best_epoch, time.perf_counter() - start,
        )  # fmt: skip

    model.load_state_dict(best_state)
    return FitResult(best_epoch, best_validation, history, time.perf_counter() - start)


def train_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    config: ml_collections.ConfigDict,
    device: torch.device,
) -> float:
    """Run one epoch of optimiser steps and return the mean training loss (float32)."""
    model.train()
    batch_losses = []
    for images, targets in loader:
        images, targets = (
            images.to(device, non_blocking=True),
            targets.to(device, non_blocking=True),
        )
        with autocast(device, config.train.precision):
            logits = model(images)
        loss = compute_loss(config.task, logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"Training loss is {loss.item()}. Lower train.learning_rate or check the "
                "input images."
            )

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        batch_losses.append(loss.item())
    return float(np.mean(batch_losses))
