"""Sampling: cached greedy equals recomputation; batches, filters, EOS; sample.py."""
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lm.config import base_config, gpt2_model, llama_model
from lm.infer import sampling
from lm.models import get_model, init_params

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
