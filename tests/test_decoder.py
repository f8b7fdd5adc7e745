"""The decoder family: masks, GQA, RoPE, KV cache, remat/scan, dtypes, init."""
import dataclasses
import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import RUNTIME_FIELDS, base_config, gpt2_model, llama_model
from lm.models import decoder, get_model, init_cache, init_params
from lm.models.layers import apply_rope, rope_inv_freq
from lm.ops.backend import Kernels

V = 97


@functools.lru_cache(maxsize=None)  # compiling init is the slow part on CPU
def make(style='gpt2', kernels=Kernels(), **overrides):
  """A tiny model (architecture and runtime fields in overrides) and its params."""
  c = base_config()
  preset = gpt2_model if style == 'gpt2' else llama_model
  c.model.update(preset(vocab_size=V, max_len=32, n_layers=2, d_model=64, n_heads=4))
  if style == 'llama':
    c.model.update(n_kv_heads=2, d_ff=96)
  c.runtime.update({k: v for k, v in overrides.items() if k in RUNTIME_FIELDS})
  c.model.update({k: v for k, v in overrides.items() if k not in RUNTIME_FIELDS})
  model = get_model(c.model, c.runtime, kernels)
  return model, nn.unbox(init_params(model, jax.random.key(0)))


def jit_apply(model):
  # Eager op-by-op dispatch is slow on CPU; one jitted apply per model keeps tests fast.
  return jax.jit(model.apply, static_argnames=('decode', 'deterministic', 'mutable'))


def tokens(b=2, t=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_causal(style):
  model, params = make(style)
  apply = jit_apply(model)
  x = tokens()
  y = x.at[:, 9:].set((x[:, 9:] + 1) % V)
  a, b = apply({'params': params}, x), apply({'params': params}, y)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_packed_segments_are_isolated(style):
  model, params = make(style)
  doc_a, doc_b = tokens(1, 10, seed=2), tokens(1, 6, seed=3)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.array([[1] * 10 + [2] * 6])
  pos = jnp.array([list(range(10)) + list(range(6))])
  apply = jit_apply(model)
  out = apply({'params': params}, packed, positions_BT=pos, segment_ids_BT=seg)
  alone_a = apply({'params': params}, doc_a)
  alone_b = apply({'params': params}, doc_b)
  np.testing.assert_allclose(out[:, :10], alone_a, atol=1e-5)
  np.testing.assert_allclose(out[:, 10:], alone_b, atol=1e-5)


def test_gqa_with_all_kv_heads_is_mha():
  mha, p_mha = make('llama', n_kv_heads=0)
  gqa, p_gqa = make('llama', n_kv_heads=4)
  x = tokens()
  np.testing.assert_array_equal(mha.apply({'params': p_mha}, x), gqa.apply({'params': p_gqa}, x))


def test_gqa_equals_mha_with_repeated_kv_heads():
  gqa, params = make('llama', n_kv_heads=2)
  mha, _ = make('llama', n_kv_heads=4)
  repeated = jax.tree_util.tree_map_with_path(
      lambda path, w: jnp.repeat(w, 2, axis=1)
      if any(getattr(k, 'key', None) in ('key', 'value') for k in path) else w, params)
  x = tokens()
  np.testing.assert_allclose(gqa.apply({'params': params}, x),
                             mha.apply({'params': repeated}, x), atol=1e-5)


def test_rope_depends_only_on_relative_position():
  inv_freq = rope_inv_freq(16, 10000.0)
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))
  def score(m, n):
    qm = apply_rope(q, jnp.array([[m]]), inv_freq)
    kn = apply_rope(k, jnp.array([[n]]), inv_freq)
    return float(jnp.sum(qm * kn))
  assert score(3, 1) == pytest.approx(score(103, 101), abs=1e-4)
  assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3


@pytest.mark.parametrize('style,scan', [('gpt2', False), ('llama', False), ('llama', True)])
def test_kv_cache_matches_full_sequence(style, scan):
  model, params = make(style, scan_layers=scan)
  apply = jit_apply(model)
  x = tokens(2, 12)
  full = apply({'params': params}, x)
  cache = init_cache(model, 2, 12)
  # A 5-token prefill, then one token at a time.
  out, v = apply({'params': params, 'cache': cache}, x[:, :5], decode=True,
                       mutable=('cache',))
  outs = [out]
  for i in range(5, 12):
    out, v = apply({'params': params, 'cache': v['cache']}, x[:, i:i + 1], decode=True,
                         mutable=('cache',))
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_kv_cache_with_left_padded_prompts():
  model, params = make('llama')
  apply = jit_apply(model)
  x = tokens(1, 8)
  alone = apply({'params': params}, x)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), x], axis=1)
  seg = jnp.array([[0] * 3 + [1] * 8])
  pos = jnp.array([[0] * 3 + list(range(8))])
  cache = init_cache(model, 1, 11)
  out, _ = apply({'params': params, 'cache': cache}, padded, positions_BT=pos,
                       segment_ids_BT=seg, decode=True, mutable=('cache',))
  np.testing.assert_allclose(out[:, 3:], alone, atol=1e-5)


def stack_layers(params, n_layers):
  layers = [params.pop(f'layers_{i}') for i in range(n_layers)]
  return {**params, 'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}


@pytest.mark.parametrize('remat,scan', [('full', False), ('save_dots', False), ('none', True),
                                        ('full', True)])
def test_remat_and_scan_match_plain(remat, scan):
  plain, params = make('llama')
  other, _ = make('llama', remat=remat, scan_layers=scan)
  other_params = stack_layers(dict(params), 2) if scan else params
  x = tokens()

  def loss(model, p):
    return jnp.mean(jax.nn.log_softmax(model.apply({'params': p}, x))[..., 0])

  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(plain, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(other, p)))(other_params)
  if scan:
    g1 = stack_layers(dict(g1), 2)
  assert l1 == pytest.approx(float(l2), abs=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_bfloat16_close_to_float32(style):
  model32, params = make(style)
  model16, _ = make(style, dtype='bfloat16')
  x = tokens()
  a = model32.apply({'params': params}, x)
  b = model16.apply({'params': params}, x)
  assert b.dtype == jnp.float32  # logits stay float32
  # Stated tolerance: bfloat16 has an 8-bit mantissa; logits here are O(1).
  assert float(jnp.max(jnp.abs(a - b))) < 0.05
  pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
  assert float(jnp.max(jnp.abs(pa - pb))) < 0.01


def test_dropout_honours_deterministic():
  model, params = make('gpt2', embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  apply = jit_apply(model)
  x = tokens()
  det = apply({'params': params}, x)
  np.testing.assert_array_equal(det, apply({'params': params}, x))
  r1 = apply({'params': params}, x, deterministic=False, rngs={'dropout': jax.random.key(1)})
  r2 = apply({'params': params}, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  assert np.abs(r1 - det).max() > 1e-3 and np.abs(r1 - r2).max() > 1e-3


@pytest.mark.skipif(not any(map(shutil.which, ('c++', 'g++'))), reason='no C++ compiler')
@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_cpu_kernels_match_xla_in_the_model(style, monkeypatch):
  """The C++ kernels (attention='cpu', packed q, k, v without RoPE, the norms with and
  without the residual add before them, the dense layers with GELU, and GELU's backward
  alone as past L2) against XLA: packed segments, dropout, LayerNorm and RMSNorm, GELU and
  SwiGLU, gradients."""
  from lm.ops import (  # pylint: disable=import-outside-toplevel
      cpu_attention, cpu_kernels, cpu_linear, norms)
  assert cpu_kernels.available(), cpu_kernels.unavailable_reason()
  # What backend.select gives one CPU device (the tests run on 8).
  on = Kernels(attention='cpu', cpu_ops=True, fused_qkv=True, fused_adamw=True)
  calls = []
  for name in ('attention', 'packed_attention'):  # GPT-2: packed q, k, v; LLaMA: after RoPE
    monkeypatch.setattr(cpu_attention, name,
                        lambda *a, f=getattr(cpu_attention, name), n=name: calls.append(n) or f(*a))
  for name in ('cpu_norm', 'cpu_add_norm'):
    monkeypatch.setattr(norms, name,
                        lambda *a, f=getattr(norms, name), n=name: calls.append(n) or f(*a))
  for name in ('linear', 'linear_gelu', 'gelu'):
    monkeypatch.setattr(cpu_linear, name,
                        lambda *a, f=getattr(cpu_linear, name), n=name: calls.append(n) or f(*a))
  kw = dict(head_dim=16, attn_dropout=0.1, resid_dropout=0.1)
  (xla, params), (cpu, _) = make(style, **kw), make(style, kernels=on, **kw)
  x, seg = tokens(), jnp.array([[1] * 10 + [2] * 6, [1] * 16])
  def loss(model, p):
    out = model.apply({'params': p}, x, segment_ids_BT=seg, deterministic=False,
                      rngs={'dropout': jax.random.key(5)})
    return jnp.mean(out ** 2), out
  calls.clear()  # init ran the model
  (lx, ox), gx = jax.value_and_grad(functools.partial(loss, xla), has_aux=True)(params)
  assert not calls  # the reference (Kernels()): no kernel at all
  (lc, oc), gc = jax.value_and_grad(functools.partial(loss, cpu), has_aux=True)(params)
  want = {'packed_attention', 'linear_gelu'} if style == 'gpt2' else {'attention'}
  assert set(calls) == want | {'cpu_norm', 'cpu_add_norm', 'linear'}, 'a kernel was not used'
  np.testing.assert_allclose(oc, ox, atol=1e-5)
  for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gx)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  if style == 'gpt2':  # as if past L2: XLA's matmuls, then GELU with the C++ backward
    calls.clear()
    monkeypatch.setattr(cpu_linear, 'MAX_X_BYTES', 0)
    (_, op), gp = jax.value_and_grad(functools.partial(loss, cpu), has_aux=True)(params)
    assert 'gelu' in calls and not {'linear', 'linear_gelu'} & set(calls)
    np.testing.assert_allclose(op, ox, atol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
      np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize('style', ['gpt2', 'llama'])  # biases; GQA without biases
def test_fused_qkv_matches_three_projections(style):
  """On one device q, k, v come from one matmul; on a mesh from three: the same function."""
  results = []
  for fused in (True, False):
    model, params = make(style, kernels=Kernels(fused_qkv=fused))
    def loss(p, model=model):
      out = model.apply({'params': p}, tokens())
      return jnp.mean(out ** 2), out
    results.append(jax.value_and_grad(loss, has_aux=True)(params))
  ((_, fused), g_fused), ((_, three), g_three) = results
  np.testing.assert_allclose(fused, three, atol=1e-5)
  assert jax.tree.structure(g_fused) == jax.tree.structure(g_three)
  for a, b in zip(jax.tree.leaves(g_fused), jax.tree.leaves(g_three)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_init_follows_gpt2():
  model, params = make('gpt2', n_layers=8, d_model=256)
  std = lambda w: float(jnp.std(w))
  assert std(params['embed']) == pytest.approx(0.02, rel=0.05)
  assert std(params['layers_0']['attn']['query']['kernel']) == pytest.approx(0.02, rel=0.05)
  resid = 0.02 / np.sqrt(2 * 8)
  assert std(params['layers_0']['attn']['out']['kernel']) == pytest.approx(resid, rel=0.05)
  assert std(params['layers_0']['mlp']['wo']['kernel']) == pytest.approx(resid, rel=0.05)
  assert float(jnp.abs(params['layers_0']['attn']['query']['bias']).max()) == 0.0


def test_every_param_has_logical_axes():
  model, _ = make('llama', scan_layers=True)
  boxed = init_params(model, jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == x.value.ndim for x in leaves)
  assert all(x.names[0] == 'layers' for x in leaves if x.value.ndim == 4)


def test_bad_config_errors():
  with pytest.raises(ValueError, match='n_kv_heads'):
    decoder.DecoderConfig(vocab_size=10, n_heads=4, n_kv_heads=3, d_model=64)
  with pytest.raises(ValueError, match='remat'):
    decoder.DecoderConfig(vocab_size=10, remat='sometimes')


def test_sliding_window_limits_context():
  model, params = make('llama', sliding_window=4)
  apply = jit_apply(model)
  x = tokens(1, 12)
  y = x.at[:, 0].set((x[:, 0] + 1) % V)
  a, b = apply({'params': params}, x), apply({'params': params}, y)
  # Two layers of window 4 see at most 6 tokens back: position 11 is blind to token 0.
  np.testing.assert_allclose(a[:, 11], b[:, 11], atol=1e-6)
  assert np.abs(a[:, 1] - b[:, 1]).max() > 1e-3


def _linear_calls(model, params):
  """(name, weights_only) of every Linear call in one forward pass."""
  from lm.models.layers import Linear  # pylint: disable=import-outside-toplevel
  calls = []
  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, Linear) and context.method_name == '__call__':
      calls.append(('/'.join(context.module.path), kwargs.get('weights_only', False)))
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(spy):
    model.apply({'params': params}, tokens())
  return calls


@pytest.mark.parametrize('style', ['gpt2', 'llama'])
def test_linear_is_the_only_projection_path_with_adapters(style):
  """With adapters on, the seam turns the fused q/k/v off: every kernel in the tree is
  read by exactly one Linear call that does its own matmul (where adapters hook in)."""
  from lm.ops import backend  # pylint: disable=import-outside-toplevel
  runtime = base_config().runtime
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  from lm import peft  # pylint: disable=import-outside-toplevel
  kernels = backend.select(runtime, mesh, adapters=peft.Adapters(method='lora', targets='^$'))
  assert not kernels.fused_qkv and backend.select(runtime, mesh).fused_qkv
  model, params = make(style, kernels=kernels)
  kernels_in_tree = sorted('/'.join(p[:-1]) for p in map(
      lambda kp: tuple(str(k.key) for k in kp[0]),
      jax.tree_util.tree_flatten_with_path(params)[0]) if p[-1] == 'kernel')
  calls = _linear_calls(model, params)
  assert sorted(name for name, _ in calls) == kernels_in_tree
  assert not any(weights_only for _, weights_only in calls)
  # Without adapters on one CPU device q, k, v are read for the fused matmul instead.
  fused, _ = make(style, kernels=dataclasses.replace(kernels, fused_qkv=True))
  assert sum(w for _, w in _linear_calls(fused, params)) == 3 * 2  # q, k, v x 2 layers


def test_shape_only_tracing_compiles_nothing(monkeypatch):
  """model_summary's path (jax.eval_shape of the default model) never builds C++ kernels;
  lm/models and lm/train never look at devices or backends themselves."""
  import pathlib  # pylint: disable=import-outside-toplevel
  from lm import models  # pylint: disable=import-outside-toplevel
  from lm.ops import cpu_kernels  # pylint: disable=import-outside-toplevel
  def no_compiler():
    raise AssertionError('shape-only tracing ran the C++ compiler')
  monkeypatch.setattr(cpu_kernels, '_compile', no_compiler)
  monkeypatch.setattr(cpu_kernels, 'available', no_compiler)
  c = base_config()
  c.model.update(gpt2_model(vocab_size=V, max_len=64, n_layers=2, d_model=64, n_heads=4))
  rows = models.param_table(get_model(c.model, c.runtime))
  assert sum(n for _, _, n in rows) > 0
  root = pathlib.Path(__file__).resolve().parents[1] / 'lm'
  for path in [*root.glob('models/*.py'), *root.glob('train/*.py')]:
    text = path.read_text()
    for needle in ('device_count()', 'default_backend()', 'cpu_kernels.available'):
      assert needle not in text, f'{path.name} decides kernels itself ({needle})'
