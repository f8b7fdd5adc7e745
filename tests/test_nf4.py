"""NF4 with double quantization (lm/ops/nf4.py): levels, nearest-level codes, scales, size."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.ops import nf4

quantize = jax.jit(nf4.quantize, static_argnames=('block_size', 'scale_block'))
dequantize = jax.jit(nf4.dequantize, static_argnames=('shape', 'dtype', 'scale_block'))


def test_levels_are_bitsandbytes_nf4():
  levels = nf4.NF4_LEVELS
  assert levels.shape == (16,) and levels.dtype == np.float32
  assert levels[0] == -1.0 and levels[7] == 0.0 and levels[15] == 1.0
  assert np.all(np.diff(levels) > 0)
  np.testing.assert_array_equal(levels[[1, 8, 14]], np.float32(
      [-0.6961928009986877, 0.07958029955625534, 0.7229568362236023]))


def test_levels_times_absmax_round_trip_exactly():
  rng = np.random.default_rng(0)
  idx = rng.integers(0, 16, (40, 64))
  idx[:, 0] = 15  # every block holds +absmax, so its absmax is exactly 0.5
  w = (nf4.NF4_LEVELS[idx] * np.float32(0.5)).reshape(20, 128)
  q = quantize(w)
  assert q['codes'].dtype == jnp.uint8 and q['codes'].shape == (40, 32)
  assert q['codes'][0, 0] >> 4 == 15  # the even element in the high nibble
  np.testing.assert_array_equal(np.asarray(dequantize(q, (20, 128))), w)


@functools.lru_cache(maxsize=None)
def normal_case():
  w = np.random.default_rng(1).normal(0.0, 0.02, (300, 200)).astype(np.float32)  # 938 blocks
  return w, quantize(w)


def test_each_element_takes_the_nearest_level():
  w, q = normal_case()
  blocks = np.pad(w.reshape(-1), (0, 938 * 64 - w.size)).reshape(938, 64)
  absmax = np.abs(blocks).max(1)
  want_idx = np.abs(blocks[..., None] / absmax[:, None, None] - nf4.NF4_LEVELS).argmin(-1)
  codes = np.asarray(q['codes'])
  np.testing.assert_array_equal(np.stack([codes >> 4, codes & 15], -1).reshape(938, 64),
                                want_idx)
  absmax_hat = np.asarray(nf4.dequantize_absmax(q))
  want = (nf4.NF4_LEVELS[want_idx] * absmax_hat[:, None]).reshape(-1)[:w.size].reshape(w.shape)
  np.testing.assert_allclose(np.asarray(dequantize(q, w.shape)), want, rtol=1e-6, atol=0)
  # Double quantization: 4 groups of <= 256 blocks, the absmaxes within 0.5% of the truth.
  assert q['absmax_q'].dtype == jnp.int8 and q['absmax_scale'].shape == (4,)
  assert np.abs(absmax_hat / absmax - 1).max() < 5e-3
  # The weight itself: NF4's error, about a tenth of the weights' spread.
  assert np.sqrt(np.mean((np.asarray(dequantize(q, w.shape)) - w) ** 2)) < 0.12 * w.std()


def test_size_is_about_4_127_bits_a_weight():
  w, q = normal_case()
  shapes = nf4.quantized_shapes(w.shape)
  assert {k: (tuple(v.shape), v.dtype) for k, v in q.items()} == shapes
  assert nf4.nbytes(q) * 8 / w.size == pytest.approx(nf4.bits_per_param(w.shape))
  big = (4096, 4096)
  assert nf4.bits_per_param(big) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)


def test_padding_and_dtype():
  w = np.random.default_rng(2).normal(size=(7, 3, 5)).astype(np.float32)  # 105: 2 blocks
  q = quantize(w, block_size=32, scale_block=1)
  assert q['codes'].shape == (4, 16) and q['absmax_scale'].shape == (4,)
  w_hat = dequantize(q, w.shape, jnp.bfloat16, scale_block=1)
  assert w_hat.shape == w.shape and w_hat.dtype == jnp.bfloat16
  assert np.abs(np.asarray(w_hat, np.float32) - w).max() < 0.2 * np.abs(w).max()
  with pytest.raises(ValueError, match='scale_block=256'):
    nf4.dequantize(q, w.shape)
  with pytest.raises(ValueError, match='do not hold'):
    nf4.dequantize(q, (7, 3, 50), scale_block=1)
