"""Decoding with the KV cache: one jitted prefill plus a while_loop over new tokens.

Decoder prompts of different lengths are left-padded (segment id 0, attended by
nothing), so every row decodes at the same cache index and shapes never change: no
recompilation per token. An encoder-decoder encodes its (right-padded) input once and
decodes from cfg.decoder_start_id; the cross-attention keys and values are computed on
the first decode call and read from the cache after it. Greedy when temperature == 0;
otherwise temperature, top-k and top-p; beam search with num_beams > 1 (lm.infer.beam).
An encoder fills masks instead (fill_masks).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import models
from lm.infer import beam


def filter_logits(logits_BV, top_k: int, top_p):
  """Keeps the top_k largest logits and the smallest set with mass >= top_p."""
  neg = jnp.finfo(logits_BV.dtype).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg, logits_BV)
  sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
  cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
  # The smallest logit still inside the nucleus (the top one always is).
  inside_BV = (cum_BV - jax.nn.softmax(sorted_BV, axis=-1)) < top_p
  cutoff_B1 = jnp.min(jnp.where(inside_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits_BV < cutoff_B1, neg, logits_BV)


def choose(logits_BV, rng, temperature, top_k: int, top_p):
  greedy_B = jnp.argmax(logits_BV, axis=-1)
  scaled = filter_logits(logits_BV / jnp.maximum(temperature, 1e-6), top_k, top_p)
  sampled_B = jax.random.categorical(rng, scaled, axis=-1)
  return jnp.where(temperature > 0, sampled_B, greedy_B).astype(jnp.int32)


def _family(model) -> str:
  return getattr(model.cfg, 'family', 'decoder')


def _decoder_start(model, params, tokens_BP, lengths_B, max_new_tokens, rows_per_prompt):
  """Prefills left-padded prompts: (logits of the first new token [B, V], cache, step,
  make_cache). step(tokens_N1, t, cache) feeds generated token t of every row, with the
  prompt's rows repeated rows_per_prompt times (beams)."""
  b, p = tokens_BP.shape
  cache_len = p + max_new_tokens
  pad_B = p - lengths_B
  col_P = jnp.arange(p)
  seg_BP = (col_P[None, :] >= pad_B[:, None]).astype(jnp.int32)
  pos_BP = jnp.maximum(col_P[None, :] - pad_B[:, None], 0)
  cache = models.init_cache(model, b, cache_len)
  adapters = model.cfg.kernels.adapters
  if adapters is not None and adapters.method == 'prompt':  # the soft prompt first
    _, v = model.apply({'params': params, 'cache': cache},
                       jnp.zeros((b, adapters.num_prefix), jnp.int32), decode=True, prime=True,
                       mutable=('cache',))
    cache = v['cache']
  logits, v = model.apply({'params': params, 'cache': cache},
                          tokens_BP, positions_BT=pos_BP, segment_ids_BT=seg_BP, decode=True,
                          mutable=('cache',))
  lengths_N = jnp.repeat(lengths_B, rows_per_prompt)

  def step(tokens_N1, t, cache):
    logits, v = model.apply({'params': params, 'cache': cache}, tokens_N1,
                            positions_BT=(lengths_N + t)[:, None],
                            segment_ids_BT=jnp.ones_like(tokens_N1), decode=True,
                            mutable=('cache',))
    return logits[:, -1], v['cache']
  return logits[:, -1], v['cache'], step, lambda n: models.init_cache(model, n, cache_len)


def _encdec_start(model, params, tokens_BS, lengths_B, max_new_tokens, rows_per_prompt):
  """Encodes right-padded inputs once and feeds the decoder its start token; the first
  decode call stores the cross-attention keys and values in the cache, later ones read
  them there (encoded_BSD=None)."""
  del rows_per_prompt  # every decoder row is at the same position
  b, s = tokens_BS.shape
  cache_len = max_new_tokens + 1  # the start token, then the new ones
  seg_BS = (jnp.arange(s)[None, :] < lengths_B[:, None]).astype(jnp.int32)
  encoded_BSD = model.apply({'params': params}, tokens_BS, seg_BS, method='encode')
  cache = models.init_cache(model, b, cache_len, encoder_len=s)
  start_B1 = jnp.full((b, 1), model.cfg.decoder_start_id, jnp.int32)
  logits, v = model.apply({'params': params, 'cache': cache}, start_B1, encoded_BSD,
                          encoder_segment_ids_BS=seg_BS, decode=True, mutable=('cache',),
                          method='decode')

  def step(tokens_N1, t, cache):
    del t
    logits, v = model.apply({'params': params, 'cache': cache}, tokens_N1, None, decode=True,
                            mutable=('cache',), method='decode')
    return logits[:, -1], v['cache']
  return (logits[:, -1], v['cache'], step,
          lambda n: models.init_cache(model, n, cache_len, encoder_len=s))


def _logprob(logits_BV, tokens_B):
  return jnp.take_along_axis(jax.nn.log_softmax(logits_BV), tokens_B[:, None], axis=1)[:, 0]


def _sample_loop(step, logits_BV, cache, rng, temperature, top_p, eos_id, max_new_tokens, top_k):
  """Greedy or sampled tokens [B, max_new_tokens], how many were made (all rows) and the
  sum of their log-probabilities up to EOS (the model's, before temperature)."""
  b = logits_BV.shape[0]
  rng, sub = jax.random.split(rng)
  first_B = choose(logits_BV, sub, temperature, top_k, top_p)
  out_BN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
  done_B = first_B == eos_id

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, out_BN, done_B, score_B, rng = carry
    logits_BV, cache = step(out_BN[:, i - 1][:, None], i - 1, cache)
    rng, sub = jax.random.split(rng)
    next_B = choose(logits_BV, sub, temperature, top_k, top_p)
    next_B = jnp.where(done_B, eos_id, next_B)  # finished rows keep emitting EOS
    score_B = score_B + jnp.where(done_B, 0.0, _logprob(logits_BV, next_B))
    return i + 1, cache, out_BN.at[:, i].set(next_B), done_B | (next_B == eos_id), score_B, rng

  carry = (1, cache, out_BN, done_B, _logprob(logits_BV, first_B), rng)
  n, _, out_BN, _, score_B, _ = jax.lax.while_loop(cond, body, carry)
  return out_BN, jnp.full((b,), n, jnp.int32), score_B


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'top_k', 'num_beams'))
def _generate(model, params, tokens_BP, lengths_B, rng, temperature, top_p, eos_id,
              denominators_L, early_stopping, *, max_new_tokens: int, top_k: int,
              num_beams: int):
  """(tokens [B, max_new_tokens], lengths [B], scores [B]) of each prompt."""
  start = _encdec_start if _family(model) == 'encdec' else _decoder_start
  logits_BV, cache, step, make_cache = start(model, params, tokens_BP, lengths_B,
                                             max_new_tokens, num_beams)
  if num_beams == 1:
    return _sample_loop(step, logits_BV, cache, rng, temperature, top_p, eos_id,
                        max_new_tokens, top_k)
  return beam.search(step, logits_BV, cache, beam.cache_batch_axes(make_cache), denominators_L,
                     eos_id, early_stopping, num_beams=num_beams, max_new_tokens=max_new_tokens)


def generate(model, params, prompts: list[list[int]], *, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False,
             return_scores: bool = False, pad_to: int = 0):
  """New token ids for each prompt (ids), cut after EOS; for an encoder-decoder the
  prompt is the encoder's input and the ids exclude the decoder's start token.

  num_beams > 1: beam search (lm.infer.beam; temperature, top_k and top_p unused), with
  length_penalty and early_stopping (True | False | 'never') as transformers' generate.
  return_scores: (ids, scores): a beam's score is transformers' sequences_scores (sum of
  log-probs / length ** length_penalty); otherwise the sum of the ids' log-probs.
  pad_to: pad the prompts to at least this many tokens (fixed shapes over many calls: one
  compile per length bucket, lm/eval/harness.py).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('Every prompt needs at least one token (add a BOS token or some text).')
  family = _family(model)
  if family not in ('decoder', 'encdec'):
    raise ValueError(f'A {family} model does not generate text; it fills masks '
                     '(lm.infer.sampling.fill_masks).')
  cfg = model.cfg
  longest = max(len(p) for p in prompts)
  if top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError('Need top_k >= 0, 0 < top_p <= 1 and temperature >= 0.')
  if num_beams < 1 or max_new_tokens < 1:
    raise ValueError('Need num_beams >= 1 and max_new_tokens >= 1.')
  stopping = beam.early_stopping_code(early_stopping)
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
  if (family == 'decoder' and cfg.pos_embedding == 'learned'
      and longest + max_new_tokens > cfg.max_len):
    if num_beams > 1 or len(prompts) > 1 or return_scores:
      raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
                       f'the model context of {cfg.max_len}; shorten one of them.')
    # Learned positions end at max_len: slide the context as nanoGPT does, in chunks of
    # half the context so each chunk still decodes over one KV cache.
    seq, new, chunk = list(prompts[0]), [], cfg.max_len // 2
    while len(new) < max_new_tokens:
      room = cfg.max_len - len(seq)  # use the whole prompt while it still fits
      n = min(room if room > 0 else chunk, max_new_tokens - len(new))
      out = generate(model, params, [seq[-(cfg.max_len - n):]], max_new_tokens=n,
                     seed=seed + len(new), **kw)[0]
      seq, new = seq + out, new + out
      if eos_id is not None and eos_id in out:
        return [new[:new.index(eos_id) + 1]]
    return [new]
  longest = max(longest, pad_to)
  tokens = np.full((len(prompts), longest), pad_id, np.int32)
  for i, p in enumerate(prompts):
    if family == 'decoder':
      tokens[i, longest - len(p):] = p  # left-padded: every row decodes at one cache index
    else:
      tokens[i, :len(p)] = p  # the encoder sees all of its input at once
  lengths = np.array([len(p) for p in prompts], np.int32)
  out, n, scores = _generate(
      model, params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed),
      jnp.float32(temperature), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id),
      beam.length_denominators(length_penalty, max_new_tokens), jnp.int32(stopping),
      max_new_tokens=max_new_tokens, top_k=min(top_k, cfg.vocab_size), num_beams=num_beams)
  result = []
  for row, length in zip(np.asarray(out).tolist(), np.asarray(n).tolist()):
    row = row[:length]
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    result.append(row)
  return (result, np.asarray(scores).tolist()) if return_scores else result


def encode_prompt(tokenizer, prompt: str, family: str = 'decoder') -> list[int]:
  """Prompt ids: BOS as the tokenizer config says (a decoder's prompt), EOS likewise for
  an encoder-decoder's input (T5 ends its inputs with EOS); never empty."""
  if family == 'decoder':
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None and _wants_bos(tokenizer))
  else:
    ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None and _wants_bos(tokenizer),
                           add_eos=tokenizer.eos_id is not None and
                           bool(getattr(tokenizer, 'default_add_eos', False)))
  return ids or [tokenizer.bos_id if tokenizer.bos_id is not None else 0]


def sample_text(model, params, tokenizer, prompt: str, **kwargs) -> str:
  """Prompt text -> prompt + continuation text (a decoder), or the output text (an
  encoder-decoder, whose prompt is its input)."""
  family = _family(model)
  new = generate(model, params, [encode_prompt(tokenizer, prompt, family)],
                 eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id or 0, **kwargs)[0]
  if tokenizer.eos_id is not None and new and new[-1] == tokenizer.eos_id:
    new = new[:-1]
  return (prompt if family == 'decoder' else '') + tokenizer.decode(new)


@functools.partial(jax.jit, static_argnames='model')
def _mlm_argmax(model, params, tokens_BT, segments_BT):
  logits_BTV = model.apply({'params': params}, tokens_BT, segment_ids_BT=segments_BT, head='mlm')
  return jnp.argmax(logits_BTV, axis=-1)


def fill_masks(model, params, prompts: list[list[int]], mask_id: int,
               pad_id: int = 0) -> list[list[int]]:
  """An encoder's MLM argmax at each mask_id position of each prompt (ids), in order."""
  longest = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), longest), pad_id, np.int32)
  segments = np.zeros_like(tokens)  # padding: segment 0, attended by nothing
  for i, p in enumerate(prompts):
    tokens[i, :len(p)], segments[i, :len(p)] = p, 1
  best_BT = np.asarray(_mlm_argmax(model, params, jnp.asarray(tokens), jnp.asarray(segments)))
  return [[int(best_BT[i, j]) for j, t in enumerate(p) if t == mask_id]
          for i, p in enumerate(prompts)]


def _wants_bos(tokenizer) -> bool:
  return bool(getattr(tokenizer, 'default_add_bos', False))  # e.g. Llama's tokenizer config
