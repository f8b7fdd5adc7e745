"""The fused CPU attention kernel (cpu_attention.cc): call and differentiate.

Built and registered by lm/ops/cpu_kernels.py; where `cpu_kernels.available()` is False,
lm.models.layers uses lm/ops/attention.py instead.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def supports(q_BTNH: Array, k_BSKH: Array) -> bool:
  """Shapes and dtypes the kernel takes (else the caller uses the XLA attention)."""
  _, t, n, h = q_BTNH.shape
  return (q_BTNH.dtype == k_BSKH.dtype == jnp.float32 and k_BSKH.shape[1] == t
          and n % k_BSKH.shape[2] == 0 and h % 16 == 0 and t % 16 == 0
          and t <= 4096)  # a thread holds two [T, T] float32 score blocks


def _call(name, results, *args, causal, rate):
  return jax.ffi.ffi_call(name, results)(*args, causal=causal, rate=np.float32(rate))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, seg_BT: Array, seed: Array,
              causal: bool = True, rate: float = 0.0) -> Array:
  """softmax(q k^T / sqrt(H) masked) v; a query sees keys of its own segment (and not
  after it if causal); dropout `rate` on the probabilities, hashed from `seed` uint32[2]
  exactly as lm/ops/attention.py does. q [B, T, N, H]; k, v [B, T, K, H]; seg [B, T]."""
  return _forward(q_BTNH, k_BSKH, v_BSKH, seg_BT, seed, causal, rate)[0]


def _forward(q, k, v, seg, seed, causal, rate):
  b, t, n, _ = q.shape
  return _call('LmAttentionForward',
               (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t),
                                                                             jnp.float32)),
               q, k, v, seg, seg, seed, causal=causal, rate=rate)


def _fwd(q, k, v, seg, seed, causal, rate):
  out, lse = _forward(q, k, v, seg, seed, causal, rate)
  return out, (q, k, v, seg, seed, out, lse)


def _bwd(causal, rate, res, dout):
  q, k, v, seg, seed, out, lse = res
  dq, dk, dv = _call('LmAttentionBackward',
                     tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)),
                     q, k, v, seg, seg, seed, out, lse, dout, causal=causal, rate=rate)
  return dq, dk, dv, None, None


attention.defvjp(_fwd, _bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def packed_attention(qkv_BTE: Array, bias_E: Array | None, seg_BT: Array, seed: Array,
                     n_heads: int, kv_heads: int, causal: bool = True,
                     rate: float = 0.0) -> Array:
  """`attention` with q, k, v side by side in one projection: qkv [B, T, E], E = (N + 2K) H,
  each time step holding q's N heads, then k's K, then v's K; bias [E] (or None) is added
  to them inside the kernel, so the projection's output needs no pass of its own. The
  gradient comes back in the same layout, so no slices or concatenation surround the
  kernel. Returns [B, T, N, H]."""
  return _forward_packed(qkv_BTE, bias_E, seg_BT, seed, n_heads, kv_heads, causal, rate)[0]


def supports_packed(qkv_BTE: Array, n_heads: int, kv_heads: int) -> bool:
  b, t, e = qkv_BTE.shape
  h = e // (n_heads + 2 * kv_heads)
  return e == (n_heads + 2 * kv_heads) * h and supports(
      jax.ShapeDtypeStruct((b, t, n_heads, h), qkv_BTE.dtype),
      jax.ShapeDtypeStruct((b, t, kv_heads, h), qkv_BTE.dtype))


def _bias_arg(bias, qkv):
  return jnp.zeros((0,), qkv.dtype) if bias is None else bias.astype(qkv.dtype)


def _forward_packed(qkv, bias, seg, seed, n_heads, kv_heads, causal, rate):
  b, t, e = qkv.shape
  h = e // (n_heads + 2 * kv_heads)
  return _call('LmAttentionForwardPacked',
               (jax.ShapeDtypeStruct((b, t, n_heads, h), qkv.dtype),
                jax.ShapeDtypeStruct((b, n_heads, t), jnp.float32)),
               qkv, _bias_arg(bias, qkv), seg, seg, seed, causal=causal, rate=rate)


def _fwd_packed(qkv, bias, seg, seed, n_heads, kv_heads, causal, rate):
  out, lse = _forward_packed(qkv, bias, seg, seed, n_heads, kv_heads, causal, rate)
  return out, (qkv, bias, seg, seed, out, lse)


def _bwd_packed(n_heads, kv_heads, causal, rate, res, dout):
  qkv, bias, seg, seed, out, lse = res
  dqkv = _call('LmAttentionBackwardPacked', jax.ShapeDtypeStruct(qkv.shape, qkv.dtype),
               qkv, _bias_arg(bias, qkv), seg, seg, seed, out, lse, dout, causal=causal,
               rate=rate)
  dbias = None if bias is None else dqkv.sum((0, 1)).astype(bias.dtype)
  return dqkv, dbias, None, None


packed_attention.defvjp(_fwd_packed, _bwd_packed)
