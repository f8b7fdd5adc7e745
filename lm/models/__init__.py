"""Model registry: the trainer builds models from `config.model.family`, never by import."""
from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import decoder
from lm.models import encdec
from lm.models import encoder
from lm.ops.backend import Kernels

FAMILIES = {
    'decoder': (decoder.DecoderConfig, decoder.Decoder),
    'encdec': (encdec.EncDecConfig, encdec.EncDec),
    'encoder': (encoder.EncoderConfig, encoder.Encoder),
}


def get_model(model_config, runtime=None, kernels: Kernels = Kernels()) -> nn.Module:
  """Builds the Linen module named by model_config.family from the architecture fields,
  the runtime fields (config.runtime; None: defaults) and the run's kernel choices
  (lm/ops/backend.select; the default is pure XLA, which shape-only tracing uses)."""
  family = model_config.get('family', 'decoder')
  if family not in FAMILIES:
    raise ValueError(f'Unknown model.family {family!r}; known: {sorted(FAMILIES)}.')
  config_cls, module_cls = FAMILIES[family]
  return module_cls(config_cls.from_config(model_config, runtime, kernels))


def example_inputs(model: nn.Module, batch_size: int = 1, seq_len: int | None = None) -> tuple:
  """Dummy positional inputs that make `model.init` create every parameter: the family
  module's `example_inputs` (an encoder-decoder needs encoder and decoder tokens)."""
  return type(model).example_inputs(model.cfg, batch_size, seq_len or model.cfg.max_len)


def init_params(model: nn.Module, rng, seq_len: int | None = None):
  """Initialised (logically boxed) params, shaped by a [1, seq_len] dummy batch."""
  inputs = example_inputs(model, 1, seq_len)
  return jax.jit(model.init)(rng, *inputs)['params']  # jitted: eager init is slow


def init_cache(model: nn.Module, batch_size: int, max_len: int, encoder_len: int | None = None):
  """An empty KV cache for batch_size sequences of up to max_len tokens in all (an
  encoder-decoder's decoder tokens; its cross-attention cache holds encoder_len)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  init = lambda: model.init(jax.random.key(0), tokens, decode=True)
  if isinstance(model, encdec.EncDec):
    if encoder_len is None:
      raise ValueError('init_cache(model, ...) for an encoder-decoder needs encoder_len '
                       '(the encoder output length the cross-attention cache holds).')
    encoded = jnp.zeros((batch_size, encoder_len, model.cfg.d_model), model.cfg.compute_dtype)
    init = lambda: model.init(jax.random.key(0), tokens, encoded, decode=True, method='decode')
  shapes = jax.eval_shape(init)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


_LAYER = re.compile(r'layers_(\d+)')


def relayout(tree, scanned: bool):
  """A params-shaped tree (params, optimizer moments, a whole train state) in the scanned
  layout ('layers': each leaf stacked over a leading layer axis) or the per-layer one
  ('layers_0', 'layers_1', ...): runtime.scan_layers may change between runs."""
  if isinstance(tree, dict):
    out = {k: relayout(v, scanned) for k, v in tree.items()}
    numbered = sorted((int(m.group(1)), k) for k in out if (m := _LAYER.fullmatch(k)))
    if scanned and numbered:
      parts = [out.pop(k) for _, k in numbered]
      out['layers'] = jax.tree.map(lambda *xs: jnp.stack(xs), *parts)
    elif not scanned and isinstance(out.get('layers'), dict):
      stacked = out.pop('layers')
      n = jax.tree.leaves(stacked)[0].shape[0]
      out.update({f'layers_{i}': jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)})
    return out
  if isinstance(tree, tuple) and hasattr(tree, '_fields'):  # optax's NamedTuple states
    return type(tree)(*(relayout(v, scanned) for v in tree))
  if isinstance(tree, (list, tuple)):
    return type(tree)(relayout(v, scanned) for v in tree)
  return tree


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def param_shapes(model: nn.Module, seq_len: int = 1):
  """Parameter ShapeDtypeStructs (logically boxed) without allocating anything."""
  inputs = example_inputs(model, 1, seq_len)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))['params']


def param_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
  """(path, shape, count) of every parameter, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(param_shapes(model)))[0]
  rows = []
  for path, leaf in flat:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    rows.append((name, tuple(leaf.shape), int(leaf.size)))
  return rows
