"""Continuous batching: S decode slots over one preallocated KV cache, one background thread.

The decoder's cache has one write index per layer shared by every row, and a segment id
per (row, column) that attention masks by (0: attended by nothing); positions are passed
per row. So rows need not be aligned:
- admitting a request prefills its slot's row alone: the prompt, left-padded to a
  power-of-two bucket Lb, is written into the Lb columns before the shared index c (moved
  up to Lb first if it is below: a gap of segment-0 columns for the running rows). The
  row's old segment ids are zeroed first, so nothing of the slot's last request is seen.
  One compile per bucket, none per request.
- a decode step feeds every slot one token (segment 0 for free slots) at column c.
- when c reaches the C = 2 * max_len columns, every row is rolled left by the smallest
  start column of the running requests (the wrapped columns get segment 0), c -= that.
Sampling is per row (temperature 0 = greedy, top_k, top_p, a seed per request folded with
the token's step), so rows with different settings share one compiled step.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import models
from lm.infer import beam, sampling

TOP = 20  # alternatives kept per token (OpenAI's top_logprobs maximum)


@dataclasses.dataclass
class Sampling:
  max_tokens: int = 16
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False  # for benchmarks: always max_tokens tokens


class Sequence:
  """One generation. emit(event) is called in the engine thread with
  ('token', token_id, text_delta, logprob, top [(id, logprob)]) and finally
  ('done', finish_reason, None, None, None); finish_reason: 'stop' | 'length' | 'cancelled'
  | 'error' (the engine failed)."""

  def __init__(self, prompt: list[int], params: Sampling, emit):
    self.prompt, self.params, self.emit = list(prompt), params, emit
    self.tokens: list[int] = []
    self.text, self.sent = '', 0  # decoded text, and how much of it was emitted
    self.cancelled = False
    self.done = False

  def cancel(self):
    self.cancelled = True


def _name(path) -> str:
  return getattr(path[-1], 'key', '')


def _bucket(n: int, max_len: int) -> int:
  return min(max(8, 1 << (n - 1).bit_length()), max_len)


def choose_rows(logits_SV, temp_S, topk_S, topp_S, seed_S, step_S):
  """Per-row sampling: (tokens [S], their log-probs [S], top log-probs and ids [S, TOP]).
  Log-probs are the model's (before temperature), as in lm.infer.sampling."""
  logits_SV = logits_SV.astype(jnp.float32)
  v = logits_SV.shape[-1]
  logp_SV = jax.nn.log_softmax(logits_SV, axis=-1)
  greedy_S = jnp.argmax(logits_SV, axis=-1).astype(jnp.int32)

  def sample(_):
    scaled_SV = logits_SV / jnp.maximum(temp_S, 1e-6)[:, None]
    desc_SV = -jnp.sort(-scaled_SV, axis=-1)
    k_S = jnp.where(topk_S > 0, jnp.minimum(topk_S, v), v)
    kth_S1 = jnp.take_along_axis(desc_SV, (k_S - 1)[:, None], axis=-1)
    scaled_SV = jnp.where(scaled_SV < kth_S1, jnp.finfo(jnp.float32).min, scaled_SV)
    scaled_SV = sampling.filter_logits(scaled_SV, 0, topp_S[:, None])
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.PRNGKey(s), t))(seed_S, step_S)
    sampled_S = jax.vmap(jax.random.categorical)(keys, scaled_SV)
    return jnp.where(temp_S > 0, sampled_S, greedy_S).astype(jnp.int32)
  # All greedy (the common case for evaluations): no sorting.
  token_S = jax.lax.cond(jnp.any(temp_S > 0), sample, lambda _: greedy_S, None)
  top_lp, top_id = jax.lax.top_k(logp_SV, min(TOP, v))
  return token_S, jnp.take_along_axis(logp_SV, token_S[:, None], axis=-1)[:, 0], top_lp, top_id


class Engine:
  """The batching loop over a decoder's (model, params); submit() Sequences from any thread."""

  def __init__(self, model, params, tokenizer, *, max_batch: int = 8, max_len: int = 0,
               max_queue: int = 64):
    family = getattr(model.cfg, 'family', 'decoder')
    if family != 'decoder':
      raise ValueError(f'A {family} model is not served yet (decoder models are).')
    adapters = model.cfg.kernels.adapters
    if adapters is not None and adapters.method == 'prompt':
      raise ValueError('Prompt-tuned runs are not served yet; merge or export the adapters.')
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.max_len = min(max_len or model.cfg.max_len, model.cfg.max_len)
    self.slots, self.cols, self.max_queue = max_batch, 2 * self.max_len, max_queue
    self.eos_id = tokenizer.eos_id
    self.buckets = sorted({_bucket(1 << i, self.max_len)
                           for i in range(self.max_len.bit_length() + 1)})
    make = lambda n: models.init_cache(model, n, self.cols)
    self._axes = beam.cache_batch_axes(make)
    # Committed as the jitted functions' outputs will be, so warm-up compiles what runs.
    self._cache = jax.device_put(make(max_batch), jax.devices()[0])
    self._c = 0  # the shared write index
    self._prefill = jax.jit(functools.partial(_prefill, model, self._axes), donate_argnums=1)
    self._step = jax.jit(functools.partial(_step, model), donate_argnums=1)
    self._shift = jax.jit(functools.partial(_shift, self._axes), donate_argnums=0)
    self._advance = jax.jit(_advance, donate_argnums=0)
    s = max_batch
    self._seqs: list[Sequence | None] = [None] * s
    self._start = np.zeros(s, np.int64)  # first prompt column of each running request
    self._tok, self._pos = np.zeros(s, np.int32), np.zeros(s, np.int32)
    self._temp, self._topp = np.zeros(s, np.float32), np.ones(s, np.float32)
    self._topk, self._seed, self._n = (np.zeros(s, np.int32) for _ in range(3))
    self._pending: collections.deque[Sequence] = collections.deque()
    self._cv = threading.Condition()
    self._stopping = False
    self._thread = None
    self.steps = self.rolls = self.cancelled = 0  # decode steps, cache shifts, cancellations
    self.error: Exception | None = None

  # -- control (any thread) -------------------------------------------------------------

  def submit(self, seqs: list[Sequence]) -> bool:
    """Queues seqs (all or none); False when the queue has no room for them."""
    for seq in seqs:
      if not seq.prompt or len(seq.prompt) + seq.params.max_tokens > self.max_len:
        raise ValueError(f'prompt ({len(seq.prompt)} tokens) + max_tokens '
                         f'({seq.params.max_tokens}) must be within 1..{self.max_len}.')
    with self._cv:
      if self._stopping or len(self._pending) + len(seqs) > self.max_queue:
        return False
      self._pending.extend(seqs)
      self._cv.notify()
    return True

  @property
  def queue_depth(self) -> int:
    return len(self._pending)

  @property
  def occupancy(self) -> int:
    return sum(s is not None for s in self._seqs)

  def start(self):
    self._thread = threading.Thread(target=self._run, name='lm-serve-engine', daemon=True)
    self._thread.start()

  def stop(self, timeout: float | None = None):
    """Finishes the queued and running requests, then ends the thread."""
    with self._cv:
      self._stopping = True
      self._cv.notify()
    if self._thread is not None:
      self._thread.join(timeout)

  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def warmup(self):
    """Compiles every bucket's prefill, the decode step and the shift (before serving)."""
    for lb in self.buckets:  # the argument types of _admit's calls, or they compile again
      self._cache = self._advance(self._cache, max(self._c, lb))
      self._c = max(self._c, lb)
      self._cache = self._prefill(self.params, self._cache, 0, np.zeros((1, lb), np.int32),
                                  lb - 1, self._c, *_scalars(Sampling()))[-1]
    self._decode()
    self._cache = self._shift(self._cache, self._c)
    self._c = 0
    jax.block_until_ready(self._cache)

  # -- the loop (engine thread) ---------------------------------------------------------

  def _run(self):
    try:
      self._loop()
    except Exception as e:  # noqa: BLE001 -- every waiting request must hear of it
      self.error = e
      with self._cv:
        self._stopping = True
        waiting = list(self._pending) + [s for s in self._seqs if s is not None]
        self._pending.clear()
      for seq in waiting:
        seq.done = True
        seq.emit(('done', 'error', None, None, None))
      raise

  def _loop(self):
    while True:
      with self._cv:
        while not self._pending and not any(self._seqs) and not self._stopping:
          self._cv.wait()
        if self._stopping and not self._pending and not any(self._seqs):
          return
      for i, seq in enumerate(self._seqs):
        if seq is not None and seq.cancelled:
          self._finish(i, 'cancelled')
      self._admit()
      if any(self._seqs):
        self._decode()
        self.steps += 1

  def _admit(self):
    while None in self._seqs:
      with self._cv:
        if not self._pending:
          return
        seq = self._pending.popleft()
      if seq.cancelled:
        seq.done = True
        self.cancelled += 1
        seq.emit(('done', 'cancelled', None, None, None))
        continue
      slot = self._seqs.index(None)
      n, lb = len(seq.prompt), _bucket(len(seq.prompt), self.max_len)
      if self._c >= self.cols:
        self._roll()
      if self._c < lb:
        self._cache, self._c = self._advance(self._cache, lb), lb
      tokens = np.zeros((1, lb), np.int32)
      tokens[0, lb - n:] = seq.prompt
      p = seq.params
      token, lp, top_lp, top_id, self._cache = self._prefill(
          self.params, self._cache, slot, tokens, lb - n, self._c, *_scalars(p))
      self._seqs[slot] = seq
      self._start[slot] = self._c - n
      self._pos[slot], self._tok[slot], self._n[slot] = n, int(token), 1
      self._temp[slot], self._topk[slot], self._topp[slot] = p.temperature, p.top_k, p.top_p
      self._seed[slot] = p.seed & 0x7fffffff
      self._deliver(slot, int(token), float(lp), np.asarray(top_lp), np.asarray(top_id))

  def _decode(self):
    if self._c >= self.cols:
      self._roll()
    active = np.array([s is not None for s in self._seqs])
    token_S, lp_S, top_lp, top_id, self._cache = self._step(
        self.params, self._cache, self._tok, self._pos, active.astype(np.int32), self._temp,
        self._topk, self._topp, self._seed, self._n)
    self._c += 1
    token_S, lp_S = np.asarray(token_S), np.asarray(lp_S)
    top_lp, top_id = np.asarray(top_lp), np.asarray(top_id)
    for i in np.nonzero(active)[0]:
      self._pos[i] += 1
      self._n[i] += 1
      self._tok[i] = token_S[i]
      self._deliver(i, int(token_S[i]), float(lp_S[i]), top_lp[i], top_id[i])

  def _roll(self):
    starts = [self._start[i] for i, s in enumerate(self._seqs) if s is not None]
    m = int(min(starts)) if starts else self._c
    self._cache = self._shift(self._cache, m)
    self._c -= m
    self._start -= m
    self.rolls += 1

  def _deliver(self, slot: int, token: int, logprob: float, top_lp, top_id):
    """Hands a new token to its sequence; frees the slot when the sequence is over."""
    seq = self._seqs[slot]
    if seq.cancelled:
      return self._finish(slot, 'cancelled')
    if token == self.eos_id and not seq.params.ignore_eos:
      return self._finish(slot, 'stop')
    seq.tokens.append(token)
    text = self.tokenizer.decode(seq.tokens)
    reason, end = None, len(text)
    for s in seq.params.stop:  # the earliest stop string ends the text
      at = text.find(s, max(0, seq.sent - len(s)))
      if at >= 0 and at < end:
        reason, end = 'stop', at
    if reason is None:
      if text.endswith('\ufffd'):  # a character whose bytes are still coming
        end = len(text.rstrip('\ufffd'))
      for s in seq.params.stop:  # hold back what may become a stop string
        for k in range(min(len(s) - 1, end), 0, -1):
          if text[:end].endswith(s[:k]):
            end = min(end, len(text[:end]) - k)
            break
    delta = text[seq.sent:end] if end > seq.sent else ''
    seq.sent, seq.text = max(seq.sent, end), text[:end] if reason else text
    seq.emit(('token', token, delta, logprob,
              list(zip(top_id.tolist(), top_lp.tolist()))))
    if reason is None and len(seq.tokens) >= seq.params.max_tokens:
      reason = 'length'
    if reason is not None:
      self._finish(slot, reason)

  def _finish(self, slot: int, reason: str):
    seq = self._seqs[slot]
    self._seqs[slot] = None
    self.cancelled += reason == 'cancelled'
    if len(seq.text) > seq.sent and reason != 'cancelled':  # the held-back tail
      seq.emit(('token', None, seq.text[seq.sent:], None, None))
    seq.done = True
    seq.emit(('done', reason, None, None, None))


def _scalars(p: Sampling):
  """A request's sampling arguments of _prefill (its first token is step 0)."""
  return (np.float32(p.temperature), np.int32(p.top_k), np.float32(p.top_p),
          np.int32(p.seed & 0x7fffffff), np.int32(0))


def _rows(axes, cache, fn):
  return jax.tree_util.tree_map_with_path(lambda p, x, a: fn(_name(p), x, a), cache, axes)


def _prefill(model, axes, params, cache, slot, tokens_1L, pad, c, temp, topk, topp, seed, step):
  """The slot's row alone takes the left-padded prompt into columns [c - Lb, c)."""
  lb = tokens_1L.shape[1]

  def take(name, x, a):
    if a is None:
      return jnp.full_like(x, c - lb) if name == 'index' else x
    row = jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=a)
    return jnp.zeros_like(row) if name == 'segment_ids' else row
  row = _rows(axes, cache, take)
  j_1L = jnp.arange(lb)[None]
  logits, v = model.apply({'params': params, 'cache': row}, tokens_1L,
                          positions_BT=jnp.maximum(j_1L - pad, 0),
                          segment_ids_BT=(j_1L >= pad).astype(jnp.int32), decode=True,
                          mutable=('cache',))
  cache = jax.tree.map(
      lambda x, r, a: x if a is None else jax.lax.dynamic_update_slice_in_dim(x, r, slot, a),
      cache, v['cache'], axes)
  out = choose_rows(logits[:, -1], temp[None], topk[None], topp[None], seed[None], step[None])
  return tuple(o[0] for o in out) + (cache,)


def _step(model, params, cache, tok_S, pos_S, seg_S, temp_S, topk_S, topp_S, seed_S, step_S):
  logits, v = model.apply({'params': params, 'cache': cache}, tok_S[:, None],
                          positions_BT=pos_S[:, None], segment_ids_BT=seg_S[:, None],
                          decode=True, mutable=('cache',))
  return choose_rows(logits[:, -1], temp_S, topk_S, topp_S, seed_S, step_S) + (v['cache'],)


def _shift(axes, cache, m):
  """Every row rolled left by m columns; the wrapped columns are attended by nothing."""
  def roll(name, x, a):
    if a is None:
      return x - m if name == 'index' else x
    x = jnp.roll(x, -m, axis=a + 1)
    if name == 'segment_ids':
      n = x.shape[a + 1]
      keep = (jnp.arange(n) < n - m).reshape((n,) + (1,) * (x.ndim - a - 2))
      x = jnp.where(keep, x, 0)
    return x
  return _rows(axes, cache, roll)


def _advance(cache, c):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, c) if _name(p) == 'index' else x, cache)


def now() -> float:
  return time.perf_counter()
