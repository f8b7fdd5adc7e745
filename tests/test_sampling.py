"""Sampling: cached greedy equals recomputation; batches, filters, EOS; loading runs; scripts."""
import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config, gpt2_model, llama_model
from lm.data import ByteTokenizer
from lm.eval import scoring
from lm.infer import sampling
from lm.infer.load import load_run
from lm.models import get_model, init_params, param_shapes
from lm.ops import backend
from lm.ops.backend import Kernels
from lm.train import checkpoint, partitioning

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)  # init compiles for ~5 s on CPU: once per style
def model_and_params(style='llama'):
  c = base_config()
  preset = llama_model if style == 'llama' else gpt2_model
  c.model.update(preset(vocab_size=50, max_len=48, n_layers=2, d_model=64, n_heads=4))
  if style == 'llama':
    c.model.update(n_kv_heads=2, d_ff=96)
  model = get_model(c.model)
  params = nn.unbox(init_params(model, jax.random.key(0)))
  return model, jax.tree.map(lambda x: 3 * x, params)  # peakier distributions


def greedy_by_recomputation(model, params, prompt, n):
  apply = jax.jit(model.apply)
  seq = list(prompt)
  for _ in range(n):  # right-padded to one shape: causal, so padding cannot matter
    padded = jnp.array([seq + [0] * (model.cfg.max_len - len(seq))])
    seq.append(int(jnp.argmax(apply({'params': params}, padded)[0, len(seq) - 1])))
  return seq[len(prompt):]


@pytest.mark.parametrize('style', ['llama', 'gpt2'])
def test_cached_greedy_equals_recomputation_for_a_ragged_batch(style):
  model, params = model_and_params(style)
  prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4]]
  out = sampling.generate(model, params, prompts, max_new_tokens=12, temperature=0.0)
  for prompt, got in zip(prompts, out):
    assert got == greedy_by_recomputation(model, params, prompt, 12)


def test_top_k_1_is_greedy_and_seeds_matter():
  model, params = model_and_params()
  prompts = [[1, 2, 3]]
  greedy = sampling.generate(model, params, prompts, max_new_tokens=10, temperature=0.0)
  top1 = sampling.generate(model, params, prompts, max_new_tokens=10, temperature=1.0, top_k=1)
  assert greedy == top1
  a = sampling.generate(model, params, prompts, max_new_tokens=10, temperature=1.5, seed=0)
  b = sampling.generate(model, params, prompts, max_new_tokens=10, temperature=1.5, seed=1)
  c = sampling.generate(model, params, prompts, max_new_tokens=10, temperature=1.5, seed=0)
  assert a == c and a != b


def test_filters_keep_the_right_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  neg = jnp.finfo(jnp.float32).min
  kept = lambda k, p: (sampling.filter_logits(logits, k, p) > neg).tolist()[0]
  assert kept(2, 1.0) == [True, True, False, False]
  assert kept(0, 0.7) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
  assert kept(0, 0.5) == [True, False, False, False]
  assert kept(0, 1.0) == [True, True, True, True]


def test_stops_at_eos():
  model, params = model_and_params()
  free = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=10, temperature=0.0)[0]
  eos = free[3]
  out = sampling.generate(model, params, [[1, 2, 3]], max_new_tokens=10, temperature=0.0,
                          eos_id=eos)[0]
  assert out == free[:free.index(eos) + 1]


def test_learned_positions_slide_past_the_context():
  model, params = model_and_params('gpt2')
  out = sampling.generate(model, params, [[1] * 40], max_new_tokens=30, temperature=0.0)[0]
  assert len(out) == 30
  # Until the context is full (8 tokens here) it is exact greedy decoding.
  assert out[:8] == greedy_by_recomputation(model, params, [1] * 40, 8)
  with pytest.raises(ValueError, match='context'):
    sampling.generate(model, params, [[1] * 40, [2]], max_new_tokens=20)


def test_sample_script_bad_workdir(tmp_path):
  out = subprocess.run([sys.executable, 'scripts/sample.py', f'--workdir={tmp_path}/nothing',
                        '--prompt=hi'], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0
  assert 'not an lm run directory' in out.stderr


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  """(workdir, params) of a params-only run: a tiny LLaMA over bytes, saved at step 3."""
  c = base_config()
  c.model.update(llama_model(vocab_size=260, max_len=32, n_layers=2, d_model=64, n_heads=4))
  c.model.update(n_kv_heads=2, d_ff=96)
  c.data.tokenizer = 'bytes'
  params = nn.unbox(init_params(get_model(c.model), jax.random.key(1)))
  workdir = tmp_path_factory.mktemp('run')
  checkpoint.save_inference_run(workdir, params, c, ByteTokenizer(), step=3)
  return workdir, params


def test_load_run_on_one_device_and_on_a_mesh(saved_run):
  workdir, saved = saved_run
  model, params, config, tokenizer = load_run(workdir)
  # The seam's kernels for one device; otherwise the model the config describes.
  assert model.cfg.kernels == backend.select(config.runtime, partitioning.make_mesh(
      dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]))
  assert dataclasses.replace(model.cfg, kernels=Kernels()) == get_model(config.model).cfg
  assert config.model.vocab_size == 260
  assert type(tokenizer) is ByteTokenizer
  device = jax.devices()[0]
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(saved), strict=True):
    assert got.sharding.device_set == {device}
    np.testing.assert_array_equal(got, want)

  mesh = partitioning.make_mesh(dict(data=1, fsdp=2, tensor=4))
  mesh_model, sharded, _, _ = load_run(workdir, mesh=mesh, step=3)
  assert not mesh_model.cfg.kernels.cpu_ops  # no C++ kernels on a mesh
  want = partitioning.logical_shardings(param_shapes(model), mesh)
  specs = set()
  for got, saved_leaf, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(saved),
                                       jax.tree.leaves(nn.unbox(want)), strict=True):
    assert got.sharding.is_equivalent_to(sharding, got.ndim)
    np.testing.assert_array_equal(got, saved_leaf)
    specs.add(tuple(got.sharding.spec))
  assert ('tensor', 'fsdp') in specs  # the embedding: vocab over tensor, embed over fsdp
  seqs = [[1, 2, 3, 4, 5], [7, 8]]
  for a, b in zip(scoring.score(mesh_model, sharded, seqs), scoring.score(model, params, seqs)):
    np.testing.assert_allclose(a['token_logprobs'][1:], b['token_logprobs'][1:], atol=1e-5)
  with pytest.raises(FileNotFoundError, match='not an lm run directory'):
    load_run(workdir / 'nothing_here')
  checkpoint.write_run_files(workdir / 'empty', config, tokenizer)  # no checkpoints
  with pytest.raises(FileNotFoundError, match='No checkpoint under'):
    load_run(workdir / 'empty')


def test_sample_and_score_scripts_on_a_saved_run(saved_run):
  workdir, saved = saved_run
  model = get_model(checkpoint.read_config(workdir).model)
  env = dict(os.environ, PYTHONIOENCODING='utf-8')
  out = subprocess.run([sys.executable, 'scripts/sample.py', f'--workdir={workdir}',
                        '--prompt=ab', '--max_new_tokens=4', '--temperature=0'],
                       cwd=ROOT, capture_output=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:].decode()
  want = sampling.sample_text(model, saved, ByteTokenizer(), 'ab', max_new_tokens=4,
                              temperature=0.0)
  assert out.stdout.decode() == want + '\n'
  out = subprocess.run([sys.executable, 'scripts/score.py', f'--workdir={workdir}',
                        '--ids=97,98,99', '--step=3'],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  got = json.loads(out.stdout)
  want = scoring.score(model, saved, [[97, 98, 99]])[0]
  assert got['token_ids'] == [97, 98, 99] and got['token_logprobs'][0] is None
  np.testing.assert_allclose(got['token_logprobs'][1:], want['token_logprobs'][1:], atol=1e-5)


def test_fill_masks_with_an_encoder():
  """An encoder fills each mask with its MLM argmax; ragged prompts pad without changing
  the fills. An encoder does not generate."""
  c = base_config('encoder')
  c.model.update(vocab_size=30, max_len=16, max_positions=16, d_model=32, n_layers=1, n_heads=4)
  model = get_model(c.model)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32),
                        nn.unbox(param_shapes(model)))
  mask = 4
  prompts = [[1, 7, mask, 9, mask, 2], [1, mask, 3]]
  fills = sampling.fill_masks(model, params, prompts, mask)
  logits = jax.jit(model.apply, static_argnames='head')(
      {'params': params}, jnp.asarray([prompts[0]]), head='mlm')[0]
  assert fills[0] == [int(jnp.argmax(logits[2])), int(jnp.argmax(logits[4]))]
  assert len(fills[1]) == 1
  assert sampling.fill_masks(model, params, prompts[1:], mask) == fills[1:]
  with pytest.raises(ValueError, match='fill_masks'):
    sampling.generate(model, params, prompts, max_new_tokens=2)


def test_bad_beam_settings_are_named():
  c = base_config()
  c.model.update(gpt2_model(vocab_size=50, max_len=48, n_layers=1, d_model=32, n_heads=4))
  model = get_model(c.model)  # checked before the params are used: none needed
  with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
    sampling.generate(model, None, [[1, 2]], num_beams=2, early_stopping='soon')
  with pytest.raises(ValueError, match='num_beams >= 1'):
    sampling.generate(model, None, [[1, 2]], num_beams=0)
  with pytest.raises(ValueError, match='context'):  # beams do not slide past the context
    sampling.generate(model, None, [[1] * 40], max_new_tokens=20, num_beams=2)
