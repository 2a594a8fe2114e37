"""Device mesh, sharding rules for parameters and batches, and multi-host initialisation.

The mesh has two axes: `data` (replicas that each see a slice of the batch) and `fsdp`
(devices that split the parameters and optimiser state between them and also each see a
slice of the batch). The batch is therefore sharded over both axes; parameters follow an
ordered list of (regex, rule) pairs from the config.
"""

import collections
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
RULES = ("replicate", "fsdp")


def maybe_initialize_distributed(
    enabled: bool,
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
    initialization_timeout_seconds: int = 300,
) -> None:
    """Call `jax.distributed.initialize` once, when `enabled` or when any setting is given.

    coordinator_address: `host:port` of process 0's coordinator; num_processes: number of JAX
    processes; process_id: this process's index in [0, num_processes). Settings left empty (""
    / 0 / -1) are read from the cluster environment by JAX (SLURM, Open MPI, Kubernetes
    JobSet, Cloud TPU), or from JAX_COORDINATOR_ADDRESS. Call it before any other JAX function
    touches the devices.

    Raises:
        ValueError: process_id is outside [0, num_processes), or the initialised runtime has
            another process count than `num_processes`.
    """
    given = bool(coordinator_address) or num_processes > 0 or process_id >= 0
    if not (enabled or given):
        return
    if process_id < -1 or (num_processes > 0 and process_id >= num_processes):
        raise ValueError(
            f"Invalid process id {process_id} for {num_processes} processes; give each process "
            "a distinct id from 0 to num_processes - 1, or -1 to read it from the cluster "
            "environment."
        )

    logging.info(
        "Initialising jax.distributed (coordinator %s, %s processes, process id %s; unset "
        "values come from the cluster environment).",
        coordinator_address or "auto",
        num_processes if num_processes > 0 else "auto",
        process_id if process_id >= 0 else "auto",
    )
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes if num_processes > 0 else None,
        process_id=process_id if process_id >= 0 else None,
        initialization_timeout=initialization_timeout_seconds,
    )
    if num_processes > 0 and jax.process_count() != num_processes:
        raise ValueError(
            f"Requested {num_processes} processes but the cluster has {jax.process_count()}; "
            "start one process per host (or per GPU) and pass the same --num_processes to all."
        )
    logging.info(
        "Initialised jax.distributed: process %d of %d, %d local of %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def wait_for_all_processes(name: str, timeout_seconds: int = 1200) -> None:
    """Block until every JAX process reaches the barrier `name`; return at once in one process.

    The barrier runs on the jax.distributed coordination service, not on the devices. Call it
    before the first run of a newly compiled multi-process program. On CPU, JAX 0.10's Gloo
    collectives give the processes 30 s to meet when a program first communicates. A process
    that compiles the program can lag further behind one that loads it from the persistent
    compilation cache (which only process 0 writes).
    """
    if jax.process_count() == 1:
        return
    barrier = ocp.multihost.get_barrier_sync_fn()
    barrier(key=name, timeout_ms=timeout_seconds * 1000)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
    """Return the (data, fsdp) axis sizes, with a -1 size filled by the remaining devices.

    Raises:
        ValueError: more than one size is -1, a size is not positive, or the product does not
            equal `num_devices`.
    """
    sizes = [int(mesh_config.data), int(mesh_config.fsdp)]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={sizes[0]}, fsdp={sizes[1]}.")
    if any(size == 0 or size < -1 for size in sizes):
        raise ValueError(
            f"Mesh axis sizes must be positive or -1, got data={sizes[0]}, fsdp={sizes[1]}."
        )

    if -1 in sizes:
        known = int(np.prod([size for size in sizes if size != -1]))
        if num_devices % known:
            raise ValueError(
                f"Cannot fill a mesh axis: {num_devices} devices are not divisible by {known}."
            )
        sizes[sizes.index(-1)] = num_devices // known

    if sizes[0] * sizes[1] != num_devices:
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} needs {sizes[0] * sizes[1]} devices, "
            f"but {num_devices} are available; set config.mesh.data=-1 to use them all."
        )
    return sizes[0], sizes[1]


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Build the ("data", "fsdp") mesh over `devices` (default: all devices of all processes).

    Both axes are `Auto`, so XLA inserts the all-gathers and reduce-scatters that the sharding
    annotations imply (jax.make_mesh makes `Explicit` axes by default since JAX 0.7).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def path_name(path: Sequence[Any]) -> str:
    """Return a pytree key path as a slash-separated name, e.g. `params/patch_embed/proj/kernel`."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def validate_rules(rules: Sequence[Sequence[str]]) -> list[tuple[re.Pattern, str]]:
    """Compile the (regex, rule) pairs, checking that each rule is known."""
    compiled = []
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"A sharding rule must be a (regex, rule) pair, got {item!r}.")
        pattern, rule = item
        if rule not in RULES:
            raise ValueError(
                f"Unknown sharding rule {rule!r} for {pattern!r}; expected one of {RULES}."
            )
        compiled.append((re.compile(pattern), rule))
    return compiled


def leaf_partition_spec(shape: Sequence[int], rule: str, fsdp_size: int) -> PartitionSpec:
    """Return the PartitionSpec that `rule` gives a leaf of `shape`.

    `fsdp` splits the largest dimension that the fsdp axis size divides; a leaf with no such
    dimension (scalars, small biases) stays replicated.
    """
    if rule == "replicate" or fsdp_size == 1:
        return PartitionSpec()
    candidates = [axis for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return PartitionSpec()
    axis = max(candidates, key=lambda index: shape[index])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Sequence[str]]) -> Any:
    """Return a NamedSharding for every leaf of `abstract_tree`, chosen by the first matching rule.

    Rules are (regex, rule) pairs matched with `re.search` against the leaf's slash-separated
    path (for a train state: `params/layers_0/blocks_1/attn/qkv/kernel`, and the optimiser's
    copies `opt_state/.../mu/layers_0/...`). Leaves that match no rule are replicated.
    """
    compiled = validate_rules(rules)
    fsdp_size = mesh.shape["fsdp"]

    def sharding_for(path, leaf):
        name = path_name(path)
        rule = next((rule for pattern, rule in compiled if pattern.search(name)), "replicate")
        return NamedSharding(mesh, leaf_partition_spec(np.shape(leaf), rule, fsdp_size))

    return jax.tree_util.tree_map_with_path(sharding_for, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of a batch: the leading (example) dimension split over every device."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """Return the sharding of a value that is stored whole on every device."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> int:
    """Return the per-process batch size after checking that the batch splits evenly.

    The global batch is split over the mesh devices, and each micro-batch of gradient
    accumulation must be split over them too. Every process must hold the same number of mesh
    devices, because each process reads an equal share of the global batch.

    Raises:
        ValueError: the global batch size is not divisible by devices x grad_accum_steps, or
            the processes hold unequal numbers of mesh devices.
    """
    num_devices = mesh.devices.size
    if grad_accum_steps < 1:
        raise ValueError(
            f"config.train.grad_accum_steps must be at least 1, got {grad_accum_steps}."
        )
    if global_batch_size % (num_devices * grad_accum_steps):
        raise ValueError(
            f"Global batch size {global_batch_size} is not divisible by the {num_devices} "
            f"devices of the mesh x {grad_accum_steps} gradient-accumulation micro-batches; "
            "change config.train.global_batch_size or config.train.grad_accum_steps."
        )

    devices_per_process = collections.Counter(device.process_index for device in mesh.devices.flat)
    if len(set(devices_per_process.values())) > 1 or len(devices_per_process) != (
        jax.process_count()
    ):
        raise ValueError(
            f"The mesh devices are spread unevenly over the {jax.process_count()} processes "
            f"(mesh devices per process index: {dict(sorted(devices_per_process.items()))}); "
            "start every process with the same number of local devices."
        )
    return global_batch_size // jax.process_count()


def make_global_batch(
    local_batch: Mapping[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Assemble each process's slice of the batch into global arrays sharded by `sharding`.

    local_batch: {"image": uint8 [per-process batch, H, W, C]}; the result has the global batch
    as its leading dimension. This is the one host-to-device copy of the training loop.
    """
    return {
        name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for name, value in local_batch.items()
    }
