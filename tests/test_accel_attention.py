"""lm/ops/accel_attention.py on CPU: splash in Pallas interpret mode, cuDNN's argument
plumbing through XLA, lean attention's residuals, and splash lowering for a TPU topology."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.models.layers import attention_mask
from lm.ops import accel_attention as aa
from lm.ops.attention import attention as reference_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(b, t, n, kv, h, seed=0):
  """q, k, v and a cotangent for the gradients (numpy: no compile per shape)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return normal(b, t, n, h), normal(b, t, kv, h), normal(b, t, kv, h), normal(b, t, n, h)


def _packed_segments(b, t):
  """Rows of 2-3 documents with padding (0) at their ends, different per row."""
  rows = []
  for i in range(b):
    cuts = [t // 3 + 7 * i, 2 * t // 3 + 5 * i, t - 9 - 4 * i]
    rows.append(np.searchsorted(cuts, np.arange(t), side='right') + 1)
    rows[-1][cuts[-1]:] = 0
  return jnp.asarray(np.stack(rows), jnp.int32)


def _mask(segment_ids_BT, window, b, t):
  idx = jnp.broadcast_to(jnp.arange(t), (b, t))
  seg = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
  return attention_mask(idx, idx, seg, seg, window)


def _value_and_grads(f, q, k, v, ct):
  """f(q, k, v) and d(sum(f * ct))/d(q, k, v), in one jit."""
  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return out, vjp(ct)
  return jax.jit(run)(q, k, v, ct)


def _assert_close(got, want, tol=TOL):
  (out, grads), (out_ref, grads_ref) = got, want
  np.testing.assert_allclose(out, out_ref, **tol)
  for name, g, g_ref in zip(('dq', 'dk', 'dv'), grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, err_msg=name, **tol)


CASES = {  # name: (N, K, window, segments)
    'causal_mha': (4, 4, 0, False),
    'causal_gqa': (4, 2, 0, False),
    'window_gqa': (4, 2, 48, False),
    'segments_gqa': (4, 2, 0, True),
    'segments_window_mha': (2, 2, 40, True),
}


@pytest.mark.parametrize('case', CASES)
def test_splash_matches_reference(case):
  n, kv, window, segments = CASES[case]
  b, t, h = 2, 128, 16
  q, k, v, ct = _inputs(b, t, n, kv, h)
  seg = _packed_segments(b, t) if segments else None
  mask = _mask(seg, window, b, t)
  got = _value_and_grads(lambda q, k, v: aa.splash_attention(
      q, k, v, seg, sliding_window=window, interpret=True), q, k, v, ct)
  want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, None, True),
                          q, k, v, ct)
  _assert_close(got, want)
  # The mask under test matters: plain causal attention gives other values.
  plain = reference_attention(q, k, v, None, None, True)
  if window or segments:
    assert np.abs(np.asarray(plain) - np.asarray(want[0])).max() > 1e-2


def test_splash_on_a_mesh():
  """shard_map over an 8-device CPU mesh: batch over (data, fsdp), heads over tensor."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  b, t, n, kv, h = 4, 128, 4, 2, 16
  q, k, v, ct = _inputs(b, t, n, kv, h, seed=1)
  seg = _packed_segments(b, t)
  spec = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor', None))
  q, k, v, ct = (jax.device_put(x, spec) for x in (q, k, v, ct))
  seg = jax.device_put(seg, NamedSharding(mesh, P(('data', 'fsdp'), None)))
  got = _value_and_grads(lambda q, k, v: aa.splash_attention(
      q, k, v, seg, sliding_window=48, mesh=mesh, interpret=True), q, k, v, ct)
  assert got[0].sharding.spec == spec.spec
  mask = _mask(seg, 48, b, t)
  want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, None, True),
                          q, k, v, ct)
  _assert_close(got, want)


def test_splash_rejects_bad_shapes():
  q, k, v, _ = _inputs(1, 96, 2, 2, 8)
  with pytest.raises(ValueError, match='multiples of 128'):
    aa.splash_attention(q, k, v, interpret=True)
  q, k, v, _ = _inputs(1, 128, 2, 2, 8)
  with pytest.raises(ValueError, match='T == S'):
    aa.splash_attention(q, jnp.concatenate([k, k], 1), jnp.concatenate([v, v], 1),
                        jnp.ones((1, 128), jnp.int32), interpret=True)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ('data', 'fsdp', 'tensor'))
  with pytest.raises(ValueError, match='divide evenly'):  # 4-way tensor over 2 kv heads
    aa.splash_attention(*_inputs(1, 128, 4, 2, 8)[:3], mesh=mesh, interpret=True)


def test_splash_lowers_to_mosaic_for_tpu(monkeypatch):
  """Compile forward + backward for a v5e 2x2 slice (no TPU needed, only libtpu)."""
  pytest.importorskip('libtpu', reason='libtpu is needed to compile for a TPU topology')
  from jax.experimental import topologies
  # Compiling touches no chip, so other processes holding libtpu's lockfile do not matter.
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  topo = topologies.get_topology_desc(
      platform='tpu', topology_name='v5e:2x2', chip_config_name='default',
      chips_per_host_bounds=(2, 2, 1), num_slices=1)
  mesh = Mesh(np.array(topo.devices).reshape(1, 2, 2), ('data', 'fsdp', 'tensor'))
  b, t, n, kv, h = 2, 256, 4, 2, 128
  sharded = lambda shape, dtype, spec: jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, spec))
  q = sharded((b, t, n, h), jnp.bfloat16, P(('data', 'fsdp'), None, 'tensor'))
  k = sharded((b, t, kv, h), jnp.bfloat16, P(('data', 'fsdp'), None, 'tensor'))
  seg = sharded((b, t), jnp.int32, P(('data', 'fsdp'), None))

  def loss_and_grads(q, k, v, seg):
    loss = lambda q, k, v: aa.splash_attention(
        q, k, v, seg, sliding_window=64, mesh=mesh).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, (0, 1, 2))(q, k, v)

  hlo = jax.jit(loss_and_grads).lower(q, k, k, seg).compile().as_text()
  assert aa.uses_splash(hlo)
  assert hlo.count('tpu_custom_call') >= 3  # forward, dq and dkv kernels
  assert not aa.uses_splash(jax.jit(lambda x: x * 2).lower(q).compile().as_text())


def test_cudnn_supported():
  bf16 = lambda *s: jnp.zeros(s, jnp.bfloat16)
  q, k = bf16(2, 64, 8, 64), bf16(2, 64, 2, 64)
  assert aa.cudnn_supported(q, k, k, backend='gpu')
  assert aa.cudnn_supported(q.astype(jnp.float16), k.astype(jnp.float16), backend='gpu')
  assert not aa.cudnn_supported(q, k, k, backend='cpu')
  assert not aa.cudnn_supported(q.astype(jnp.float32), k.astype(jnp.float32), backend='gpu')
  assert not aa.cudnn_supported(q, k.astype(jnp.float16), backend='gpu')  # mixed dtypes
  assert not aa.cudnn_supported(bf16(2, 64, 8, 12), bf16(2, 64, 2, 12), backend='gpu')
  assert not aa.cudnn_supported(bf16(2, 64, 8, 256), bf16(2, 64, 2, 256), backend='gpu')
  assert not aa.cudnn_supported(q, bf16(2, 64, 3, 64), backend='gpu')  # 3 does not divide 8
  long_k = bf16(2, 128, 2, 64)  # causal with S != T: cuDNN aligns top-left, we bottom-right
  assert not aa.cudnn_supported(q, long_k, backend='gpu')
  assert aa.cudnn_supported(q, long_k, causal=False, backend='gpu')
  assert not aa.cudnn_supported(bf16(2, 63, 8, 64), bf16(2, 63, 2, 64), backend='gpu')
  assert not aa.cudnn_supported(q, k)  # this CPU-only host


@pytest.mark.parametrize('window,segments', [(0, False), (0, True), (5, False), (5, True)])
def test_cudnn_arguments_through_xla(window, segments):
  """The arguments cudnn_attention hands jax.nn.dot_product_attention mean our masks."""
  b, t = 2, 24
  q, k, v, _ = _inputs(b, t, 4, 2, 8)
  seg = jnp.asarray([[1] * 10 + [2] * 10 + [0] * 4, [1] * 7 + [2] * 15 + [0] * 2],
                    jnp.int32) if segments else None
  out = aa.cudnn_attention(q, k, v, seg, sliding_window=window, implementation='xla')
  want = reference_attention(q, k, v, _mask(seg, window, b, t), None, True)
  np.testing.assert_allclose(out, want, **TOL)


def test_lean_attention_matches_reference():
  b, t, n, kv, h = 2, 32, 4, 2, 8
  q, k, v, ct = _inputs(b, t, n, kv, h, seed=2)
  seg = jnp.asarray([[1] * 12 + [2] * 16 + [0] * 4, [3] * 30 + [0] * 2], jnp.int32)
  mask = _mask(seg, 6, b, t)  # causal (also in the mask) + segments + window
  got = _value_and_grads(lambda q, k, v: aa.lean_attention(q, k, v, mask, causal=True),
                         q, k, v, ct)
  want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, mask, None, True),
                          q, k, v, ct)
  _assert_close(got, want)
  # Non-causal cross-attention (S != T) against a dense mask.
  k2, v2 = jnp.concatenate([k, k[:, :8]], 1), jnp.concatenate([v, v[:, :8]], 1)
  m2 = np.random.default_rng(3).random((b, 1, t, t + 8)) < 0.7
  m2[..., 0] = True  # no fully masked row
  got = _value_and_grads(lambda q, k, v: aa.lean_attention(q, k, v, m2, causal=False),
                         q, k2, v2, ct)
  want = _value_and_grads(lambda q, k, v: reference_attention(q, k, v, m2, None, False),
                          q, k2, v2, ct)
  _assert_close(got, want)


def _residual_shapes(f, *args):
  """(shape, dtype) of what f's VJP keeps from the forward for the backward."""
  residuals = jax.eval_shape(lambda *a: jax.tree_util.tree_leaves(jax.vjp(f, *a)[1]), *args)
  return [(x.shape, x.dtype) for x in residuals]


def test_lean_attention_saves_no_probabilities():
  b, t, s, n, kv, h = 2, 16, 24, 4, 2, 8  # T != S, so a [.., T, S] residual is unambiguous
  q = jnp.ones((b, t, n, h))
  k = v = jnp.ones((b, s, kv, h))
  mask = jnp.ones((b, 1, t, s), bool)
  per_head = lambda shapes: [sh for sh, dt in shapes
                             if sh[-2:] == (t, s) and jnp.issubdtype(dt, jnp.floating)]
  # The check can fail: the plain formulation does keep the [B, K, G, T, S] probabilities.
  plain = _residual_shapes(lambda q, k, v: aa._softmax_attention(q, k, v, mask, True), q, k, v)
  assert (b, kv, n // kv, t, s) in per_head(plain)
  lean = _residual_shapes(lambda q, k, v: aa.lean_attention(q, k, v, mask, causal=True),
                          q, k, v)
  assert per_head(lean) == [], lean
  # What it keeps is its inputs: at most q, k, v and the bool mask.
  assert sum(np.prod(sh) for sh, dt in lean if jnp.issubdtype(dt, jnp.floating)) <= (
      q.size + k.size + v.size)
