"""Beam search: transformers' scoring on hand-made distributions, exhaustive search when the
beams hold every prefix, and the KV cache following the beams in a real model."""
import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config, llama_model
from lm.infer import beam, sampling
from lm.models import get_model, param_shapes

EOS = 0


def table(first, rows):
  """A 'model' whose next-token distribution depends on the last token only: first-step
  probabilities [V] and one row of probabilities [V] per previous token."""
  return jnp.log(jnp.asarray(first, jnp.float32))[None], jnp.log(jnp.asarray(rows, jnp.float32))


@functools.partial(jax.jit, static_argnames=('num_beams', 'max_new_tokens'))
def _run(first_1V, rows_VV, denominators, eos, stopping, *, num_beams, max_new_tokens):
  # The cache records the fed tokens: it must follow the beams as a model's would.
  step = lambda tok_N1, t, cache: (rows_VV[tok_N1[:, 0]], cache.at[:, t].set(tok_N1[:, 0]))
  cache = jnp.full((1, max_new_tokens), -1, jnp.int32)
  if num_beams == 0:  # greedy, as sampling does it
    return sampling._sample_loop(step, first_1V, cache, jax.random.key(0), 0.0, 1.0, eos,
                                 max_new_tokens, 0)
  return beam.search(step, first_1V, cache, 0, denominators, eos, stopping,
                     num_beams=num_beams, max_new_tokens=max_new_tokens)


def search(first_1V, rows_VV, *, num_beams, max_new_tokens, length_penalty=1.0,
           early_stopping=False, eos=EOS):
  """(ids, score) of the best hypothesis; num_beams=0: greedy (ids, sum of log-probs)."""
  tokens, lengths, scores = _run(first_1V, rows_VV,
                                 beam.length_denominators(length_penalty, max_new_tokens),
                                 eos, beam.early_stopping_code(early_stopping),
                                 num_beams=num_beams, max_new_tokens=max_new_tokens)
  ids = np.asarray(tokens)[0, :int(lengths[0])].tolist()
  if eos in ids:
    ids = ids[:ids.index(eos) + 1]
  return ids, float(scores[0])


def test_one_beam_is_greedy():
  rng = np.random.default_rng(0)
  for _ in range(3):
    first, rows = table(rng.dirichlet(np.ones(6) * 0.3), rng.dirichlet(np.ones(6) * 0.3, 6))
    for eos in (EOS, -1):
      greedy, logp = search(first, rows, num_beams=0, max_new_tokens=6, eos=eos)
      for stop in (False, True):
        ids, score = search(first, rows, num_beams=1, max_new_tokens=6, eos=eos,
                            early_stopping=stop)
        assert ids == greedy
        np.testing.assert_allclose(score * len(ids), logp, rtol=1e-6)


def test_beams_find_a_better_sequence_than_greedy():
  # Greedy takes 1 (0.6) into a flat next step; 2 (0.4) leads to a sure token.
  first, rows = table([1e-6, 0.6, 0.4 - 1e-6], [[1 / 3] * 3, [1e-6, 0.55, 0.45 - 1e-6],
                                                  [1e-6, 1e-6, 1 - 2e-6]])
  greedy, greedy_logp = search(first, rows, num_beams=0, max_new_tokens=2, eos=-1)
  best, score = search(first, rows, num_beams=2, max_new_tokens=2, eos=-1, length_penalty=0.0)
  assert greedy == [1, 1] and best == [2, 2]
  np.testing.assert_allclose(score, np.log(0.4 * (1 - 2e-6)), rtol=1e-5)
  assert score > greedy_logp


# After the first token: EOS 0.4 or 1 (0.55); after 1: EOS 0.6 or 2 (0.38); after 2: EOS 0.97.
CRAFTED = table([0.4, 0.55, 0.01, 0.04], [[0.25] * 4, [0.6, 0.01, 0.38, 0.01],
                                          [0.97, 0.01, 0.01, 0.01], [0.1, 0.3, 0.3, 0.3]])
LOGP = {(0,): np.log(0.4), (1, 0): np.log(0.55 * 0.6), (1, 2, 0): np.log(0.55 * 0.38 * 0.97)}


@pytest.mark.parametrize('length_penalty, early_stopping, want', [
    (0.0, False, (0,)),  # no length penalty: the shortest (most likely) wins
    (1.0, False, (1, 2, 0)),  # per-token score: the longest wins, found after 2 hypotheses
    (1.0, True, (1, 0)),  # early_stopping: done at 2 hypotheses
    (1.0, 'never', (1, 2, 0)),
    (2.0, False, (1, 2, 0)),
])
def test_eos_length_penalty_and_early_stopping(length_penalty, early_stopping, want):
  ids, score = search(*CRAFTED, num_beams=2, max_new_tokens=4, length_penalty=length_penalty,
                      early_stopping=early_stopping)
  assert tuple(ids) == want
  np.testing.assert_allclose(score, LOGP[want] / len(want) ** length_penalty, rtol=1e-5)


def test_max_new_tokens_ends_hypotheses_without_eos():
  ids, score = search(*CRAFTED, num_beams=2, max_new_tokens=2, length_penalty=1.0, eos=-1)
  assert ids == [1, 0]  # 0 is an ordinary token here: the best of length 2
  np.testing.assert_allclose(score, np.log(0.55 * 0.6) / 2, rtol=1e-5)


@pytest.mark.parametrize('length_penalty', [0.0, 1.0])
def test_enough_beams_is_exhaustive_search(length_penalty):
  """With a beam for every prefix (and 'never': stop only when nothing can improve),
  beam search returns the best of all sequences under transformers' scoring."""
  rng = np.random.default_rng(1)
  v, n = 4, 4
  first, rows = table(rng.dirichlet(np.ones(v)), rng.dirichlet(np.ones(v), v))
  first_np, rows_np = np.asarray(first), np.asarray(rows)
  ids, score = search(first, rows, num_beams=64, max_new_tokens=n, early_stopping='never',
                      length_penalty=length_penalty)
  best = {}
  for length in range(1, n + 1):
    for seq in itertools.product(range(v), repeat=length):
      if EOS in seq[:-1] or (length < n and seq[-1] != EOS):
        continue  # hypotheses end in EOS or at max_new_tokens
      logp = first_np[0, seq[0]] + sum(rows_np[a, b] for a, b in zip(seq, seq[1:]))
      best[seq] = float(logp) / length ** length_penalty
  want = max(best, key=best.get)
  assert tuple(ids) == want
  np.testing.assert_allclose(score, best[want], rtol=1e-5)


def test_bad_early_stopping_is_named():
  with pytest.raises(ValueError, match="early_stopping must be True, False or 'never'"):
    beam.early_stopping_code('sometimes')


def test_model_beams_rescore_to_their_scores():
  """The cache is gathered by the chosen beams each step: every returned hypothesis, run
  through the model again from scratch, has the score the search gave it (left-padded
  ragged prompts; RoPE positions)."""
  c = base_config()
  c.model.update(llama_model(vocab_size=40, max_len=32, n_layers=2, d_model=32, n_heads=4))
  c.model.update(n_kv_heads=2, d_ff=64)
  model = get_model(c.model)
  rng = np.random.default_rng(2)  # random params without compiling init (slow on CPU)
  params = jax.tree.map(lambda s: rng.normal(0, 0.4, s.shape).astype(np.float32),
                        nn.unbox(param_shapes(model)))
  prompts, n, lp = [[3, 4, 5, 6, 7], [9, 8]], 8, 0.5
  kw = dict(max_new_tokens=n, num_beams=3, length_penalty=lp, return_scores=True)
  free = sampling.generate(model, params, prompts, **kw)[0]
  eos = free[1][2]  # a token the beams produce: a hypothesis ends early
  out, scores = sampling.generate(model, params, prompts, eos_id=eos, **kw)
  assert any(ids[-1] == eos and len(ids) < n for ids in out)
  # Right-padded to one length (causal: padding after a sequence cannot change it).
  seqs = jnp.asarray([p + ids + [0] * (13 - len(p) - len(ids)) for p, ids in zip(prompts, out)])
  logits = jax.jit(model.apply)({'params': params}, seqs)
  greedy_path = True
  for row, (prompt, ids, score) in enumerate(zip(prompts, out, scores)):
    assert ids[-1] == eos or len(ids) == n
    logp = jax.nn.log_softmax(logits[row, len(prompt) - 1:len(prompt) - 1 + len(ids)])
    total = float(jnp.take_along_axis(logp, jnp.asarray(ids)[:, None], axis=1).sum())
    np.testing.assert_allclose(score, total / len(ids) ** lp, rtol=1e-4)
    greedy_path &= ids == jnp.argmax(logp, axis=1).tolist()
  assert not greedy_path  # the beams kept tokens other than the argmax: they were reordered
