"""Beam search over a KV cache, scored exactly as transformers' `generate` (5.x) scores it.

Generic over the model: `search` takes the logits of the first new token and a step
function (tokens_N1, t, cache) -> (logits_NV, cache), where N = batch * num_beams rows
(beams flattened into the batch) and t counts the tokens generated before the fed one.
lm.infer.sampling builds the step for each family (decoder; encoder-decoder with its
cross-attention cache) and runs it inside one jitted function with fixed shapes.

Each step, as transformers' `_beam_search`:
- every beam's log-probs plus its running sum; the best 2 * num_beams continuations;
- a continuation that ends in EOS, or reaches max_new_tokens, is a hypothesis: scored
  sum_logprobs / (generated_length ** length_penalty), the length counting the new tokens
  with EOS (the prompt and the decoder's start token excluded); only continuations among
  the top num_beams may finish, and the best num_beams hypotheses are kept;
- the best num_beams continuations that did not finish run on; the cache follows them
  (a gather on its batch axis);
- a row stops once its best running beam cannot beat the worst kept hypothesis (scored at
  its current length; at max_new_tokens for early_stopping='never' with length_penalty
  > 0) and, with early_stopping=True, once it holds num_beams hypotheses.
The search ends when every row has stopped (or every continuation finished).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG = -1.0e9  # transformers' "impossible" score
EARLY_STOPPING = {False: 0, True: 1, 'never': 2}  # as codes, so one compile serves all three


def early_stopping_code(early_stopping) -> int:
  if isinstance(early_stopping, str) or isinstance(early_stopping, bool):
    if early_stopping in EARLY_STOPPING:
      return EARLY_STOPPING[early_stopping]
  raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}.")


def length_denominators(length_penalty: float, max_new_tokens: int) -> np.ndarray:
  """(n + 1) ** length_penalty for n < max_new_tokens, in float64 rounded to float32 as
  transformers divides float32 scores by a Python float."""
  return np.array([(n + 1) ** length_penalty for n in range(max_new_tokens)]).astype(np.float32)


def cache_batch_axes(make_cache):
  """The batch axis of each cache leaf (None: no batch axis, e.g. a write index), found by
  comparing the shapes of make_cache(1) and make_cache(2) without allocating either."""
  one, two = (jax.eval_shape(lambda b=b: make_cache(b)) for b in (1, 2))

  def axis(a, b):
    diff = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return diff[0] if diff else None
  return jax.tree.map(axis, one, two)


def _take(cache, axes, rows_N):
  return jax.tree.map(lambda x, a: x if a is None else jnp.take(x, rows_N, axis=a), cache, axes)


def _gather(x_BK, idx_BJ):
  """x_BK...[b, idx[b, j]] along axis 1 (transformers' _gather_beams)."""
  idx = idx_BJ.reshape(idx_BJ.shape + (1,) * (x_BK.ndim - 2))
  return jnp.take_along_axis(x_BK, idx, axis=1)


def search(step, logits_BV, cache, batch_axes, denominators_L, eos_id, early_stopping, *,
           num_beams: int, max_new_tokens: int):
  """Beam search from the first new token's logits [B, V] and a cache of B rows.

  Returns (tokens_BL, lengths_B, scores_B): each row's best hypothesis (tokens past its
  length are junk), its length (EOS included) and its length-penalised score.
  eos_id: an int (may be traced); -1 for none. denominators_L: length_denominators(...).
  early_stopping: early_stopping_code(True | False | 'never') (may be traced).
  """
  b, v = logits_BV.shape
  k, c, n_max = num_beams, 2 * num_beams, max_new_tokens
  stop_when_full = early_stopping == EARLY_STOPPING[True]
  # 'never' with length_penalty > 0 bounds a running beam's score at max length.
  best_at_max = (early_stopping == EARLY_STOPPING['never']) & (denominators_L[-1] > 1)
  rep = jnp.arange(b * k) // k  # every row k times: beams of one prompt are neighbours
  cache = _take(cache, batch_axes, rep)
  logp_BKV = jnp.broadcast_to(jax.nn.log_softmax(logits_BV)[:, None], (b, k, v))
  is_top_C = jnp.arange(c) < k
  offset_B1 = (jnp.arange(b) * k)[:, None]

  state = dict(
      t=jnp.int32(0), logp=logp_BKV, cache=cache, go=jnp.bool_(True),
      run_tok=jnp.zeros((b, k, n_max), jnp.int32),
      # Only the first beam is live at the start, so the beams do not repeat each other.
      run_score=jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, NEG), (b, k)).astype(
          jnp.float32),
      fin_tok=jnp.zeros((b, k, n_max), jnp.int32),
      fin_score=jnp.full((b, k), NEG, jnp.float32),
      fin_len=jnp.zeros((b, k), jnp.int32),
      fin_done=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b,), bool))

  def body(s):
    t = s['t']
    # Top 2K continuations over all beams (2K: at least K of them do not end in EOS).
    acc_BKV = s['logp'] + s['run_score'][:, :, None]
    top_BC, idx_BC = jax.lax.top_k(acc_BKV.reshape(b, k * v), c)
    beam_BC, tok_BC = idx_BC // v, (idx_BC % v).astype(jnp.int32)
    cand_BCL = _gather(s['run_tok'], beam_BC).at[:, :, t].set(tok_BC)
    hits_BC = (tok_BC == eos_id) | (t + 1 >= n_max)

    # The best K that go on.
    live_BC = top_BC + hits_BC.astype(jnp.float32) * NEG
    nxt_BK = jax.lax.top_k(live_BC, k)[1]
    run_tok, run_score = _gather(cand_BCL, nxt_BK), _gather(live_BC, nxt_BK)
    src_BK = _gather(beam_BC, nxt_BK)

    # New hypotheses merged with the kept ones; the best K stay.
    just_BC = hits_BC & is_top_C[None, :]
    hyp_BC = top_BC / denominators_L[t]
    full_B = jnp.all(s['fin_done'], axis=1) & stop_when_full
    hyp_BC = hyp_BC + full_B[:, None].astype(jnp.float32) * NEG
    hyp_BC = hyp_BC + (~s['improvable'])[:, None].astype(jnp.float32) * NEG
    hyp_BC = hyp_BC + (~just_BC).astype(jnp.float32) * NEG
    keep_BK = jax.lax.top_k(jnp.concatenate([s['fin_score'], hyp_BC], 1), k)[1]
    cat = lambda a, b: _gather(jnp.concatenate([a, b], 1), keep_BK)
    fin_tok = cat(s['fin_tok'], cand_BCL)
    fin_score = cat(s['fin_score'], hyp_BC)
    fin_len = cat(s['fin_len'], jnp.full((b, c), t + 1, jnp.int32))
    fin_done = cat(s['fin_done'], just_BC)

    # Can the best running beam still beat the worst hypothesis kept?
    best_B = run_score[:, 0] / denominators_L[jnp.where(best_at_max, n_max - 1, t)]
    worst_BK = jnp.where(fin_done, jnp.min(fin_score, axis=1, keepdims=True), NEG)
    improvable = s['improvable'] & jnp.any(best_B[:, None] > worst_BK, axis=1)
    go = (jnp.any(improvable) & ~(jnp.all(fin_done) & stop_when_full) & ~jnp.all(hits_BC))

    # The cache follows the beams that go on; their last tokens are the next input (on
    # the last iteration too: one model call wasted, a simpler loop).
    cache = _take(s['cache'], batch_axes, (src_BK + offset_B1).reshape(-1))
    logits_NV, cache = step(run_tok[:, :, t].reshape(-1, 1), t, cache)
    logp = jax.nn.log_softmax(logits_NV.astype(jnp.float32)).reshape(b, k, v)
    return dict(t=t + 1, logp=logp, cache=cache, go=go, run_tok=run_tok, run_score=run_score,
                fin_tok=fin_tok, fin_score=fin_score, fin_len=fin_len, fin_done=fin_done,
                improvable=improvable)

  s = jax.lax.while_loop(lambda s: s['go'], body, state)
  return s['fin_tok'][:, 0], s['fin_len'][:, 0], s['fin_score'][:, 0]
