"""GELU (tanh approximation) with a hand-written VJP.

XLA's CPU autodiff of jax.nn.gelu keeps tanh's output and several products alive; this
VJP keeps only the input and recomputes tanh in the backward, one pass each way.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array
_C = 0.7978845608028654  # sqrt(2 / pi)


@jax.custom_vjp
def gelu_tanh(x: Array) -> Array:
  """GELU, tanh approximation (GPT-2), as jax.nn.gelu(approximate=True); the backward
  recomputes tanh from x instead of keeping it, so the forward is one pass."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return jax.nn.gelu(x, approximate=True), x


def _gelu_bwd(x, dy):
  x32 = x.astype(jnp.float32)
  t = jnp.tanh(_C * (x32 + 0.044715 * x32 * x32 * x32))
  dgelu = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * _C * (1.0 + 3 * 0.044715 * x32 * x32)
  return ((dy.astype(jnp.float32) * dgelu).astype(x.dtype),)


gelu_tanh.defvjp(_gelu_fwd, _gelu_bwd)
