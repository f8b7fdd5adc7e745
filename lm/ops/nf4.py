"""NF4 (4-bit NormalFloat) weights with double-quantized scales, as QLoRA defines them.

A weight is flattened and cut into blocks of `block_size` (64) consecutive elements; each
element is stored as the 4-bit index of the NF4 level nearest to w / absmax(block), two
indices a byte (the even element in the high nibble, as bitsandbytes packs them). The
levels are bitsandbytes' (its `get_4bit_type('nf4')`, Dettmers et al. 2023, appendix E):
quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero.

Double quantization (QLoRA section 3): the block absmaxes (float32 each, 0.5 bits a weight
at block 64) are themselves quantized to 8 bits in groups of `scale_block` (256) blocks,
after subtracting their mean (absmax_offset), which centres them and so spends the 8 bits
on the spread rather than on the common magnitude. The paper uses 8-bit floats and
bitsandbytes its dynamic 8-bit map; here the centred absmaxes are int8, symmetric, one
float32 scale (max |centred| / 127) a group: the centred values of a group have similar
magnitudes, where a uniform grid is about 10x more accurate than an 8-bit float's
3 mantissa bits (error <= 0.4% of the group's spread). Cost: 4 + 8/64 + 32/(64*256)
~= 4.127 bits a weight.

`quantize` and `dequantize` take static shapes and jit; `dequantize` is elementwise plus a
16-entry table lookup, so XLA fuses it into the consumer and a model can run it inside
every matmul's forward (the frozen base stays 4-bit in memory, as QLoRA's does).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# bitsandbytes' NF4 code book (csrc/kernels.cu dDequantizeNF4 and functional.py), in order.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# Decision thresholds between neighbouring levels: x above a midpoint takes the upper level
# (bitsandbytes' dQuantizeNF4 compares with `>` too).
_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2

NAMES = ('codes', 'absmax_q', 'absmax_scale', 'absmax_offset')


def _sizes(shape, block_size: int, scale_block: int) -> tuple[int, int, int]:
  """(elements, blocks, scale groups) of a weight of `shape`."""
  if block_size < 2 or block_size % 2:
    raise ValueError(f'NF4 block_size must be even and >= 2 (two codes a byte); got '
                     f'{block_size}.')
  if scale_block < 1:
    raise ValueError(f'NF4 scale_block must be >= 1; got {scale_block}.')
  n = math.prod(shape)
  n_blocks = max(1, -(-n // block_size))
  return n, n_blocks, -(-n_blocks // scale_block)


def quantized_shapes(shape, block_size: int = 64,
                     scale_block: int = 256) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{name: (shape, dtype)} of quantize's output for a weight of `shape` (no data needed:
  a module can declare its quantized params from this)."""
  _, n_blocks, n_groups = _sizes(tuple(shape), block_size, scale_block)
  return dict(codes=((n_blocks, block_size // 2), np.dtype(np.uint8)),
              absmax_q=((n_blocks,), np.dtype(np.int8)),
              absmax_scale=((n_groups,), np.dtype(np.float32)),
              absmax_offset=((), np.dtype(np.float32)))


def bits_per_param(shape, block_size: int = 64, scale_block: int = 256) -> float:
  """Stored bits per weight of an NF4 weight of `shape` (padding and scales included)."""
  total = sum(math.prod(s) * d.itemsize
              for s, d in quantized_shapes(shape, block_size, scale_block).values())
  return 8 * total / math.prod(shape)


def nbytes(q: dict) -> int:
  """Bytes held by a quantized weight (quantize's output)."""
  return sum(int(np.prod(q[k].shape)) * np.dtype(q[k].dtype).itemsize for k in NAMES)


def quantize(w, block_size: int = 64, scale_block: int = 256) -> dict:
  """NF4 codes and double-quantized absmaxes of w (any shape; padded to whole blocks).

  Returns {codes: uint8 [n_blocks, block_size // 2], absmax_q: int8 [n_blocks],
  absmax_scale: float32 [n_groups], absmax_offset: float32 []}, n_groups =
  ceil(n_blocks / scale_block). A block's absmax is absmax_q * absmax_scale[group] +
  absmax_offset.
  """
  n, n_blocks, n_groups = _sizes(w.shape, block_size, scale_block)
  flat = jnp.ravel(w).astype(jnp.float32)
  x_NB = jnp.pad(flat, (0, n_blocks * block_size - n)).reshape(n_blocks, block_size)
  absmax_N = jnp.max(jnp.abs(x_NB), axis=1)
  normed_NB = x_NB / jnp.where(absmax_N > 0, absmax_N, 1.0)[:, None]
  idx_NB = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed_NB, side='left').astype(jnp.uint8)
  codes = (idx_NB[:, 0::2] << 4) | idx_NB[:, 1::2]

  offset = jnp.mean(absmax_N)
  centred_GS = jnp.pad(absmax_N - offset, (0, n_groups * scale_block - n_blocks)).reshape(
      n_groups, scale_block)
  scale_G = jnp.max(jnp.abs(centred_GS), axis=1) / 127.0
  safe_G = jnp.where(scale_G > 0, scale_G, 1.0)
  absmax_q = jnp.clip(jnp.round(centred_GS / safe_G[:, None]), -127, 127).astype(jnp.int8)
  return dict(codes=codes, absmax_q=absmax_q.reshape(-1)[:n_blocks], absmax_scale=scale_G,
              absmax_offset=offset)


def dequantize_absmax(q: dict, scale_block: int = 256):
  """The blocks' absmaxes, float32 [n_blocks], from their double quantization."""
  n_blocks, n_groups = q['absmax_q'].shape[0], q['absmax_scale'].shape[0]
  if n_groups != -(-n_blocks // scale_block):
    raise ValueError(f'An NF4 weight with {n_blocks} blocks and {n_groups} absmax scales was '
                     f'not quantized with scale_block={scale_block}; pass the scale_block it '
                     'was quantized with.')
  scale_N = jnp.repeat(q['absmax_scale'], scale_block, total_repeat_length=n_blocks)
  return q['absmax_q'].astype(jnp.float32) * scale_N + q['absmax_offset']


def dequantize(q: dict, shape, dtype=jnp.float32, scale_block: int = 256):
  """The weight of `shape` in `dtype` from quantize's output (padding dropped)."""
  codes = q['codes']
  n_blocks, half = codes.shape
  n = math.prod(shape)
  if not n_blocks * 2 * half >= n > (n_blocks - 1) * 2 * half:
    raise ValueError(f'NF4 codes {tuple(codes.shape)} do not hold a weight of shape '
                     f'{tuple(shape)}.')
  idx_NB = jnp.stack([codes >> 4, codes & 15], axis=-1).reshape(n_blocks, 2 * half)
  levels_NB = jnp.asarray(NF4_LEVELS)[idx_NB.astype(jnp.int32)]
  w_NB = levels_NB * dequantize_absmax(q, scale_block)[:, None]
  return w_NB.reshape(-1)[:n].reshape(shape).astype(dtype)
