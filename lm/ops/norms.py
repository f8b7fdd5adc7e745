"""LayerNorm / RMSNorm over the last axis with a hand-written VJP.

XLA's autodiff of the norm keeps several broadcast intermediates alive and splits the
backward into many small fusions; this VJP saves only the input and two per-row
statistics and recomputes the normalised input in the backward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _stats(x32: Array, centered: bool, eps: float):
  mean = jnp.mean(x32, axis=-1, keepdims=True) if centered else None
  xc = x32 - mean if centered else x32
  rstd = lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
  return mean, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def norm(x: Array, scale: Array, bias: Array | None, centered: bool, eps: float) -> Array:
  """((x - mean) if centered else x) * rsqrt(mean(square) + eps) * scale (+ bias), in float32.

  centered=True is LayerNorm, False is RMSNorm; bias may be None.
  """
  return _norm_fwd(x, scale, bias, centered, eps)[0]


def _norm_fwd(x, scale, bias, centered, eps):
  x32 = x.astype(jnp.float32)
  mean, rstd = _stats(x32, centered, eps)
  xhat = (x32 - mean if centered else x32) * rstd
  y = xhat * scale
  if bias is not None:
    y = y + bias
  return y, (x, mean, rstd, scale, bias is not None)


def _norm_bwd(centered, eps, res, dy):
  x, mean, rstd, scale, has_bias = res
  x32 = x.astype(jnp.float32)
  xhat = (x32 - mean if centered else x32) * rstd
  dy = dy.astype(jnp.float32)
  red = tuple(range(dy.ndim - 1))
  dscale = jnp.sum(dy * xhat, axis=red)
  dbias = jnp.sum(dy, axis=red) if has_bias else None
  dxhat = dy * scale
  proj = jnp.mean(dxhat * xhat, axis=-1, keepdims=True)
  if centered:
    dx = rstd * (dxhat - jnp.mean(dxhat, axis=-1, keepdims=True) - xhat * proj)
  else:
    dx = rstd * (dxhat - xhat * proj)
  return dx.astype(x.dtype), dscale, dbias


norm.defvjp(_norm_fwd, _norm_bwd)
