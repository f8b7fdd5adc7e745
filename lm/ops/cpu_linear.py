"""Dense layers as C++ kernels (cpu_linear.cc): y = x w (+ b), optionally then GELU.

The forward and the weight gradient x^T dy (with the bias gradient) are C++; dx = dy w^T
stays in XLA, which runs it beside the weight gradient (a C++ dx tied with it). With GELU
the backward starts from the C++ GELU backward (cpu_gelu.cc), which also sums the bias
gradient. Past L2, where XLA runs the matmuls, `gelu` still takes its backward from
cpu_gelu.cc.
Built and registered by lm/ops/cpu_kernels.py; lm.models.layers uses these on one CPU
device for float32 kernels whose axes are multiples of 16, else plain XLA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.ops import activations

Array = jax.Array


# The kernel reads x once per 64 columns of w: past L2 (2 MB a core here) XLA's blocked
# library is faster ([4096, 384] x [384, 1152]: 259 against 339 GFLOP/s; [768, 128] x
# [128, 512]: 313 against 227).
MAX_X_BYTES = 2 << 20


def supports(x: Array, w: Array) -> bool:
  """What the kernel takes, where it is faster than XLA: float32 x [..., K] of at most
  MAX_X_BYTES and w [K, N], K and N multiples of 16."""
  return (x.dtype == w.dtype == jnp.float32 and w.ndim == 2 and x.shape[-1] == w.shape[0]
          and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0 and x.size * 4 <= MAX_X_BYTES)


def _forward(x, w, bias, gelu: bool):
  out = jax.ShapeDtypeStruct(x.shape[:-1] + w.shape[1:], x.dtype)
  return jax.ffi.ffi_call('LmLinearForward', (out, out if gelu else jax.ShapeDtypeStruct(
      (0,), x.dtype)))(x, w, bias)


def _grads(x, w, du, with_bias: bool):
  """dx (XLA), dw and the bias gradient (C++; [0] without a bias) of x @ w + b for du."""
  x_MK, du_MN = x.reshape(-1, x.shape[-1]), du.reshape(-1, du.shape[-1])
  dw, dbias = jax.ffi.ffi_call('LmLinearWeightGrad', (
      jax.ShapeDtypeStruct(w.shape, w.dtype),
      jax.ShapeDtypeStruct((w.shape[1] if with_bias else 0,), w.dtype)))(x_MK, du_MN)
  return du @ w.T, dw, dbias


@jax.custom_vjp
def _linear(x: Array, w: Array, bias: Array) -> Array:
  return _forward(x, w, bias, False)[0]


def _linear_fwd(x, w, bias):
  return _linear(x, w, bias), (x, w, bias)


def _linear_bwd(res, dy):
  x, w, bias = res
  return _grads(x, w, dy.astype(jnp.float32), bias.size > 0)


_linear.defvjp(_linear_fwd, _linear_bwd)


@jax.custom_vjp
def _linear_gelu(x: Array, w: Array, bias: Array) -> Array:
  return _forward(x, w, bias, True)[1]


def _linear_gelu_fwd(x, w, bias):
  u, h = _forward(x, w, bias, True)
  return h, (x, w, u, bias)


def _gelu_backward(u, dh, with_bias: bool):
  """(du, du summed over rows or [0]) for h = gelu(u) (cpu_gelu.cc)."""
  return jax.ffi.ffi_call('LmGeluBackward', (
      jax.ShapeDtypeStruct(u.shape, u.dtype),
      jax.ShapeDtypeStruct(u.shape[-1:] if with_bias else (0,), u.dtype)))(
          u, dh.astype(jnp.float32))


def _linear_gelu_bwd(res, dh):
  x, w, u, bias = res
  du, dbias = _gelu_backward(u, dh, bias.size > 0)
  return (*_grads(x, w, du, False)[:2], dbias)  # [0] without a bias


_linear_gelu.defvjp(_linear_gelu_fwd, _linear_gelu_bwd)


def _bias(x, bias):
  return jnp.zeros((0,), x.dtype) if bias is None else bias.astype(x.dtype)


def linear(x: Array, w: Array, bias: Array | None = None) -> Array:
  """x [..., K] @ w [K, N] (+ bias [N]); see supports."""
  return _linear(x, w, _bias(x, bias))


def supports_gelu(u: Array) -> bool:
  return u.dtype == jnp.float32 and u.ndim >= 1 and u.shape[-1] % 16 == 0


@jax.custom_vjp
def gelu(u: Array) -> Array:
  """activations.gelu_tanh with the C++ backward (float32, last axis a multiple of 16): for
  the output of XLA's matmuls. Inside the 6x384 model's step it beats XLA's fused
  backward (-2.4% step time, same-process A/B), though not alone."""
  return activations.gelu_tanh(u)


gelu.defvjp(lambda u: (gelu(u), u), lambda u, dh: (_gelu_backward(u, dh, False)[0],))


def linear_gelu(x: Array, w: Array, bias: Array | None = None) -> Array:
  """gelu_tanh(x @ w + bias) (lm/ops/activations.py's GELU); see supports."""
  return _linear_gelu(x, w, _bias(x, bias))
