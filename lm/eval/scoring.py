"""Per-token log-probabilities of given token ids under a model (scripts/score.py, evals).

Sequences are right-padded to a shared bucketed length, which a causal model never
sees from earlier positions, so one compiled forward serves many lengths.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=('model',))
def _logprobs(model, params, tokens_BT):
  logits_BTV = model.apply({'params': params}, tokens_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


def bucket(n: int, limit: int) -> int:
  """A padded length for n tokens: a power of two from 16, at most `limit` (unless n is
  longer): one compile per bucket."""
  return min(max(16, 1 << (n - 1).bit_length()), max(limit, n))


def score(model, params, sequences: list[list[int]]) -> list[dict]:
  """For each sequence: token_ids, token_logprobs (None for the first token, which has
  no context; then log p(token_t | tokens_<t)) and total_logprob (their sum)."""
  cfg = model.cfg
  for ids in sequences:
    if not ids:
      raise ValueError('Nothing to score: the token sequence is empty.')
    bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
    if bad:
      raise ValueError(f'Token ids {bad[:5]} are outside the model\'s vocabulary '
                       f'[0, {cfg.vocab_size}).')
    if cfg.pos_embedding == 'learned' and len(ids) > cfg.max_len:
      raise ValueError(f'{len(ids)} tokens exceed the model\'s context of {cfg.max_len} '
                       '(model.max_len, learned positions); score a shorter text.')
  length = bucket(max(map(len, sequences)), cfg.max_len)
  tokens = np.zeros((len(sequences), length), np.int32)
  for row, ids in zip(tokens, sequences):
    row[:len(ids)] = ids
  logp = np.asarray(_logprobs(model, params, jnp.asarray(tokens)), np.float64)
  out = []
  for row, ids in zip(logp, sequences):
    lp = row[:len(ids) - 1]
    out.append(dict(token_ids=list(map(int, ids)), token_logprobs=[None] + lp.tolist(),
                    total_logprob=float(lp.sum())))
  return out
