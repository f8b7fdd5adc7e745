"""Post-training quantization (lm/compress/quantize.py, scripts/quantize.py): formats worked
by hand, the quantized model equal to the float model on the dequantized kernels, runs
written and loaded, bad input refused with nothing written."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.compress import quantize
from lm.config import base_config
from lm.infer.load import build_model, load_run
from lm.train import checkpoint, trainer


def q_of(method, **kw):
  return quantize.Quant(method=method, **kw)


def test_int8_per_channel_by_hand():
  w = np.array([[1.0, -0.5], [-2.54, 0.25], [0.5, 0.1]], np.float32)  # [K=3, N=2]
  p = quantize.quantize(w, 1, q_of('int8'))
  np.testing.assert_allclose(p['q_scale'], [2.54 / 127, 0.5 / 127], rtol=1e-6)
  # column 0: 1 / 0.02 = 50, -127, 25; column 1: -127, 63.5 -> 64 (half away), 25.4 -> 25
  assert p['q_codes'].tolist() == [[50, -127], [-127, 64], [25, 25]]
  back = quantize.dequantize(p, w.shape, 1, q_of('int8'))
  assert np.abs(back - w).max() <= 0.5 * 2.54 / 127 + 1e-7
  pa = quantize.quantize(w, 1, q_of('int8', asymmetric=True))  # w = codes * scale + min
  np.testing.assert_allclose(pa['q_zero'], [-2.54, -0.5])
  np.testing.assert_allclose(pa['q_scale'], [3.54 / 255, 0.75 / 255], rtol=1e-6)
  assert pa['q_codes'].dtype == jnp.uint8 and pa['q_codes'][1, 0] == 0
  back = quantize.dequantize(pa, w.shape, 1, q_of('int8', asymmetric=True))
  assert np.abs(back - w).max() <= 0.5 * 3.54 / 255 + 1e-6


def test_int4_groups_and_nibble_order_by_hand():
  q = q_of('int4', group_size=4)
  w = np.array([7, -7, 3.5, 0, 1, 2, 3, 4], np.float32)[:, None]  # K=8: two groups, N=1
  p = quantize.quantize(w, 1, q)
  np.testing.assert_allclose(p['q_scale'][:, 0], [1.0, 4 / 7], rtol=1e-6)
  # group 0 codes 7, -7, 4 (3.5 rounds half to even), 0; stored + 8: 15, 1, 12, 8;
  # bytes: low nibble the even input: 15 | 1 << 4 = 31, 12 | 8 << 4 = 140
  assert p['q_codes'][0, :, 0].tolist() == [31, 140]
  back = np.asarray(quantize.dequantize(p, w.shape, 1, q))[:, 0]
  np.testing.assert_allclose(back[:4], [7, -7, 4, 0])
  assert np.abs(back[4:] - w[4:, 0]).max() <= 0.5 * 4 / 7 + 1e-6
  with pytest.raises(ValueError, match='does not divide the 8 inputs'):
    quantize.param_shapes((8, 1), 1, q_of('int4', group_size=16))


def tiny_config(**quant):
  c = base_config()
  c.model.update(vocab_size=64, max_len=16, d_model=64, n_layers=2, n_heads=4)
  c.quant.update(quant)
  return c


@pytest.mark.parametrize('quant', [dict(method='int8'),  # (int8 asymmetric: by hand above)
                                   dict(method='int4', group_size=32),
                                   dict(method='int4', group_size=64, asymmetric=True),
                                   dict(method='nf4'),
                                   dict(method='int8', targets='mlp')])
def test_quantized_model_equals_float_model_on_dequantized_kernels(quant):
  from lm import models
  float_model = build_model(tiny_config())
  rng = np.random.default_rng(0)  # numpy's random params: compiling init costs more
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype),
                        flax.linen.unbox(models.param_shapes(float_model)))
  c = tiny_config(**quant)
  model = build_model(c)
  q = quantize.from_config(c.quant)
  abstract = flax.linen.unbox(models.param_shapes(model))
  qparams = quantize.quantize_params(params, abstract, q)
  flat, qflat = quantize._flat(params), quantize._flat(qparams)
  quantized = sorted({k.rsplit('/', 1)[0] for k in qflat if k.endswith('codes')})
  assert quantized and all(('mlp' in m) for m in quantized) == (quant.get('targets') == 'mlp')
  deq = dict(flat)
  from lm.ops import nf4
  for mod in quantized:  # the float model on the dequantized kernels, computed here
    kernel = flat[f'{mod}/kernel']
    if q.method == 'nf4':
      deq[f'{mod}/kernel'] = nf4.dequantize(
          {n: qflat[f'{mod}/nf4_{n}'] for n in nf4.NAMES}, kernel.shape)
    else:
      in_dims = kernel.ndim - qflat[f'{mod}/q_scale'].ndim + (q.method == 'int4')
      deq[f'{mod}/kernel'] = quantize.dequantize(
          {n: qflat[f'{mod}/{n}'] for n in quantize.NAMES if f'{mod}/{n}' in qflat},
          kernel.shape, in_dims, q)
    # within half the widest step between levels (NF4's: (1 - 0.72) / 2 of a block's max)
    assert np.abs(deq[f'{mod}/kernel'] - kernel).max() < 0.15 * np.abs(kernel).max()
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
  want = float_model.apply({'params': flax.traverse_util.unflatten_dict(deq, sep='/')}, tokens)
  got = model.apply({'params': qparams}, tokens)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert quantize.nbytes(qparams) < quantize.nbytes(params)


def test_quantize_run_writes_a_loadable_smaller_run_and_refuses_bad_input(tmp_path):
  from test_convert_hf import imported
  workdir, config, params, tokenizer = imported('gpt2')  # d_model 64
  ids = jnp.asarray([[1, 5, 9, 33, 2, 7]])
  want = build_model(config).apply({'params': params}, ids)
  sizes, errors = {}, {}
  for method, kw in [('int8', {}), ('int4', dict(group_size=32))]:  # (nf4: the test above)
    out = tmp_path / method
    report = quantize.quantize_run(workdir, out, method, **kw)
    sizes[method] = report['quantized_bytes']
    assert report['quantized_kernels'] == 12  # 2 layers x q, k, v, out, wi, wo
    assert report['params_bytes'] == quantize.nbytes(params)
    assert report['checkpoint_bytes'] < 1.2 * report['quantized_bytes'] + 50_000
    model, qparams, qconfig, _ = load_run(out)
    assert qconfig.quant.method == method
    got = model.apply({'params': qparams}, ids)
    errors[method] = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  # (random weights: no outliers to spare, so 4 bits cost more here than on a trained model)
  assert errors['int8'] < 0.02 < errors['int4'] < 0.5, errors
  # (the float embedding, 400 x 64, is a large part of this tiny model)
  assert sizes['int4'] < sizes['int8'] < 0.6 * quantize.nbytes(params)
  # Bad input: one clear error each, nothing written.
  for args, kw, match in [((tmp_path / 'int8', tmp_path / 'x1', 'int8'), {}, 'quantized already'),
                          ((workdir, tmp_path / 'x2', 'int4'), dict(group_size=48),
                           'does not divide'),
                          ((workdir, tmp_path / 'int8', 'int8'), {}, 'not empty')]:
    with pytest.raises(ValueError, match=match):
      quantize.quantize_run(*args, **kw)
  assert not (tmp_path / 'x1').exists() and not (tmp_path / 'x2').exists()
  with pytest.raises(ValueError, match='for inference'):
    trainer.build(checkpoint.read_config(tmp_path / 'int8'))
  c = tiny_config()
  c.init_from = str(tmp_path / 'int8')
  with pytest.raises(ValueError, match='is a quantized run'):
    trainer.init_source(c)


def test_w8a8_runs_int8_matmuls_close_to_the_int8_weights_model():
  from lm import models
  rng = np.random.default_rng(0)
  base = build_model(tiny_config(method='int8'))
  w8a8 = build_model(tiny_config(method='int8', activations='int8'))
  abstract = flax.linen.unbox(models.param_shapes(base))
  assert flax.linen.unbox(models.param_shapes(w8a8)) == abstract  # the same checkpoint
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), s.dtype),
                        flax.linen.unbox(models.param_shapes(build_model(tiny_config()))))
  qparams = quantize.quantize_params(params, abstract, quantize.from_config(
      tiny_config(method='int8').quant))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 64)
  want = base.apply({'params': qparams}, tokens)
  got = w8a8.apply({'params': qparams}, tokens)
  assert float(jnp.abs(got - want).max() / jnp.abs(want).max()) < 0.02
  jaxpr = str(jax.make_jaxpr(lambda p: w8a8.apply({'params': p}, tokens))(qparams))
  assert 'preferred_element_type=int32' in jaxpr and 'i8[' in jaxpr
  with pytest.raises(ValueError, match='symmetric int8 weights'):
    quantize.from_config(tiny_config(method='int4', activations='int8').quant)
