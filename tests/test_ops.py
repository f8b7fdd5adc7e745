"""lm/ops: each hand-written kernel against the plain JAX formulation, values and gradients."""
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.config import base_config
from lm.models.layers import contract
from lm.ops import (activations, attention, backend, cpu_attention, cpu_kernels, cpu_linear,
                    dropout, norms)
from lm.train import optim

# The C++ kernels need a compiler; where there is one, a failed build fails the tests.
needs_cxx = pytest.mark.skipif(
    not any(map(shutil.which, ('c++', 'g++'))), reason='no C++ compiler for the CPU kernel')


def reference_attention(q_BTNH, k_BSKH, v_BSKH, allowed_B1TS, keep_BNTS=None, rate=0.0):
  n, k = q_BTNH.shape[2], k_BSKH.shape[2]
  k_BSNH, v_BSNH = (jnp.repeat(x, n // k, axis=2) for x in (k_BSKH, v_BSKH))
  scores = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH) / math.sqrt(q_BTNH.shape[-1])
  probs = jax.nn.softmax(jnp.where(allowed_B1TS, scores, -1e30), axis=-1)
  if keep_BNTS is not None:
    probs = jnp.where(keep_BNTS, probs / (1.0 - rate), 0.0)
  return jnp.einsum('bnts,bsnh->btnh', probs, v_BSNH)


def qkv(b=2, t=32, s=32, n=4, k=2, h=8, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, t, n, h)), jax.random.normal(kk, (b, s, k, h)),
          jax.random.normal(kv, (b, s, k, h)))


def causal_allowed(t, s):
  return jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]


def check_against_reference(fn, ref, args, atol=2e-5):
  out, ref_out = fn(*args), ref(*args)
  np.testing.assert_allclose(out, ref_out, atol=atol)
  ct = jax.random.normal(jax.random.key(9), out.shape)
  grads = jax.grad(lambda *a: jnp.sum(fn(*a) * ct), argnums=(0, 1, 2))(*args)
  ref_grads = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), argnums=(0, 1, 2))(*args)
  for g, r in zip(grads, ref_grads):
    if r is not None:  # None: an absent bias
      np.testing.assert_allclose(g, r, atol=atol)


@pytest.mark.parametrize('kv_heads', [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize('block', [0, 8])  # one block; 4 causal query blocks
def test_causal_attention_matches_reference(kv_heads, block):
  q, k, v = qkv(k=kv_heads)
  fn = lambda q, k, v: attention.attention(q, k, v, None, None, True, 0.0, block)
  ref = lambda q, k, v: reference_attention(q, k, v, causal_allowed(32, 32))
  check_against_reference(fn, ref, (q, k, v))


def test_masked_attention_with_more_keys_than_queries():
  """Segment masks and a cache-like S > T (query i sits at key i + S - T)."""
  q, k, v = qkv(t=16, s=32)
  seg = jnp.array([[1] * 20 + [2] * 12, [1] * 32])
  allowed = (seg[:, 16:, None] == seg[:, None, :])[:, None] & causal_allowed(16, 32)
  for block in (0, 8):
    fn = lambda q, k, v: attention.attention(q, k, v, allowed, None, True, 0.0, block)
    ref = lambda q, k, v: reference_attention(q, k, v, allowed)
    check_against_reference(fn, ref, (q, k, v))


@pytest.mark.parametrize('block', [0, 8])
def test_attention_dropout_uses_one_mask_forward_and_backward(block):
  q, k, v = qkv()
  seed, rate = dropout.seed_from_key(jax.random.key(3)), 0.25
  keep_BNTS = dropout.keep_mask(seed, (2, 4, 32, 32), rate)
  fn = lambda q, k, v: attention.attention(q, k, v, None, seed, True, rate, block)
  ref = lambda q, k, v: reference_attention(q, k, v, causal_allowed(32, 32), keep_BNTS, rate)
  check_against_reference(fn, ref, (q, k, v))


@needs_cxx
@pytest.mark.parametrize('kv_heads', [4, 2])  # MHA, GQA
def test_cpu_kernel_matches_reference_with_segments_and_dropout(kv_heads):
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  q, k, v = qkv(t=32, s=32, k=kv_heads, h=16)
  seg = jnp.array([[1] * 20 + [2] * 12, [0] * 5 + [1] * 27], jnp.int32)  # packed; padding
  allowed = (seg[:, :, None] == seg[:, None, :])[:, None] & causal_allowed(32, 32)
  for rate in (0.0, 0.25):
    seed = dropout.seed_from_key(jax.random.key(3))
    keep_BNTS = dropout.keep_mask(seed, (2, 4, 32, 32), rate) if rate else None
    fn = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, seg, seed, True, rate))
    ref = lambda q, k, v: reference_attention(q, k, v, allowed, keep_BNTS, rate)
    check_against_reference(fn, ref, (q, k, v), atol=1e-5)
    # The packed entry: q, k, v side by side in one [B, T, (N + 2K) H] array (its gradient
    # comes back in that layout; check_against_reference compares gradients per input).
    def packed(q, k, v):
      qkv_BTE = jnp.concatenate([x.reshape(2, 32, -1) for x in (q, k, v)], axis=-1)
      return cpu_attention.packed_attention(qkv_BTE, None, seg, seed, 4, kv_heads, True, rate)
    check_against_reference(jax.jit(packed), ref, (q, k, v), atol=1e-5)
    # With the projection's bias added inside the kernel (its gradient: dqkv summed).
    qkv_BTE = jnp.concatenate([x.reshape(2, 32, -1) for x in (q, k, v)], axis=-1)
    bias_E = jax.random.normal(jax.random.key(5), qkv_BTE.shape[-1:])
    splits = [4 * 16, (4 + kv_heads) * 16]
    def ref_biased(qkv_BTE, bias_E, unused):
      q_, k_, v_ = jnp.split(qkv_BTE + bias_E, splits, axis=-1)
      return ref(q_.reshape(q.shape), k_.reshape(k.shape), v_.reshape(v.shape))
    biased = jax.jit(lambda x, b, unused: cpu_attention.packed_attention(
        x, b, seg, seed, 4, kv_heads, True, rate))
    check_against_reference(biased, ref_biased, (qkv_BTE, bias_E, jnp.zeros(())), atol=1e-4)
    assert cpu_attention.supports_packed(jnp.zeros((2, 32, (4 + 2 * kv_heads) * 16)), 4,
                                         kv_heads)
    assert not cpu_attention.supports_packed(jnp.zeros((2, 32, 200)), 4, kv_heads)


@needs_cxx
def test_cpu_kernel_non_causal_and_shapes_it_declines():
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  q, k, v = qkv(t=16, s=16, h=32)
  seg = jnp.ones((2, 16), jnp.int32)
  fn = jax.jit(lambda q, k, v: cpu_attention.attention(q, k, v, seg, jnp.zeros(2, jnp.uint32),
                                                       False, 0.0))
  ref = lambda q, k, v: reference_attention(q, k, v, jnp.ones((1, 1, 16, 16), bool))
  check_against_reference(fn, ref, (q, k, v), atol=1e-5)
  assert cpu_attention.supports(q, k)
  assert not cpu_attention.supports(*qkv(h=8)[:2])  # head_dim not a multiple of 16
  assert not cpu_attention.supports(*qkv(t=16, s=32, h=16)[:2])  # a KV cache (S > T)
  assert not cpu_attention.supports(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16))


def test_dropout_rate_scale_and_determinism():
  x = jnp.ones((256, 512))
  y = dropout.dropout(x, 0.2, jax.random.key(0))
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - 0.8) < 0.01
  np.testing.assert_allclose(np.asarray(y)[kept], 1.0 / 0.8, rtol=1e-6)
  np.testing.assert_array_equal(y, dropout.dropout(x, 0.2, jax.random.key(0)))
  assert (dropout.dropout(x, 0.2, jax.random.key(1)) != y).any()
  # Rows and columns are not correlated: each row keeps about 80% too.
  assert np.abs(kept.mean(axis=1) - 0.8).max() < 0.1


@pytest.mark.parametrize('impl', ['xla', pytest.param('cpu', marks=needs_cxx)])
@pytest.mark.parametrize('centered,bias', [(True, True), (True, False), (False, False)])
def test_norm_matches_reference(centered, bias, impl):
  kx, ks, kb = jax.random.split(jax.random.key(0), 3)
  x = 3.0 * jax.random.normal(kx, (5, 37, 64)) + 1.0  # 185 rows: uneven row chunks
  scale = 1.0 + 0.1 * jax.random.normal(ks, (64,))
  b = 0.1 * jax.random.normal(kb, (64,)) if bias else None

  def ref(x, scale, b):
    xc = x - x.mean(-1, keepdims=True) if centered else x
    y = xc / jnp.sqrt(jnp.mean(jnp.square(xc), -1, keepdims=True) + 1e-5) * scale
    return y + b if b is not None else y

  if impl == 'cpu':
    assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
    assert norms.cpu_supports(x) and not norms.cpu_supports(x[..., :40])
    assert not norms.cpu_supports(x.astype(jnp.bfloat16))
  op = norms.cpu_norm if impl == 'cpu' else norms.norm
  fn = jax.jit(lambda x, scale, b: op(x, scale, b, centered, 1e-5))
  check_against_reference(fn, ref, (x, scale, b), atol=1e-4)


@needs_cxx
@pytest.mark.parametrize('centered,bias', [(True, True), (False, False)])
def test_cpu_add_norm_matches_add_then_norm(centered, bias):
  """(x + delta, norm(x + delta)) in one C++ pass each way: both outputs and all gradients,
  the residual's gradient added to the norm's."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  kx, kd, ks, kb = jax.random.split(jax.random.key(5), 4)
  x, delta = jax.random.normal(kx, (5, 37, 64)), jax.random.normal(kd, (5, 37, 64))
  scale = 1.0 + 0.1 * jax.random.normal(ks, (64,))
  b = 0.1 * jax.random.normal(kb, (64,)) if bias else None
  cts = jax.random.normal(jax.random.key(6), (2, 5, 37, 64))
  def loss(fn):
    return lambda x, delta, scale, b: sum(
        jnp.sum(o * ct) for o, ct in zip(fn(x, delta, scale, b, centered, 1e-5), cts))
  out = jax.jit(norms.cpu_add_norm, static_argnums=(4, 5))(x, delta, scale, b, centered, 1e-5)
  ref = norms.add_norm(x, delta, scale, b, centered, 1e-5)
  for o, r in zip(out, ref):
    np.testing.assert_allclose(o, r, atol=1e-5)
  argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
  grads = jax.grad(loss(norms.cpu_add_norm), argnums)(x, delta, scale, b)
  ref_grads = jax.grad(loss(norms.add_norm), argnums)(x, delta, scale, b)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, atol=1e-4)


def test_gelu_matches_jax():
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_allclose(activations.gelu_tanh(x), jax.nn.gelu(x, approximate=True),
                             atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(activations.gelu_tanh(x) * jnp.cos(x)))(x)
  r = jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=True) * jnp.cos(x)))(x)
  np.testing.assert_allclose(g, r, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize('bias,gelu', [(True, True), (True, False), (False, True), (False, False)])
def test_cpu_linear_matches_reference(bias, gelu):
  """205 rows (not a multiple of the 6-row tile or of a task's 96), K = 144 (two blocks of
  w's rows), N = 80 (a 64-column panel and a 16-column one)."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  kx, kw, kb = jax.random.split(jax.random.key(4), 3)
  x = jax.random.normal(kx, (5, 41, 144))
  w = 0.1 * jax.random.normal(kw, (144, 80))
  b = jax.random.normal(kb, (80,)) if bias else None
  def ref(x, w, b):
    y = x @ w + (0.0 if b is None else b)
    return activations.gelu_tanh(y) if gelu else y
  fn = jax.jit(cpu_linear.linear_gelu if gelu else cpu_linear.linear)
  check_against_reference(fn, ref, (x, w, b), atol=1e-4)
  assert cpu_linear.supports(x, w)
  assert not cpu_linear.supports(x, w[:, :72])  # N % 16
  assert not cpu_linear.supports(x[..., :136], w[:136])  # K % 16
  assert not cpu_linear.supports(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  big = jax.ShapeDtypeStruct((cpu_linear.MAX_X_BYTES // 4 // 144 + 1, 144), jnp.float32)
  assert not cpu_linear.supports(big, w)  # x past L2: XLA's matmul is faster


@needs_cxx
def test_cpu_gelu_backward_matches_reference():
  """GELU with the C++ backward (for XLA's matmul outputs): 37 rows, 48 columns."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  u = 3.0 * jax.random.normal(jax.random.key(5), (37, 48))
  ct = jax.random.normal(jax.random.key(6), u.shape)
  np.testing.assert_allclose(cpu_linear.gelu(u), activations.gelu_tanh(u), atol=1e-6)
  g = jax.grad(lambda u: jnp.sum(jax.jit(cpu_linear.gelu)(u) * ct))(u)
  r = jax.grad(lambda u: jnp.sum(jax.nn.gelu(u, approximate=True) * ct))(u)
  np.testing.assert_allclose(g, r, atol=1e-5)
  assert cpu_linear.supports_gelu(u) and not cpu_linear.supports_gelu(u[:, :40])
  assert not cpu_linear.supports_gelu(u.astype(jnp.bfloat16))


@pytest.mark.parametrize('in_dims', [1, 2])
def test_contract_matches_dot_general(in_dims):
  kx, kw, kc = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(kx, (2, 5, 4, 6))
  w = jax.random.normal(kw, x.shape[4 - in_dims:] + (7, 3))
  ref = lambda x, w: jax.lax.dot_general(
      x, w, ((tuple(range(4 - in_dims, 4)), tuple(range(in_dims))), ((), ())))
  out = contract(x, w, in_dims)
  np.testing.assert_allclose(out, ref(x, w), rtol=1e-5, atol=1e-5)
  ct = jax.random.normal(kc, out.shape)
  grads = jax.grad(lambda x, w: jnp.sum(contract(x, w, in_dims) * ct), (0, 1))(x, w)
  ref_grads = jax.grad(lambda x, w: jnp.sum(ref(x, w) * ct), (0, 1))(x, w)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize('grad_scale,clip', [(1.0, 1.0), (1e-4, 1.0), (1.0, 0.0)],
                         ids=['clipped', 'under_the_clip', 'no_clip'])
def test_fused_adamw_equals_optax(grad_scale, clip):
  """The one-op CPU AdamW (optim.fused_update) against optax's chain + apply_updates:
  same params, moments and counts over steps, sizes off the 16-lane and chunk grid."""
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((300, 70)), jnp.float32),
            'b': jnp.asarray(rng.standard_normal(70), jnp.float32),
            'big': {'kernel': jnp.asarray(rng.standard_normal((5, 7001)), jnp.float32)}}
  c = base_config().optimizer
  c.update(lr=1e-2, min_lr=1e-3, warmup_steps=2, decay_steps=10, grad_clip=clip)
  schedule = optim.make_schedule(c, 10)
  tx, _ = optim.make_optimizer(c, 10, params)
  fused = jax.jit(optim.fused_update(c, schedule, params, backend.Kernels(fused_adamw=True)))
  ref_p, ref_s = params, tx.init(params)
  p, s = params, tx.init(params)
  for _ in range(4):
    g = jax.tree.map(lambda x: grad_scale * jnp.asarray(rng.standard_normal(x.shape),
                                                        jnp.float32), params)
    u, ref_s = tx.update(g, ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    p, s, norm = fused(p, g, s)
    assert float(norm) == pytest.approx(float(optax.tree.norm(g)), rel=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, p, ref_p)
  jax.tree.map(close, s, ref_s)  # mu, nu and both step counts
  assert jax.tree.structure(s) == jax.tree.structure(ref_s)
  assert float(jnp.max(jnp.abs(p['w'] - params['w']))) > 1e-3  # it moved


def test_backend_select_makes_every_choice_from_the_mesh(monkeypatch):
  """One CPU device: the C++ kernels where they are tuned (AVX-512), XLA elsewhere; a mesh
  of several devices: XLA and no fused q/k/v; adapters: no fused projections."""
  from lm.train import partitioning  # pylint: disable=import-outside-toplevel
  runtime = base_config().runtime
  one = partitioning.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  eight = partitioning.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  monkeypatch.setattr(cpu_kernels, 'tuned_for_this_cpu', lambda: True)
  k = backend.select(runtime, one)
  assert (k.attention, k.cpu_ops, k.fused_qkv, k.fused_adamw, k.mesh) == ('cpu', True, True,
                                                                          True, None)
  from lm import peft  # pylint: disable=import-outside-toplevel
  assert not backend.select(runtime, one, adapters=peft.Adapters(method='lora')).fused_qkv
  k = backend.select(runtime, eight)
  assert (k.attention, k.cpu_ops, k.fused_qkv, k.fused_adamw) == ('xla', False, False, False)
  assert k.mesh is eight and k.platform == 'cpu'
  runtime.attention = 'splash'  # asked for a kernel this backend lacks: XLA
  assert backend.select(runtime, one).attention == 'xla'
  runtime.attention = 'auto'
  monkeypatch.setattr(cpu_kernels, 'tuned_for_this_cpu', lambda: False)  # e.g. AVX2 only
  k = backend.select(runtime, one)
  assert (k.attention, k.cpu_ops, k.fused_qkv, k.fused_adamw) == ('xla', False, True, False)
  runtime.attention = 'flash'
  with pytest.raises(ValueError, match='runtime.attention must be one of'):
    backend.select(runtime, one)
