"""The device mesh, the one table of logical axis rules, and NamedShardings from it.

Params, optimizer state and batches all get their shardings here: logical names
(nn.with_logical_partitioning / with_logical_constraint) -> mesh axes -> NamedSharding
-> jax.jit in/out shardings. This is what pjit became.
"""
from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or axes). FSDP shards weights along 'embed'; tensor
# parallelism shards heads, MLP and vocab; the batch spreads over data and fsdp.
LOGICAL_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('norm', None),
    ('layers', None),
    ('nf4_blocks', 'fsdp'),  # NF4 codes and absmax (QLoRA), by blocks of 64 weights
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves config.mesh (one size may be -1: the rest of the devices)."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one of config.mesh.{{data,fsdp,tensor}} may be -1; got {sizes}.')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh {sizes}: {num_devices} devices are not divisible by {known}.')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'config.mesh data*fsdp*tensor = {math.prod(sizes)} but there are '
                     f'{num_devices} devices; make the product equal the device count '
                     '(or set one axis to -1).')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  # Auto axes: XLA's partitioner propagates shardings from the logical constraints.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  except Exception:  # fallback for device sets make_mesh cannot lay out
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. a vocab of 65 over 2 devices)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in names)
    out.append(None if not names or dim % size else (names[0] if len(names) == 1 else names))
  return P(*out)


def logical_shardings(boxed_tree, mesh: Mesh, rules=LOGICAL_RULES):
  """NamedShardings for a tree whose leaves may be nn.LogicallyPartitioned."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, rules)
      return NamedSharding(mesh, _fit_spec(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, P())  # scalars, step counters: replicated
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(('data', 'fsdp')))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """K batches stacked [K, batch, ...] (train.steps_per_call): the batch axis as above."""
  return NamedSharding(mesh, P(None, ('data', 'fsdp')))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def maybe_initialize_distributed(coordinator: str = '', num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """Multi-host through JAX's own runtime.

  Explicit flags win; otherwise Cloud TPU and SLURM environments are detected by
  jax.distributed.initialize itself. A single process needs nothing.
  """
  if coordinator or num_processes > 1:
    # CPU collectives across processes need gloo (harmless on GPU/TPU). Touching the
    # backend before initialize() would break it, so set the flag unconditionally.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes or None,
                               process_id=None if process_id < 0 else process_id)
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()
