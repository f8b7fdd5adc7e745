"""The encoder family (BERT / RoBERTa): heads, masks, positions, layouts, errors, counts."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models
from lm.config import base_config
from lm.models.encoder import EncoderConfig
from lm.train.partitioning import LOGICAL_RULES

V = 50


def model_of(**overrides):
  """A tiny encoder with every head (init_std large enough for masks to matter)."""
  c = base_config('encoder')
  runtime = {k: overrides.pop(k) for k in list(overrides) if k in c.runtime}
  c.model.update(dict(dict(vocab_size=V, max_len=16, max_positions=20, d_model=32, n_layers=1,
                           n_heads=4, num_labels=3, init_std=0.2), **overrides))
  c.runtime.update(runtime)
  return models.get_model(c.model, c.runtime)


@functools.lru_cache(maxsize=None)
def jitted(model):
  return jax.jit(model.apply, static_argnames=('head', 'deterministic'))


def run(model, params, *args, **kwargs):
  return jitted(model)({'params': params}, *args, **kwargs)


def random_params(model, seed=0):
  """(params, boxed param shapes). Numpy's random params, not model.init: compiling the
  initializers costs more than all the model calls here."""
  boxed = models.param_shapes(model)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype),
                        nn.unbox(boxed))
  return params, boxed


@pytest.fixture(scope='module')
def tiny():
  """(model, params, boxed param shapes): one layer, every head."""
  model = model_of()
  return (model, *random_params(model))


def tokens(b=2, t=10, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def test_heads_shapes_and_dtypes(tiny):
  model, params, _ = tiny
  x = tokens()
  want = {'mlm': (2, 10, V), 'hidden': (2, 10, 32), 'pooled': (2, 32), 'classify': (2, 3)}
  every_head = jax.jit(lambda p, x: {h: model.apply({'params': p}, x, head=h) for h in want})
  outs = every_head(params, x)  # one compile
  assert {h: (o.shape, o.dtype) for h, o in outs.items()} == {
      h: (shape, jnp.float32) for h, shape in want.items()}
  # The pooler reads the first token; the MLM logits are tied to the word embeddings.
  dense = params['pooler']
  np.testing.assert_allclose(outs['pooled'], jnp.tanh(outs['hidden'][:, 0] @ dense['kernel']
                                                      + dense['bias']), atol=1e-5)
  assert 'lm_head' not in params and params['mlm_bias'].shape == (V,)
  # bfloat16 compute: float32 logits, bfloat16 hidden states.
  bf16 = model_of(dtype='bfloat16')
  assert run(bf16, params, x).dtype == jnp.float32


def test_every_param_has_logical_names(tiny):
  _, params, boxed = tiny
  known = {name for name, _ in LOGICAL_RULES}
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert len(leaves) == len(jax.tree.leaves(params)) == 30
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned)
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) - {None} <= known, leaf.names


def test_padding_and_packing_do_not_change_outputs(tiny):
  model, params, _ = tiny
  x = np.asarray(tokens(1, 10))[0]
  hidden = lambda x, seg, pos: run(model, params, jnp.asarray(x), segment_ids_BT=jnp.asarray(seg),
                                   positions_BT=jnp.asarray(pos), head='hidden')
  ar = lambda *ns: sum((list(range(n)) for n in ns), [])
  # Alone: the first 6 tokens; the last 4, padded to 6.
  alone = hidden([x[:6], np.r_[x[6:], 0, 0]], [[1] * 6, [1] * 4 + [0] * 2], [ar(6), ar(6)])
  # Padded, packed (positions restarting), and neither.
  rows = hidden([x] * 3, [[1] * 6 + [0] * 4, [1] * 6 + [2] * 4, [1] * 10], [ar(10), ar(6, 4),
                                                                           ar(10)])
  np.testing.assert_allclose(rows[0, :6], alone[0], atol=1e-5)
  np.testing.assert_allclose(rows[1, :6], alone[0], atol=1e-5)
  np.testing.assert_allclose(rows[1, 6:], alone[1, :4], atol=1e-5)
  assert np.abs(rows[2, :6] - alone[0]).max() > 1e-2  # without a mask the rest leaks in


def test_token_types_and_position_offset(tiny):
  model, params, _ = tiny
  x = tokens(2, 8)
  types = jnp.asarray([[0] * 8, [0] * 4 + [1] * 4])
  plain = run(model, params, x, token_types_BT=types, head='hidden')
  assert np.abs(plain[1] - run(model, params, x, token_types_BT=types[::-1], head='hidden')[1]
                ).max() > 1e-2  # token types matter
  # RoBERTa's pos_offset reads the table from row pos_offset on.
  shifted = model_of(pos_offset=2, type_vocab_size=1)
  sparams = dict(params, pos_embed=jnp.roll(params['pos_embed'], 2, axis=0),
                 type_embed=params['type_embed'][:1])
  np.testing.assert_allclose(run(shifted, sparams, x, head='hidden')[0], plain[0], atol=1e-5)


def test_scan_remat_and_unscanned_agree():
  model = model_of(n_layers=2)
  params, _ = random_params(model)
  scanned = model_of(n_layers=2, scan_layers=True, remat='full')
  stacked = models.relayout(params, True)
  assert jax.tree.map(jnp.shape, nn.unbox(models.param_shapes(scanned))) == \
      jax.tree.map(jnp.shape, stacked)
  x = tokens()

  def loss(p):
    logits = scanned.apply({'params': p}, x, head='classify')
    return logits.sum(), logits
  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(stacked)
  np.testing.assert_allclose(logits, run(model, params, x, head='classify'), atol=1e-5)
  assert grads['layers']['attn']['query']['kernel'].shape == (2, 32, 4, 8)
  assert np.abs(grads['layers']['attn']['query']['kernel']).max() > 0


def test_dropout_only_when_not_deterministic(tiny):
  model, params, _ = tiny
  drop = model_of(embed_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  x = tokens()
  plain, det, noisy = jax.jit(lambda p: (  # one compile
      model.apply(p, x), drop.apply(p, x),
      drop.apply(p, x, deterministic=False, rngs={'dropout': jax.random.key(3)})))(
          {'params': params})
  np.testing.assert_array_equal(det, plain)
  assert np.abs(noisy - det).max() > 1e-2


def test_missing_heads_and_bad_config_raise(tiny):
  bare = model_of(pooler=False, mlm_head=False, num_labels=0)
  names = {p.split('/')[0] for p, _, _ in models.param_table(bare)}
  assert not names & {'pooler', 'mlm_bias', 'mlm_dense', 'classifier'}
  params = {k: v for k, v in tiny[1].items() if k in names}
  x = tokens()
  for head, field in (('mlm', 'model.mlm_head'), ('pooled', 'model.pooler'),
                      ('classify', 'model.num_labels')):
    with pytest.raises(ValueError, match=field):
      bare.apply({'params': params}, x, head=head)
  with pytest.raises(ValueError, match='Unknown encoder head'):
    bare.apply({'params': params}, x, head='lm')
  with pytest.raises(ValueError, match='position table'):
    bare.apply({'params': params}, tokens(1, 21), head='hidden')
  with pytest.raises(ValueError, match='needs the pooler'):
    EncoderConfig(vocab_size=V, pooler=False, num_labels=2)
  with pytest.raises(ValueError, match='max_positions'):
    EncoderConfig(vocab_size=V, max_len=512, max_positions=512, pos_offset=2)
  with pytest.raises(ValueError, match='vocab_size'):
    EncoderConfig(vocab_size=0)


def test_bert_base_param_count_without_allocating():
  from configs import bert_base
  config = bert_base.get_config()
  table = models.param_table(models.get_model(config.model, config.runtime))
  assert sum(n for _, _, n in table) == 109_482_240  # BertModel with its pooler
  assert dict((p, s) for p, s, _ in table)['pos_embed'] == (512, 768)
