"""AdamW with a per-step warmup-cosine learning rate and a weight-decay mask.

Durations in the config are in epochs (`num_epochs`, `warmup_epochs`) or steps
(`num_steps`); `schedule_steps` converts them to steps in one place.
"""

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import optax

# Parameter names (last path element) that get no weight decay: LayerNorm scales and biases,
# every bias, the relative position bias tables of window attention and the MAE mask token.
NO_DECAY_NAMES = frozenset({"scale", "bias", "relative_position_bias_table", "mask_token"})


@dataclasses.dataclass(frozen=True)
class ScheduleSteps:
    """Lengths of a training run in optimiser steps."""

    total_steps: int  # Optimiser steps of the whole run.
    warmup_steps: int  # Steps of linear warmup from 0 to the peak learning rate.
    steps_per_epoch: float  # Corpus size / global batch size.


def schedule_steps(train_config: ml_collections.ConfigDict, corpus_size: int) -> ScheduleSteps:
    """Convert the epoch and step fields of `config.train` into step counts.

    `num_steps > 0` fixes the run length; otherwise it is `num_epochs` passes over
    `corpus_size` images. Warmup is always `warmup_epochs` passes, capped at the run length.

    Raises:
        ValueError: the corpus is empty or the run would have no steps.
    """
    if corpus_size <= 0:
        raise ValueError(f"The training corpus has {corpus_size} images; prepare a corpus first.")
    steps_per_epoch = corpus_size / train_config.global_batch_size

    if train_config.num_steps > 0:
        total_steps = int(train_config.num_steps)
    else:
        total_steps = math.ceil(train_config.num_epochs * steps_per_epoch)
    if total_steps <= 0:
        raise ValueError(
            f"The run has {total_steps} steps (num_steps={train_config.num_steps}, "
            f"num_epochs={train_config.num_epochs}); set a positive train.num_steps or "
            "train.num_epochs."
        )

    warmup_steps = min(round(train_config.warmup_epochs * steps_per_epoch), total_steps)
    return ScheduleSteps(total_steps, warmup_steps, steps_per_epoch)


def make_schedule(train_config: ml_collections.ConfigDict, steps: ScheduleSteps) -> optax.Schedule:
    """Return step -> learning rate: linear warmup from 0 to the peak, then cosine decay to 0."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_config.learning_rate,
        warmup_steps=steps.warmup_steps,
        decay_steps=steps.total_steps,
        end_value=0.0,
    )


def weight_decay_mask(params: Any) -> Any:
    """Return a pytree of bools like `params`: True where AdamW applies weight decay.

    Decay applies to weight matrices and convolution kernels only; parameters named in
    `NO_DECAY_NAMES` and any other parameter with fewer than two dimensions are exempt.
    """

    def decays(path, leaf) -> bool:
        name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else str(path[-1])
        return name not in NO_DECAY_NAMES and len(leaf.shape) >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    train_config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """Build AdamW (betas, weight decay from the config) with optional global-norm clipping.

    The weight-decay mask is a function of the parameters, so the same optimiser serves any
    parameter tree.
    """
    adamw = optax.adamw(
        learning_rate=schedule,
        b1=train_config.b1,
        b2=train_config.b2,
        weight_decay=train_config.weight_decay,
        mask=weight_decay_mask,
    )
    if train_config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), adamw)
    return adamw
