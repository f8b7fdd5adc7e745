"""A run directory, loaded for inference: model, params, config and tokenizer.

    model, params, config, tokenizer = load_run(workdir)             # one device
    model, params, config, tokenizer = load_run(workdir, mesh=mesh)  # sharded

Works for every model family (config.model.family: decoder, encoder, encdec) and
for training runs (params are read out of the train state, the optimizer state is
never read) as for params-only runs (imported or exported models). An adapter run
(config.peft: LoRA, QLoRA, prompt or prefix tuning) holds its adapters alone: the base
comes from its config.init_from, checked against the architecture the run recorded, and
LoRA is merged into the base kernels (the plain model; merge_adapters=False keeps them).
"""
from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
import jax
from jax.sharding import Mesh

from lm import models
from lm import peft
from lm.ops import backend
from lm.train import checkpoint, partitioning


def build_model(config, mesh: Mesh | None = None, adapters='config') -> nn.Module:
  """The module a run's config describes, with the kernels the seam picks for `mesh`
  (None: the first device alone) and adapters ('config': config.peft's; or an
  lm.peft.Adapters, or None): the one place inference builds models."""
  if mesh is None:
    mesh = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  if adapters == 'config':
    adapters = peft.from_config(config.peft)
  from lm.compress import quantize  # post-training quantized kernels (scripts/quantize.py)
  kernels = backend.select(config.runtime, mesh, adapters=adapters,
                           quant=quantize.from_config(config.get('quant')))
  return models.get_model(config.model, config.runtime, kernels)


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


def load_run(workdir, *, mesh: Mesh | None = None, step: int | None = None,
             merge_adapters: bool = True):
  """(model, params, config, tokenizer) of the run in `workdir`, at `step` (None: the newest).

  Params are restored straight into their shardings over `mesh` (by
  partitioning.LOGICAL_RULES), or onto the default device when there is no mesh.
  """
  config = checkpoint.read_config(workdir)
  tokenizer = checkpoint.read_tokenizer(workdir)
  adapters = peft.from_config(config.peft)
  model = build_model(config, mesh)
  abstract = abstract_params(model, mesh)
  if adapters is not None:
    abstract = peft.partition(abstract, config.peft.train_also)[0]
  ckpt = checkpoint.Checkpointer(workdir, None, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint under {ckpt.directory}: train first (scripts/'
                              'train.py) or import one (scripts/convert_checkpoint.py).')
    params = ckpt.restore_params(step, abstract)
  finally:
    ckpt.close()
  if adapters is None:
    return model, params, config, tokenizer
  params = peft.combine(params, load_base(config, mesh))
  if adapters.method == 'qlora':  # the base as trained: NF4 (merging dequantises it)
    params = peft.quantize_base(params, adapters)
  if adapters.lora and merge_adapters:  # the plain model, LoRA folded into its kernels
    return build_model(config, mesh, adapters=None), peft.merge(params, adapters), config, \
        tokenizer
  if adapters.method == 'prefix' and merge_adapters:  # the prefix MLP folded away
    folded = dataclasses.replace(adapters, folded=True)
    return (build_model(config, mesh, adapters=folded), peft.fold_prefix(params, model.cfg),
            config, tokenizer)
  return model, params, config, tokenizer


def load_base(config, mesh: Mesh | None = None):
  """The base params of an adapter run: its config.init_from (an lm run directory or a
  Hugging Face model directory), which must be the architecture the run was trained on."""
  src = config.init_from
  if not src:
    raise ValueError('This adapter run names no base (config.init_from is empty).')
  from lm.convert import hf  # lazy: only Hugging Face bases need it
  if (pathlib.Path(src) / 'checkpoints').is_dir():
    _, base, base_config, _ = load_run(src, mesh=mesh)
    base_model = base_config.model.to_dict()
  else:
    m, lazy, _ = hf.import_hf(src, config.runtime.scan_layers)
    base_model = hf.model_config(m).to_dict()
    target = abstract_params(models.get_model(hf.model_config(m), config.runtime), mesh)
    base = jax.tree.map(lambda t, s: jax.device_put(t().astype(s.dtype), s.sharding), lazy,
                        target)
  ours = {k: v for k, v in config.model.to_dict().items() if k not in peft.HEAD_FIELDS}
  theirs = {k: v for k, v in base_model.items() if k not in peft.HEAD_FIELDS}
  if ours != theirs:
    diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
    raise ValueError(f'The base {src} does not match the model these adapters were trained '
                     f'on: (base, adapters) {diff}. Point config.init_from (config.json of '
                     'the adapter run) at the base it was trained from.')
  return base
