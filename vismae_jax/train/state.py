"""Train state (step, parameters, optimiser state) created directly in its sharded layout."""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from vismae_jax import parallel


@flax.struct.dataclass
class TrainState:
    """Everything that a resumed run needs from the devices.

    step: int32 scalar, optimiser steps completed. The per-step random key is derived from the
    config seed and this step, so no key is stored.
    """

    step: jax.Array
    params: Any
    opt_state: Any


def model_init_fn(
    model: flax.linen.Module, model_config: ml_collections.ConfigDict
) -> Callable[[jax.Array], Any]:
    """Return key -> parameters of `model` for inputs of the configured image size and channels."""
    side = model_config.image_size
    num_tokens = (side // model_config.patch_size) ** 2

    def init(key: jax.Array) -> Any:
        images = jnp.zeros((1, side, side, model_config.channels), jnp.float32)
        mask = jnp.zeros((1, num_tokens), bool)
        params_key, drop_key = jax.random.split(key)
        variables = model.init(
            {"params": params_key, "drop_path": drop_key}, images, mask, deterministic=True
        )
        return variables["params"]

    return init


def abstract_train_state(
    init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation
) -> TrainState:
    """Return the train state's shapes and dtypes (no memory, no computation)."""

    def init(key):
        params = init_params(key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.eval_shape(init, jax.random.key(0))


def state_shardings(abstract_state: TrainState, mesh: Mesh, rules) -> TrainState:
    """Return a NamedSharding per leaf of the state from the (regex, rule) list `rules`.

    The optimiser's moment estimates have the parameter paths as suffixes
    (`opt_state/0/mu/layers_0/...`), so a rule written for parameters reaches them too.
    """
    return parallel.tree_shardings(abstract_state, mesh, rules)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Attach `shardings` to the ShapeDtypeStructs of `abstract_tree` (a restore target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        abstract_tree,
        shardings,
    )


def create_train_state(
    init_params: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    key: jax.Array,
    shardings: TrainState,
    params: Any | None = None,
) -> TrainState:
    """Initialise the train state with every leaf created on its devices in its final sharding.

    `jit(..., out_shardings=shardings)` makes each device compute only its own shard, so a
    model larger than one device's memory can still be initialised. With `params` given (for
    example loaded by `init_from`), the optimiser state is initialised around them instead.
    """
    if params is None:

        def init(key):
            params = init_params(key)
            return TrainState(
                step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params)
            )

        return jax.jit(init, out_shardings=shardings)(key)

    def init_around(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    return jax.jit(init_around, in_shardings=(shardings.params,), out_shardings=shardings)(params)
