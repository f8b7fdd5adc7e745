"""A run directory, loaded for inference: model, params, config and tokenizer.

    model, params, config, tokenizer = load_run(workdir)             # one device
    model, params, config, tokenizer = load_run(workdir, mesh=mesh)  # sharded

Works for every model family (config.model.family: decoder, encoder, encdec) and
for training runs (params are read out of the train state, the optimizer state is
never read) as for params-only runs (imported or exported models).
"""
from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import Mesh

from lm import models
from lm.ops import backend
from lm.train import checkpoint, partitioning


def build_model(config, mesh: Mesh | None = None) -> nn.Module:
  """The module a run's config describes, with the kernels the seam picks for `mesh`
  (None: the first device alone): the one place inference builds models."""
  if mesh is None:
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return models.get_model(config.model, config.runtime, backend.select(config.runtime, mesh))


def abstract_params(model: nn.Module, mesh: Mesh | None = None):
  """ShapeDtypeStructs of the params, each carrying where it is to be restored.

  With a mesh: the NamedShardings of the logical axis rules (as in training);
  without one: the default device.
  """
  boxed = models.param_shapes(model)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, nn.unbox(boxed))
  else:
    shardings = nn.unbox(partitioning.logical_shardings(boxed, mesh))
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      nn.unbox(boxed), shardings)


def load_run(workdir, *, mesh: Mesh | None = None, step: int | None = None):
  """(model, params, config, tokenizer) of the run in `workdir`, at `step` (None: the newest).

  Params are restored straight into their shardings over `mesh` (by
  partitioning.LOGICAL_RULES), or onto the default device when there is no mesh.
  """
  config = checkpoint.read_config(workdir)
  tokenizer = checkpoint.read_tokenizer(workdir)
  model = build_model(config, mesh)
  ckpt = checkpoint.Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint under {ckpt.directory}: train first (scripts/'
                              'train.py) or import one (scripts/convert_checkpoint.py).')
    params = ckpt.restore_params(step, abstract_params(model, mesh))
  finally:
    ckpt.close()
  return model, params, config, tokenizer
