"""Softmax attention with a hand-written VJP (GQA, causal or explicit masks, fused dropout).

XLA's autodiff of softmax attention on CPU materialises extra transposes, masks and
reductions around the four batched matmuls. Here the forward saves the probabilities and
the output; the backward is the textbook one, with rowsum(dO * O) in place of
rowsum(dP * P) (equal, dropout included), and the dropout mask rehashed, not stored.

Layout inside: [B, K, G*T, H], with the G = N / K query heads of a KV group folded into
the rows of one matmul, so GQA needs no repeated keys or values.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm.ops.dropout import keep_mask

Array = jax.Array


def _to_groups(q_BTNH: Array, kv_heads: int) -> Array:
  b, t, n, h = q_BTNH.shape
  return q_BTNH.transpose(0, 2, 1, 3).reshape(b, kv_heads, (n // kv_heads) * t, h)


def _from_groups(x_BKRH: Array, t: int) -> Array:
  b, k, r, h = x_BKRH.shape
  return x_BKRH.reshape(b, k * (r // t), t, h).transpose(0, 2, 1, 3)


def _scores_mask(mask_B1TS, causal: bool, shape_BKGTS) -> Array | None:
  """True = attend, broadcastable to [B, K, G, T, S]."""
  t, s = shape_BKGTS[-2:]
  allowed = None
  if causal:  # query t sees keys up to t + (S - T), as jnp.tril(..., S - T)
    rows = jax.lax.broadcasted_iota(jnp.int32, (t, s), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (t, s), 1)
    allowed = cols <= rows + (s - t)
  if mask_B1TS is not None:
    m = mask_B1TS[:, :, None]  # [B, 1, 1, T, S]
    allowed = m if allowed is None else allowed & m
  return allowed


def _keep(seed, rate, shape_BKGTS):
  b, k, g, t, s = shape_BKGTS
  # Hash over [B, N, T, S]: the same mask for any GQA grouping of the same heads.
  return keep_mask(seed, (b, k * g, t, s), rate).reshape(shape_BKGTS)


def _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate):
  b, t, n, h = q_BTNH.shape
  kv = k_BSKH.shape[2]
  g, s = n // kv, k_BSKH.shape[1]
  q_BKRH = _to_groups(q_BTNH * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype), kv)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  scores = jnp.einsum('bkrh,bksh->bkrs', q_BKRH, k_BKSH, preferred_element_type=jnp.float32)
  shape5 = (b, kv, g, t, s)
  scores = scores.reshape(shape5)
  allowed = _scores_mask(mask_B1TS, causal, shape5)
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  probs_d = probs
  if rate > 0.0:
    probs_d = jnp.where(_keep(seed, rate, shape5), probs * (1.0 / (1.0 - rate)), 0.0)
  probs_d = probs_d.reshape(b, kv, g * t, s).astype(v_BSKH.dtype)
  out_BKRH = jnp.einsum('bkrs,bksh->bkrh', probs_d, v_BKSH)
  return _from_groups(out_BKRH, t), (q_BKRH, k_BKSH, v_BKSH, probs, out_BKRH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array | None,
              seed: Array | None, causal: bool, rate: float) -> Array:
  """softmax(q k^T / sqrt(H) + mask) v with dropout `rate` on the probabilities.

  q [B, T, N, H]; k, v [B, S, K, H] with K dividing N; mask [B, 1, T, S] bool (True =
  attend) or None; causal adds the lower-triangular mask; seed: uint32[2] (dropout only).
  """
  return _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate)[0]


def _fwd(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate):
  out, res = _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate)
  return out, (res, mask_B1TS, seed)


def _bwd(causal, rate, saved, dout_BTNH):
  (q_BKRH, k_BKSH, v_BKSH, probs, out_BKRH), mask_B1TS, seed = saved
  b, kv, g, t, s = probs.shape
  h = q_BKRH.shape[-1]
  dout_BKRH = _to_groups(dout_BTNH, kv).astype(v_BKSH.dtype)
  probs_d = probs
  dprobs_d = jnp.einsum('bkrh,bksh->bkrs', dout_BKRH, v_BKSH,
                        preferred_element_type=jnp.float32).reshape(probs.shape)
  dprobs = dprobs_d
  if rate > 0.0:
    keep = _keep(seed, rate, probs.shape)
    probs_d = jnp.where(keep, probs * (1.0 / (1.0 - rate)), 0.0)
    dprobs = jnp.where(keep, dprobs_d * (1.0 / (1.0 - rate)), 0.0)
  # rowsum(dP * P) = rowsum(dO * O): an H-wide reduction instead of an S-wide one.
  delta = jnp.sum(dout_BKRH.astype(jnp.float32) * out_BKRH.astype(jnp.float32), axis=-1)
  dscores = probs * (dprobs - delta.reshape(b, kv, g, t, 1))
  dscores = dscores.reshape(b, kv, g * t, s).astype(q_BKRH.dtype)
  probs_d = probs_d.reshape(b, kv, g * t, s).astype(v_BKSH.dtype)
  dv_BKSH = jnp.einsum('bkrs,bkrh->bksh', probs_d, dout_BKRH)
  dq_BKRH = jnp.einsum('bkrs,bksh->bkrh', dscores, k_BKSH) * jnp.asarray(
      1.0 / math.sqrt(h), q_BKRH.dtype)
  dk_BKSH = jnp.einsum('bkrs,bkrh->bksh', dscores, q_BKRH)  # q was pre-scaled
  return (_from_groups(dq_BKRH, t), dk_BKSH.transpose(0, 2, 1, 3), dv_BKSH.transpose(0, 2, 1, 3),
          None, None)


attention.defvjp(_fwd, _bwd)
