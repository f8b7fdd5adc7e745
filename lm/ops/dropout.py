"""Dropout with a counter-based hash instead of jax.random.bernoulli.

Threefry bits cost about 17 ns an element on CPU, 10x a copy of the data: at nanoGPT's
dropout 0.2 on the 6x384 model they were about 15% of a training step. A 32-bit integer
hash of each element's index (seeded from the JAX key once per call) fuses into the
consumer's loop, can be recomputed in a backward pass instead of stored, and is
sharding-invariant (the mask depends on the global index only), like threefry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _mix32(x: Array) -> Array:
  """lowbias32 (C. Wellons): a 32-bit integer hash with low bias, 5 cheap vector ops."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def seed_from_key(rng) -> Array:
  """Two uint32 words per call: the only threefry work a dropout call does."""
  return jax.random.bits(rng, (2,), jnp.uint32)


def keep_mask_at(seed: Array, idx: Array, rate: float) -> Array:
  """Bernoulli(1 - rate) per uint32 index: keep iff hash(idx, seed) >= rate * 2^32."""
  bits = _mix32(_mix32(idx + seed[0]) ^ seed[1])
  threshold = min(int(round(rate * 2.0 ** 32)), 2 ** 32 - 1)
  return bits >= jnp.uint32(threshold)


def keep_mask(seed: Array, shape: tuple[int, ...], rate: float) -> Array:
  """keep_mask_at over the row-major flat index of `shape` (wrapping past 2^32 elements)."""
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for ax in range(len(shape) - 1, -1, -1):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, ax) * jnp.uint32(stride & 0xFFFFFFFF)
    stride *= shape[ax]
  return keep_mask_at(seed, idx, rate)


def dropout(x: Array, rate: float, rng) -> Array:
  """Inverted dropout: zero with probability `rate`, scale the rest by 1 / (1 - rate)."""
  if rate <= 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  keep = keep_mask(seed_from_key(rng), x.shape, rate)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))
