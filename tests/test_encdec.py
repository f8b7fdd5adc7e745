"""The T5-style encoder-decoder (lm/models/encdec.py): shapes, padding, packing, the decode
cache, scan, dropout and remat, parameter counts. Parity with transformers is in
tests/test_convert_t5.py. Compiles dominate: the checks share shapes to share them."""
import functools
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models
from lm.train import flops
from lm.config import base_config
from lm.models import encdec, get_model, init_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
V = 61


def tiny(**overrides) -> encdec.EncDecConfig:
  fields = dict(vocab_size=V, d_model=24, n_layers=2, n_decoder_layers=2, n_heads=3,
                head_dim=10, d_ff=40, relative_buckets=8, relative_max_distance=12)
  return encdec.EncDecConfig(**dict(fields, **overrides))


def random_params(model, seed=0):
  """Random params of the model's shapes, made in numpy: model.init's compile costs more
  than all the checks here. Relative bias tables are large so that positions matter."""
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if 'scale' in name:  # norms
      return jnp.asarray(1 + 0.1 * rng.standard_normal(s.shape), jnp.float32)
    std = 2.0 if 'relative_bias' in name or "'embed'" in name else s.shape[0] ** -0.5
    return jnp.asarray(std * rng.standard_normal(s.shape), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, nn.unbox(models.param_shapes(model)))


@functools.lru_cache(maxsize=None)
def model_and_params(**overrides):
  model = encdec.EncDec(tiny(**overrides))
  return model, random_params(model)


@functools.lru_cache(maxsize=None)
def jitted(model, method='__call__'):
  return jax.jit(functools.partial(model.apply, method=method),
                 static_argnames=('deterministic', 'decode', 'mutable'))


def ids(shape, seed):
  return np.random.default_rng(seed).integers(1, V, shape).astype(np.int32)


def batch():
  """Four rows of 11 encoder and 5 decoder tokens: 0 two packed documents (6 + 5 encoder,
  3 + 2 decoder tokens); 1 the first alone, padded; 2 the second alone, padded; 3 row 1
  with other ids in its padding. Returns the teacher-forcing arguments."""
  enc, dec, junk_enc, junk_dec = ids(11, 0), ids(5, 1), ids(11, 2), ids(5, 3)
  enc_rows = [enc, np.r_[enc[:6], 0 * junk_enc[:5]], np.r_[enc[6:], 0 * junk_enc[:6]],
              np.r_[enc[:6], junk_enc[:5]]]
  dec_rows = [dec, np.r_[dec[:3], 0, 0], np.r_[dec[3:], 0, 0, 0], np.r_[dec[:3], junk_dec[:2]]]
  enc_seg = [[1] * 6 + [2] * 5, [1] * 6 + [0] * 5, [1] * 5 + [0] * 6, [1] * 6 + [0] * 5]
  dec_seg = [[1, 1, 1, 2, 2], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
  dec_pos = [[0, 1, 2, 0, 1]] + [list(range(5))] * 3
  return tuple(jnp.asarray(np.asarray(x), jnp.int32)
               for x in (enc_rows, dec_rows, enc_seg, dec_seg, dec_pos))


def test_shapes_padding_and_packing():
  model, params = model_and_params()
  args = batch()
  logits = jitted(model)({'params': params}, *args)
  assert logits.shape == (4, 5, V) and logits.dtype == jnp.float32
  assert params['encoder']['relative_bias'].shape == (8, 3) and 'lm_head' not in params
  # Padding (segment 0) changes nothing for the real tokens, whatever its ids.
  np.testing.assert_array_equal(logits[3, :3], logits[1, :3])
  # Packed documents give each one's own logits (positions restart in the decoder).
  np.testing.assert_allclose(logits[0, :3], logits[1, :3], atol=1e-5)
  np.testing.assert_allclose(logits[0, 3:], logits[2, :2], atol=1e-5)
  # The relative position biases reach the logits.
  zeroed = dict(params, encoder=dict(params['encoder'], relative_bias=0 * params['encoder'][
      'relative_bias']), decoder=dict(params['decoder'], relative_bias=0 * params['decoder'][
          'relative_bias']))
  assert np.abs(np.asarray(jitted(model)({'params': zeroed}, *args) - logits)).max() > 1e-2


@pytest.mark.parametrize('scan', [False, True])
def test_decode_steps_equal_teacher_forcing(scan):
  model, params = model_and_params()
  enc, dec, enc_seg, dec_seg, dec_pos = batch()
  # One document a decoder row (decode mode's defaults), its encoder segment 1.
  dec_seg, dec_pos = jnp.ones_like(dec_seg), jnp.broadcast_to(jnp.arange(5), dec_pos.shape)
  want = jitted(model)({'params': params}, enc, dec, enc_seg, dec_seg, dec_pos)
  encoded = jitted(model, 'encode')({'params': params}, enc, enc_seg)
  assert encoded.shape == (4, 11, 24)
  if scan:  # the same params, stacked: the same logits
    model = encdec.EncDec(tiny(scan_layers=True))
    params = models.relayout(params, scanned=True)
  b, t = dec.shape
  cache = init_cache(model, b, t, encoder_len=enc.shape[1])
  step = jitted(model, 'decode')
  # The cross-attention K/V are computed on the call that passes encoded_BSD (unscanned:
  # a 3-token prefix; scanned: the first token) and read from the cache afterwards.
  first = 1 if scan else 3
  logits, upd = step({'params': params, 'cache': cache}, dec[:, :first], encoded, enc_seg,
                     decode=True, mutable=('cache',))
  cache, got = upd['cache'], [logits]
  where = 'layers' if scan else 'layers_0'
  cross = cache['decoder'][where]['cross_attn']['cached_key']
  for i in range(first, t):
    logits, upd = step({'params': params, 'cache': cache}, dec[:, i:i + 1], None,
                       decode=True, mutable=('cache',))
    cache = upd['cache']
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), want, atol=1e-5)
  assert int(cache['decoder']['index']) == t
  np.testing.assert_array_equal(cache['decoder'][where]['cross_attn']['cached_key'], cross)


def test_training_with_dropout_and_remat():
  # Attention dropout only: each dropout site costs compile time (embed and residual
  # dropout are layers.Dropout).
  cfg = tiny(n_layers=1, n_decoder_layers=1, remat='full', attn_dropout=0.1)
  model = encdec.EncDec(cfg)
  params = random_params(model)
  enc, dec = ids((2, 8), 5), ids((2, 4), 6)

  def loss(p, rng):
    logits = model.apply({'params': p}, enc, dec, deterministic=False, rngs={'dropout': rng})
    return jnp.mean(jax.nn.logsumexp(logits, -1)), logits
  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  grads, logits = grad_fn(params, jax.random.key(1))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for stack in ('encoder', 'decoder'):
    assert np.abs(np.asarray(grads[stack]['relative_bias'])).max() > 0
  _, other = grad_fn(params, jax.random.key(2))  # dropout is on: another key, other logits
  assert np.abs(np.asarray(logits - other)).max() > 1e-3


def test_bad_calls_raise_clear_errors():
  model, params = model_and_params()
  with pytest.raises(ValueError, match='encoder_len'):
    init_cache(model, 1, 4)
  with pytest.raises(ValueError, match='encoded_BSD'):
    model.apply({'params': params}, ids((1, 2), 0), None, method='decode')
  with pytest.raises(ValueError, match='model.mlp'):
    tiny(mlp='swiglu')


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('name,count', [('t5_small', 60_506_624), ('t5_base', 222_903_552),
                                        ('t5_v1_1_small', 76_961_152)])
def test_parameter_counts(name, count):
  c = load_config(name)
  model = get_model(c.model, c.runtime)
  rows = models.param_table(model)  # shapes only: nothing allocated
  assert sum(n for _, _, n in rows) == count
  # FLOPs per encoder token: the decoder's 6N share scaled by its tokens per encoder token
  enc, dec = flops.matmul_params(model, 'encoder'), flops.matmul_params(model, 'decoder')
  assert enc + dec == flops.matmul_params(model)
  ratio = c.model.max_target_len / c.model.max_len
  assert flops.flops_per_token(model) > 6 * (enc + ratio * dec)


def test_registered_family_and_example_inputs():
  c = base_config('encdec')
  c.model.vocab_size = V
  model = get_model(c.model, c.runtime)
  assert isinstance(model, encdec.EncDec) and model.cfg.decoder_start_id == 0
  enc, dec = models.example_inputs(model, 2, 16)
  assert enc.shape == (2, 16) and dec.shape == (2, 16)
