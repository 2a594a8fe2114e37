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
from jax.sharding import NamedSharding, PartitionSpec

from vismae_jax import masking, parallel
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


def split_micro_batches(x: jax.Array, num_micro_batches: int) -> jax.Array:
    """Split [B, ...] into [k, B / k, ...]: micro-batch i contains rows i, i + k, i + 2k, ...

    Taking every k-th row keeps each micro-batch spread over all devices of a batch-sharded
    array (each device's contiguous block of rows contains B / (k x devices) rows of every
    micro-batch), so the split needs no communication.
    """
    return x.reshape(x.shape[0] // num_micro_batches, num_micro_batches, *x.shape[1:]).swapaxes(
        0, 1
    )


def accumulate_value_and_grad(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    inputs: tuple[jax.Array, jax.Array, jax.Array],
    drop_key: jax.Array,
    num_micro_batches: int,
    constrain: Callable[[jax.Array], jax.Array],
) -> tuple[jax.Array, Any]:
    """Return the loss and gradients of a whole batch, computed micro-batch by micro-batch.

    loss_fn(params, images, mask, target, drop_key) -> mean loss over the masked tokens of its
    inputs; inputs: (images [B, H, W, C] float, mask [B, L] bool, target [B, L, P] float) of
    the whole batch, already flipped and masked, so every micro-batch gets exactly the rows of
    the full batch. Each micro-batch's loss and gradient are weighted by its share of the
    batch's masked tokens, which makes the weighted sums equal the full-batch mean loss and its
    gradient. A `lax.scan` runs the micro-batches one after another, so only one micro-batch's
    activations are alive at a time. Drop-path draws its own key per micro-batch.
    """
    images, mask, target = (constrain(split_micro_batches(x, num_micro_batches)) for x in inputs)
    masked_tokens = jnp.sum(mask, axis=(1, 2), dtype=jnp.float32)
    weights = masked_tokens / jnp.maximum(jnp.sum(masked_tokens), 1.0)
    drop_keys = jax.random.split(drop_key, num_micro_batches)

    def accumulate(carry, micro_batch):
        loss_sum, grad_sum = carry
        images_i, mask_i, target_i, weight, key = micro_batch
        loss, grads = jax.value_and_grad(loss_fn)(params, images_i, mask_i, target_i, key)
        grad_sum = jax.tree.map(lambda total, grad: total + weight * grad, grad_sum, grads)
        return (loss_sum + weight * loss, grad_sum), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (images, mask, target, weights, drop_keys))
    return loss, grads


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

    With config.train.grad_accum_steps = k > 1 the batch is split into k micro-batches whose
    weighted gradients are summed before one optimiser update (`accumulate_value_and_grad`);
    flips and masks are still drawn for the whole batch, so the step computes the same loss and
    gradient as with k = 1, up to float rounding (and drop-path draws).
    """
    model_config = config.model
    data_config = config.data
    num_micro_batches = int(config.train.grad_accum_steps)

    def constrain(x):
        if batch_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, batch_sharding)

    def constrain_micro_batches(x):
        if batch_sharding is None:
            return x
        spec = PartitionSpec(None, *batch_sharding.spec)
        return jax.lax.with_sharding_constraint(x, NamedSharding(batch_sharding.mesh, spec))

    def loss_fn(params, images, mask, target, drop_key):
        pred = model.apply(
            {"params": params},
            images,
            mask,
            deterministic=False,
            rngs={"drop_path": drop_key},
        )
        return mae.reconstruction_loss(pred, target, mask, model_config.norm_pix_loss)

    def train_step(state: TrainState, batch: Batch):
        key = jax.random.fold_in(stream_key(config.seed, STEP_STREAM), state.step)
        flip_key, mask_key, drop_key = jax.random.split(key, 3)

        images = normalize(batch["image"], data_config)
        images = constrain(random_flip(flip_key, images, data_config.flip_probability))
        mask = constrain(make_mask(mask_key, images.shape[0], model_config))
        target = mae.patchify(images, model_config.patch_size)

        if num_micro_batches == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, images, mask, target, drop_key)
        else:
            check_micro_batches(images.shape[0], num_micro_batches)
            loss, grads = accumulate_value_and_grad(
                loss_fn,
                state.params,
                (images, mask, target),
                drop_key,
                num_micro_batches,
                constrain_micro_batches,
            )
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


def check_micro_batches(batch_size: int, num_micro_batches: int) -> None:
    """Raise ValueError unless the batch splits into `num_micro_batches` equal micro-batches."""
    if num_micro_batches < 1 or batch_size % num_micro_batches:
        raise ValueError(
            f"A batch of {batch_size} images does not split into {num_micro_batches} equal "
            "micro-batches; make config.train.global_batch_size a multiple of "
            "config.train.grad_accum_steps x the number of devices."
        )


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
    parallel.wait_for_all_processes("train_step_compiled")
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
