"""Decoding with the KV cache: one jitted prefill plus a while_loop over new tokens.

Prompts of different lengths are left-padded (segment id 0, attended by nothing), so
every row decodes at the same cache index and shapes never change: no recompilation
per token. Greedy when temperature == 0; otherwise temperature, top-k and top-p.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import models


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


@functools.partial(jax.jit, static_argnames=('model', 'max_new_tokens', 'top_k'))
def _generate(model, params, tokens_BP, lengths_B, rng, temperature, top_p, eos_id,
              *, max_new_tokens: int, top_k: int):
  b, p = tokens_BP.shape
  cache = models.init_cache(model, b, p + max_new_tokens)
  pad_B = p - lengths_B
  col_P = jnp.arange(p)
  seg_BP = (col_P[None, :] >= pad_B[:, None]).astype(jnp.int32)
  pos_BP = jnp.maximum(col_P[None, :] - pad_B[:, None], 0)
  logits, v = model.apply({'params': params, 'cache': cache}, tokens_BP, positions_BT=pos_BP,
                          segment_ids_BT=seg_BP, decode=True, mutable=('cache',))
  rng, sub = jax.random.split(rng)
  first_B = choose(logits[:, -1], sub, temperature, top_k, top_p)
  out_BN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first_B)
  done_B = first_B == eos_id

  def cond(carry):
    i, _, _, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, out_BN, done_B, rng = carry
    prev_B1 = out_BN[:, i - 1][:, None]
    logits, v = model.apply({'params': params, 'cache': cache}, prev_B1,
                            positions_BT=(lengths_B + i - 1)[:, None],
                            segment_ids_BT=jnp.ones((b, 1), jnp.int32), decode=True,
                            mutable=('cache',))
    rng, sub = jax.random.split(rng)
    next_B = choose(logits[:, -1], sub, temperature, top_k, top_p)
    next_B = jnp.where(done_B, eos_id, next_B)  # finished rows keep emitting EOS
    return i + 1, v['cache'], out_BN.at[:, i].set(next_B), done_B | (next_B == eos_id), rng

  n, _, out_BN, _, _ = jax.lax.while_loop(cond, body, (1, v['cache'], out_BN, done_B, rng))
  return out_BN, n


def generate(model, params, prompts: list[list[int]], *, max_new_tokens: int = 100,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
  """New token ids for each prompt (ids), cut after EOS."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('Every prompt needs at least one token (add a BOS token or some text).')
  cfg = model.cfg
  longest = max(len(p) for p in prompts)
  if top_k < 0 or not 0.0 < top_p <= 1.0 or temperature < 0:
    raise ValueError('Need top_k >= 0, 0 < top_p <= 1 and temperature >= 0.')
  kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, pad_id=pad_id)
  if cfg.pos_embedding == 'learned' and longest + max_new_tokens > cfg.max_len:
    # Learned positions end at max_len: slide the context as nanoGPT does, in chunks of
    # half the context so each chunk still decodes over one KV cache.
    if len(prompts) > 1:
      raise ValueError(f'prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds '
                       f'the model context of {cfg.max_len}; shorten one of them.')
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
  tokens = np.full((len(prompts), longest), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, longest - len(p):] = p
  lengths = np.array([len(p) for p in prompts], np.int32)
  out, n = _generate(model, params, jnp.asarray(tokens), jnp.asarray(lengths),
                     jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.float32(top_p),
                     jnp.int32(-1 if eos_id is None else eos_id),
                     max_new_tokens=max_new_tokens, top_k=min(top_k, cfg.vocab_size))
  out = np.asarray(out)[:, :int(n)]
  result = []
  for row in out.tolist():
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id) + 1]
    result.append(row)
  return result


def sample_text(model, params, tokenizer, prompt: str, **kwargs) -> str:
  """Prompt text -> prompt + continuation text."""
  ids = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None and _wants_bos(tokenizer))
  if not ids:
    ids = [tokenizer.bos_id if tokenizer.bos_id is not None else 0]
  new = generate(model, params, [ids], eos_id=tokenizer.eos_id,
                 pad_id=tokenizer.pad_id or 0, **kwargs)[0]
  if tokenizer.eos_id is not None and new and new[-1] == tokenizer.eos_id:
    new = new[:-1]
  return prompt + tokenizer.decode(new)


def _wants_bos(tokenizer) -> bool:
  return bool(getattr(tokenizer, 'default_add_bos', False))  # e.g. Llama's tokenizer config
