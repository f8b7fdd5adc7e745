"""Softmax attention with a hand-written VJP: GQA, causal block skipping, fused dropout.

XLA's autodiff of softmax attention on CPU materialises extra transposes, masks and
reductions around the batched matmuls. Here the forward saves the probabilities and the
output; the backward is the textbook one, with rowsum(dO * O) in place of
rowsum(dP * P) (equal, dropout included), and the dropout mask rehashed, not stored.

Causal attention is split into query blocks; block i only meets keys up to its own end,
so the masked upper triangle is mostly never computed (4 blocks: 10/16 of the work).

Layout inside: rows of [B, K, T*G, H] are (time, group member) pairs, so the G = N / K
query heads of a KV group share one matmul (no repeated keys or values for GQA) and a
block of queries is a contiguous run of rows.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from lm.ops.dropout import keep_mask_at

Array = jax.Array


def _to_rows(x_BTNH: Array, kv_heads: int) -> Array:
  b, t, n, h = x_BTNH.shape
  g = n // kv_heads
  return x_BTNH.reshape(b, t, kv_heads, g, h).transpose(0, 2, 1, 3, 4).reshape(
      b, kv_heads, t * g, h)


def _from_rows(x_BKRH: Array, t: int) -> Array:
  b, k, r, h = x_BKRH.shape
  g = r // t
  return x_BKRH.reshape(b, k, t, g, h).transpose(0, 2, 1, 3, 4).reshape(b, t, k * g, h)


def _blocks(t: int, s: int, causal: bool, block: int) -> list[tuple[int, int, int]]:
  """(first query, last query + 1, keys needed) per query block."""
  if not causal or block <= 0 or t % block or t <= block:
    return [(0, t, s)]
  return [(q0, q0 + block, q0 + block + s - t) for q0 in range(0, t, block)]


def _allowed(mask_B1TS, causal, q0, q1, s_end, t, s):
  """True = attend, broadcastable to the block's scores [B, K, Tq, G, S']."""
  allowed = None
  if causal:  # query i sees keys up to i + (S - T), as jnp.tril(..., S - T)
    rows = lax.broadcasted_iota(jnp.int32, (q1 - q0, 1, s_end), 0) + q0
    cols = lax.broadcasted_iota(jnp.int32, (q1 - q0, 1, s_end), 2)
    allowed = cols <= rows + (s - t)
  if mask_B1TS is not None:
    m = mask_B1TS[:, :, q0:q1, None, :s_end]  # [B, 1, Tq, 1, S']
    allowed = m if allowed is None else allowed & m
  return allowed


def _keep(seed, rate, shape_BKTGS, q0, t, s):
  """The dropout mask of one block, hashed on the index in the full [B, N, T, S] scores."""
  b, k, tq, g, s_blk = shape_BKTGS
  iota = lambda ax: lax.broadcasted_iota(jnp.uint32, shape_BKTGS, ax)
  head = iota(1) * jnp.uint32(g) + iota(3)
  idx = ((iota(0) * jnp.uint32(k * g) + head) * jnp.uint32(t) + iota(2) + jnp.uint32(q0)) \
      * jnp.uint32(s) + iota(4)
  return keep_mask_at(seed, idx, rate)


def _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate, block):
  b, t, n, h = q_BTNH.shape
  kv, s = k_BSKH.shape[2], k_BSKH.shape[1]
  g = n // kv
  q_BKRH = _to_rows(q_BTNH * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype), kv)
  k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
  v_BKSH = v_BSKH.transpose(0, 2, 1, 3)
  outs, probs = [], []
  for q0, q1, s_end in _blocks(t, s, causal, block):
    scores = jnp.einsum('bkrh,bksh->bkrs', q_BKRH[:, :, q0 * g:q1 * g], k_BKSH[:, :, :s_end],
                        preferred_element_type=jnp.float32)
    shape5 = (b, kv, q1 - q0, g, s_end)
    scores = scores.reshape(shape5)
    allowed = _allowed(mask_B1TS, causal, q0, q1, s_end, t, s)
    if allowed is not None:
      scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1)
    p_drop = p
    if rate > 0.0:
      keep = _keep(seed, rate, shape5, q0, t, s)
      p_drop = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
    p_drop = p_drop.reshape(b, kv, (q1 - q0) * g, s_end).astype(v_BSKH.dtype)
    outs.append(jnp.einsum('bkrs,bksh->bkrh', p_drop, v_BKSH[:, :, :s_end]))
    probs.append(p)
  out_BKRH = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
  return _from_rows(out_BKRH, t), (q_BKRH, k_BKSH, v_BKSH, probs, out_BKRH)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array | None,
              seed: Array | None, causal: bool, rate: float = 0.0, block: int = 128) -> Array:
  """softmax(q k^T / sqrt(H), masked) v with dropout `rate` on the probabilities.

  q [B, T, N, H]; k, v [B, S, K, H] with K dividing N; mask [B, 1, T, S] bool (True =
  attend) or None; causal: also mask keys after each query (key i sits at query
  i - (S - T)); seed: uint32[2], used when rate > 0; block: causal query block size
  (0: one block; used when it divides T and T > block).
  """
  return _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate, block)[0]


def _fwd(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate, block):
  out, res = _forward(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, seed, causal, rate, block)
  return out, (res, mask_B1TS, seed)


def _bwd(causal, rate, block, saved, dout_BTNH):
  (q_BKRH, k_BKSH, v_BKSH, probs, out_BKRH), mask_B1TS, seed = saved
  b, kv, s, h = k_BKSH.shape
  t = dout_BTNH.shape[1]
  g = q_BKRH.shape[2] // t
  dout_BKRH = _to_rows(dout_BTNH, kv).astype(v_BKSH.dtype)
  # rowsum(dP * P) = rowsum(dO * O): an H-wide reduction instead of an S-wide one.
  delta_BKR = jnp.sum(dout_BKRH.astype(jnp.float32) * out_BKRH.astype(jnp.float32), axis=-1)
  dqs, dk_BKSH, dv_BKSH = [], 0.0, 0.0
  for (q0, q1, s_end), p in zip(_blocks(t, s, causal, block), probs):
    rows = slice(q0 * g, q1 * g)
    do_c, q_c = dout_BKRH[:, :, rows], q_BKRH[:, :, rows]
    k_c, v_c = k_BKSH[:, :, :s_end], v_BKSH[:, :, :s_end]
    dp = jnp.einsum('bkrh,bksh->bkrs', do_c, v_c,
                    preferred_element_type=jnp.float32).reshape(p.shape)
    p_drop = p
    if rate > 0.0:
      keep = _keep(seed, rate, p.shape, q0, t, s)
      p_drop = jnp.where(keep, p * (1.0 / (1.0 - rate)), 0.0)
      dp = jnp.where(keep, dp * (1.0 / (1.0 - rate)), 0.0)
    ds = p * (dp - delta_BKR[:, :, rows].reshape(p.shape[:-1] + (1,)))
    ds = ds.reshape(b, kv, (q1 - q0) * g, s_end).astype(q_BKRH.dtype)
    p_drop = p_drop.reshape(ds.shape).astype(v_BKSH.dtype)
    pad = ((0, 0), (0, 0), (0, s - s_end), (0, 0))
    dv_BKSH = dv_BKSH + jnp.pad(jnp.einsum('bkrs,bkrh->bksh', p_drop, do_c), pad)
    dk_BKSH = dk_BKSH + jnp.pad(jnp.einsum('bkrs,bkrh->bksh', ds, q_c), pad)  # q pre-scaled
    dqs.append(jnp.einsum('bkrs,bksh->bkrh', ds, k_c))
  dq_BKRH = (dqs[0] if len(dqs) == 1 else jnp.concatenate(dqs, axis=2)) * jnp.asarray(
      1.0 / math.sqrt(h), q_BKRH.dtype)
  return (_from_rows(dq_BKRH, t), dk_BKSH.transpose(0, 2, 1, 3).astype(k_BKSH.dtype),
          dv_BKSH.transpose(0, 2, 1, 3).astype(v_BKSH.dtype), None, None)


attention.defvjp(_fwd, _bwd)
