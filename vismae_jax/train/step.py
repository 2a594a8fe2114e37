"""The jitted pretraining step: preprocessing, masking, forward and backward pass, AdamW update.

Everything after the uint8 batch reaches the devices happens inside one compiled function, so
the host only feeds batches: pixel scaling and normalisation, random horizontal flips, the
window mask, the bfloat16 forward pass, the float32 loss and the optimiser update.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import NamedSharding

from vismae_jax import masking
from vismae_jax.models import mae
from vismae_jax.train.state import TrainState

# Streams folded into the seed's key, so that parameter initialisation, training steps and
# reconstruction pictures never share random numbers.
INIT_STREAM = 0
STEP_STREAM = 1
RECONSTRUCTION_STREAM = 2

Batch = dict[str, jax.Array]
StepFn = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]


def stream_key(seed: int, stream: int) -> jax.Array:
    """Return the random key of one stream (INIT_STREAM, STEP_STREAM, ...) of `seed`."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def normalize(images: jax.Array, data_config: ml_collections.ConfigDict) -> jax.Array:
    """Scale uint8 pixels to [0, 1] and normalise: [B, H, W, C] uint8 -> float32."""
    pixels = images.astype(jnp.float32) / 255.0
    return (pixels - data_config.pixel_mean) / data_config.pixel_std


def random_flip(key: jax.Array, images: jax.Array, probability: float) -> jax.Array:
    """Flip each image of [B, H, W, C] left-right with `probability`, independently."""
    flip = jax.random.bernoulli(key, probability, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


def make_mask(
    key: jax.Array, batch_size: int, model_config: ml_collections.ConfigDict
) -> jax.Array:
    """Draw the window mask of a batch: bool [B, L], True = masked token."""
    return masking.window_mask(
        key,
        batch_size,
        model_config.image_size,
        model_config.patch_size,
        model_config.mask_unit,
        model_config.mask_ratio,
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    batch_sharding: NamedSharding | None = None,
) -> StepFn:
    """Build train_step(state, batch) -> (state, metrics) for `jax.jit`.

    batch: {"image": uint8 [global batch, H, W, C]}. The step's random key is
    fold_in(seed's step stream, state.step), so masks, flips and drop-path depend only on the
    seed and the step number, not on the device count or a resume. metrics: float32 scalars
    loss (MSE over masked patches), learning_rate (of this update), grad_norm and param_norm
    (global L2 norms, the latter after the update).
    """
    model_config = config.model
    data_config = config.data

    def constrain(x):
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(stream_key(config.seed, STEP_STREAM), state.step)
        flip_key, mask_key, drop_key = jax.random.split(key, 3)

        images = normalize(batch["image"], data_config)
        images = constrain(random_flip(flip_key, images, data_config.flip_probability))
        mask = constrain(make_mask(mask_key, images.shape[0], model_config))
        target = mae.patchify(images, model_config.patch_size)

        def loss_fn(params):
            pred = model.apply(
                {"params": params},
                images,
                mask,
                deterministic=False,
                rngs={"drop_path": drop_key},
            )
            return mae.reconstruction_loss(pred, target, mask, model_config.norm_pix_loss)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        metrics = {
            "loss": loss,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def compile_train_step(
    train_step: StepFn,
    abstract_state: TrainState,
    state_shardings: TrainState,
    abstract_batch: dict[str, jax.ShapeDtypeStruct],
    batch_sharding: NamedSharding,
    metric_sharding: NamedSharding,
) -> Any:
    """Compile `train_step` ahead of time for these shapes and shardings, and log its memory.

    The state argument is donated, so its buffers are reused for the new state. The returned
    executable never recompiles: calling it with other shapes or shardings raises instead.
    """
    jitted = jax.jit(
        train_step,
        in_shardings=(state_shardings, {name: batch_sharding for name in abstract_batch}),
        out_shardings=(state_shardings, metric_sharding),
        donate_argnums=(0,),
    )
    compiled = jitted.lower(abstract_state, abstract_batch).compile()
    log_memory_analysis(compiled)
    return compiled


def log_memory_analysis(compiled: Any) -> None:
    """Log the per-device memory that XLA plans for the compiled step, if the backend reports it."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        logging.info("Compiled the train step; the backend reports no memory analysis.")
        return
    gib = 2.0**30
    logging.info(
        "Compiled the train step. Memory per device: arguments %.3f GiB, outputs %.3f GiB, "
        "temporaries %.3f GiB, aliased (donated) %.3f GiB, generated code %.3f GiB.",
        analysis.argument_size_in_bytes / gib,
        analysis.output_size_in_bytes / gib,
        analysis.temp_size_in_bytes / gib,
        analysis.alias_size_in_bytes / gib,
        analysis.generated_code_size_in_bytes / gib,
    )
