"""Model registry: the trainer builds models from `config.model.family`, never by import."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models import decoder

FAMILIES = {
    'decoder': (decoder.DecoderConfig, decoder.Decoder),
}


def get_model(model_config) -> nn.Module:
  """Builds the Linen module named by model_config.family from the config's fields."""
  family = model_config.get('family', 'decoder')
  if family not in FAMILIES:
    raise ValueError(f'Unknown model.family {family!r}; known: {sorted(FAMILIES)}.')
  config_cls, module_cls = FAMILIES[family]
  return module_cls(config_cls.from_config(model_config))


def init_params(model: nn.Module, rng, seq_len: int | None = None):
  """Initialised (logically boxed) params, shaped by a [1, seq_len] dummy batch."""
  tokens = jnp.zeros((1, seq_len or model.cfg.max_len), jnp.int32)
  return jax.jit(model.init)(rng, tokens)['params']  # jitted: eager init is slow


def init_cache(model: nn.Module, batch_size: int, max_len: int):
  """An empty KV cache for batch_size sequences of up to max_len tokens in all."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, decode=True))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def param_shapes(model: nn.Module, seq_len: int = 1):
  """Parameter ShapeDtypeStructs (logically boxed) without allocating anything."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))['params']


def param_table(model: nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
  """(path, shape, count) of every parameter, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(param_shapes(model)))[0]
  rows = []
  for path, leaf in flat:
    name = '/'.join(str(getattr(k, 'key', k)) for k in path)
    rows.append((name, tuple(leaf.shape), int(leaf.size)))
  return rows
