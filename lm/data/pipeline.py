"""Grain input pipeline: documents -> tokens -> packed rows -> shuffled, sharded batches.

Every batch is a dict of numpy arrays, B = the process's share of
config.train.batch_size, T = config.model.max_len:
  inputs      int32 [B, T]
  targets     int32 [B, T]  the next token of each input
  segment_ids int32 [B, T]  1, 2, ... per document in the row; 0 is padding
  positions   int32 [B, T]  restart at 0 at each document (and at each row)
  weights     float32 [B, T]  0 on padding and where the target is in another document

Packing concatenates the split's documents (tokenized once and cached, see
sources.load_tokens) and cuts the stream into rows of T+1 tokens that overlap
by one: inputs are a row's first T tokens, targets its last T. So every token
but the first of each document is a target exactly once, rows are full except
the very last, and building a batch is a few vectorised numpy gathers. A
document longer than a row continues in another row, as nanoGPT's windows do.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import grain
import numpy as np

from lm.data import sources
from lm.data.tokenizers import build_tokenizer

Batch = dict[str, np.ndarray]
# Hooks for objectives: per document before packing (deterministic), or per
# packed batch with a Generator seeded by (seed, process, batch index) so a
# restored iterator repeats it exactly.
DocTransform = Callable[[np.ndarray], np.ndarray]
BatchTransform = Callable[[Batch, np.random.Generator], Batch]


@dataclasses.dataclass
class PackedRows:
  """A split's token stream seen as rows of T+1 tokens overlapping by one."""
  tokens: np.ndarray  # [N] all documents back to back
  offsets: np.ndarray  # [D+1] document i is tokens[offsets[i]:offsets[i+1]]
  seq_len: int  # T
  pad_id: int = 0

  def __len__(self) -> int:
    return max(0, -(-(len(self.tokens) - 1) // self.seq_len))

  def stats(self) -> dict:
    """Token accounting: `kept` is the fraction of tokens that are trained-on targets."""
    n, docs = len(self.tokens), len(self.offsets) - 1
    return dict(tokens=n, documents=docs, rows=len(self), kept=(n - docs) / max(n, 1),
                fill=(n - 1) / max(len(self) * self.seq_len, 1))

  def batch(self, rows_B) -> Batch:
    """The packed rows `rows_B` (ids outside [0, len) give all-padding rows)."""
    T, n = self.seq_len, len(self.tokens)
    rows_B = np.asarray(rows_B, np.int64)
    idx_BS = rows_B[:, None] * T + np.arange(T + 1)  # S = T + 1
    valid_BS = (idx_BS < n) & ((rows_B >= 0) & (rows_B < len(self)))[:, None]
    idx_BS = np.where(valid_BS, idx_BS, 0)
    tokens_BS = np.where(valid_BS, self.tokens[idx_BS], self.pad_id).astype(np.int32)
    doc_BS = np.searchsorted(self.offsets, idx_BS, side='right') - 1
    seg_BS = np.where(valid_BS, doc_BS - doc_BS[:, :1] + 1, 0)
    pos_BS = idx_BS - self.offsets[doc_BS]
    pos_BS = np.where(seg_BS == 1, pos_BS - pos_BS[:, :1], pos_BS) * valid_BS
    seg_BT = seg_BS[:, :-1]
    return dict(
        inputs=tokens_BS[:, :-1], targets=tokens_BS[:, 1:],
        segment_ids=seg_BT.astype(np.int32), positions=pos_BS[:, :-1].astype(np.int32),
        weights=((seg_BT > 0) & (seg_BS[:, 1:] == seg_BT)).astype(np.float32))


def pack(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, pad_id: int = 0,
         doc_transform: DocTransform | None = None) -> PackedRows:
  if doc_transform is not None:
    docs = [doc_transform(np.asarray(tokens[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    docs = [np.asarray(d, np.int32) for d in docs if len(d)]
    tokens = np.concatenate(docs) if docs else np.zeros([0], np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs], dtype=np.int64)])
  return PackedRows(tokens, np.asarray(offsets, np.int64), seq_len, pad_id)


def load_rows(config, tokenizer, split: str, doc_transform: DocTransform | None = None,
              purpose: str = 'training', seq_len: int | None = None) -> PackedRows:
  """The split's packed rows of seq_len tokens (default model.max_len; a task may cut
  other lengths, e.g. span corruption's raw rows, longer than its encoder inputs)."""
  tokens, offsets = sources.load_tokens(config, tokenizer, split)
  rows = pack(tokens, offsets, seq_len or config.model.max_len,
              tokenizer.pad_id if tokenizer.pad_id is not None else 0, doc_transform)
  if not len(rows):
    raise ValueError(
        f'The {split!r} split has fewer than 2 tokens, so nothing to use for {purpose}; '
        'give it more text (or raise --config.data.val_fraction for validation).')
  return rows


def _shard(config, process_index, process_count) -> tuple[int, int, int]:
  if process_index is None or process_count is None:
    import jax  # lazy: the pipeline itself needs no JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if config.train.batch_size % process_count:
    raise ValueError(f'train.batch_size={config.train.batch_size} must be a multiple of the '
                     f'number of processes ({process_count}).')
  return process_index, process_count, config.train.batch_size // process_count


@dataclasses.dataclass
class _Order:
  """The rows of local batch k, computed for the whole batch at once.

  Global batch k is stream positions [kB, (k+1)B); process p takes the ones
  = p mod count, so processes together see each global batch exactly once.
  Training wraps around (epoch e = positions [eR, (e+1)R)) and, with a seed,
  visits the rows of epoch e in a permutation drawn from (seed, e); evaluation
  does not wrap: positions past the end become padding rows.
  (Grain's per-row shuffle, slice and batch cost ~30us a row; this is one
  numpy gather a batch, and stateless, so resuming needs nothing but k.)
  """
  num_rows: int
  local_batch: int
  index: int
  count: int
  wrap: bool = True
  seed: int | None = None
  spread: int = 0  # eval capped to `spread` rows: take them evenly over the split, in order
  _perms: dict = dataclasses.field(default_factory=dict)

  def __call__(self, k: int) -> np.ndarray:
    pos_B = (k * self.local_batch + np.arange(self.local_batch)) * self.count + self.index
    if not self.wrap:
      if self.spread:
        return np.where(pos_B < self.spread, pos_B * self.num_rows // self.spread, -1)
      return pos_B
    epoch_B, row_B = np.divmod(pos_B, self.num_rows)
    if self.seed is None:
      return row_B
    for epoch in np.unique(epoch_B):
      sel = epoch_B == epoch
      row_B[sel] = self._perm(int(epoch))[row_B[sel]]
    return row_B

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:  # a batch spans at most two epochs
        self._perms.pop(min(self._perms))
      rng = np.random.default_rng([self.seed, epoch])
      self._perms[epoch] = rng.permutation(self.num_rows)
    return self._perms[epoch]


@dataclasses.dataclass
class _MakeBatch:  # a class, not a lambda, so Grain workers can unpickle it
  order: _Order
  rows: PackedRows

  def __call__(self, k: int) -> Batch:
    return self.rows.batch(self.order(k))


def _dataset(order: _Order, rows: PackedRows, num_batches: int, transform, seed: int,
             config) -> grain.IterDataset:
  ds = grain.MapDataset.range(num_batches).map(_MakeBatch(order, rows))
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  # Batches take microseconds, so by default they are made in the caller's thread
  # (JAX's async dispatch overlaps that with the step); workers are for heavy transforms.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if config.data.num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags; outside app.run: defaults
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data.num_workers))
  return it


def eval_order(config, num_items: int, num_batches: int | None, process_index=None,
               process_count=None) -> tuple['_Order', int, int]:
  """(order, batches, this process's index) of one ordered eval pass over num_items rows;
  a pass capped at num_batches samples the whole split evenly, not its start."""
  index, count, local_batch = _shard(config, process_index, process_count)
  n = -(-num_items // config.train.batch_size)
  spread = 0
  if num_batches and num_batches < n:
    n, spread = num_batches, num_batches * config.train.batch_size
  return _Order(num_items, local_batch, index, count, wrap=False, spread=spread), n, index


def examples_train_iter(config, examples, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Endless, shuffled, resumable batches of this process over fixed examples (anything
  with len() and batch(rows): labelled examples, preference pairs), in _Order's order."""
  index, count, local_batch = _shard(config, process_index, process_count)
  seed = config.train.seed % 2**32
  order = _Order(len(examples), local_batch, index, count,
                 seed=seed if config.data.shuffle else None)
  return iter(_dataset(order, examples, sys.maxsize, None, seed, config))


def examples_eval_iter(config, examples, num_batches: int | None = None,
                       process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """One ordered pass over fixed examples (capped at num_batches: spread evenly); the last
  batch is padded with examples of weight 0."""
  order, n, _ = eval_order(config, len(examples), num_batches, process_index, process_count)
  return _dataset(order, examples, n, None, 0, config)


def make_train_iter(config, tokenizer, process_index: int | None = None,
                    process_count: int | None = None, *,
                    doc_transform: DocTransform | None = None,
                    transform: BatchTransform | None = None,
                    seq_len: int | None = None) -> grain.DatasetIterator:
  """Infinite iterator of this process's training batches; `get_state`/`set_state` resume it.

  An epoch is one pass over the packed rows of the train split, shuffled
  (data.shuffle) from train.seed and the epoch number; see _Order.
  """
  rows = load_rows(config, tokenizer, config.data.train_split, doc_transform, seq_len=seq_len)
  index, count, local_batch = _shard(config, process_index, process_count)
  seed = config.train.seed % 2**32
  order = _Order(len(rows), local_batch, index, count, seed=seed if config.data.shuffle else None)
  return iter(_dataset(order, rows, sys.maxsize, transform, (seed * 7919 + index) % 2**32,
                       config))


def make_eval_iter(config, tokenizer, process_index: int | None = None,
                   process_count: int | None = None, num_batches: int | None = None, *,
                   doc_transform: DocTransform | None = None,
                   transform: BatchTransform | None = None,
                   seq_len: int | None = None) -> grain.IterDataset:
  """One ordered pass over the eval split; each `iter()` starts it afresh.

  The last batch is filled with padding rows (weights 0); every process gets
  the same number of batches. num_batches caps the pass; then its rows are
  spread evenly over the split (a fixed sample, like nanoGPT's estimate).
  """
  rows = load_rows(config, tokenizer, config.data.eval_split, doc_transform, 'evaluation',
                   seq_len)
  order, n, index = eval_order(config, len(rows), num_batches, process_index, process_count)
  return _dataset(order, rows, n, transform, (config.train.seed * 7919 + index + 1) % 2**32,
                  config)


def measure_throughput(config, num_batches: int = 200, warmup: int = 10) -> float:
  """Tokens per second (B*T per batch) the training pipeline alone delivers, after warm-up."""
  tokenizer = build_tokenizer(config)
  it = make_train_iter(config, tokenizer, 0, 1)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  seconds = time.perf_counter() - start
  return num_batches * config.train.batch_size * config.model.max_len / seconds
