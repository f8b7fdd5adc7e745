"""Text embeddings from an encoder or a decoder run, and the contrastive `embedding` task.

An embedding is the final hidden states pooled over a text's tokens (task.pooling): 'mean'
(over the non-padding tokens, sentence-transformers' default), 'cls' (the first token:
[CLS] for BERT tokenizers) or 'last' (the last token, the EOS every text ends with: the
usual choice for a causal decoder, whose last token has seen the whole text), then
L2-normalised so an inner product is a cosine. Texts are tokenised as lm/data/labeled.py
does for classification ([CLS] text [SEP], or BOS text EOS).

Task embedding (encoder or decoder family): (query, passage) pairs, JSON lines {"query",
"passage"} at data.path (held out: data.eval_path or the last data.val_fraction), or, with
data.path "", the embedded retrieval set's training towns (lm/rag/corpus.retriever_pairs;
task.finetune_examples pairs, task.finetune_eval held out). Loss: InfoNCE with in-batch
negatives, as DPR and sentence-transformers' MultipleNegativesRankingLoss: query i's logits
are its cosines with every passage of the (micro)batch over task.embed_temperature, its label
passage i; copies of passage i elsewhere in the batch (several questions of one document
often share a chunk) are left out, not counted as negatives. Eval: eval/loss and eval/accuracy (the own passage ranks first in the batch).
Queries are cut to task.query_len tokens (0: model.max_len), passages to model.max_len.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.train import tasks

POOLINGS = ('mean', 'cls', 'last')


def pool(hidden_BTD, segment_ids_BT, pooling: str):
  """Unit-norm float32 [B, D] embeddings of right-padded rows (segment 0 = padding)."""
  hidden_BTD = hidden_BTD.astype(jnp.float32)
  valid_BT = (segment_ids_BT > 0).astype(jnp.float32)
  if pooling == 'mean':
    out_BD = (jnp.einsum('btd,bt->bd', hidden_BTD, valid_BT)
              / jnp.maximum(valid_BT.sum(1, keepdims=True), 1.0))
  elif pooling == 'cls':
    out_BD = hidden_BTD[:, 0]
  elif pooling == 'last':
    last_B = jnp.maximum(valid_BT.sum(1).astype(jnp.int32) - 1, 0)
    out_BD = jnp.take_along_axis(hidden_BTD, last_B[:, None, None], 1)[:, 0]
  else:
    raise ValueError(f'Unknown task.pooling {pooling!r}; known: {POOLINGS}.')
  return out_BD / jnp.maximum(jnp.linalg.norm(out_BD, axis=-1, keepdims=True), 1e-9)


def embed_tokens(model, params, tokens_BT, segment_ids_BT, pooling: str, rng=None,
                 deterministic: bool = True):
  """Pooled unit-norm embeddings [B, D] of token rows, for either family."""
  rngs = None if deterministic or rng is None else {'dropout': rng}
  hidden_BTD = model.apply({'params': params}, tokens_BT, segment_ids_BT=segment_ids_BT,
                           deterministic=deterministic, rngs=rngs, head='hidden')
  return pool(hidden_BTD, segment_ids_BT, pooling)


def _check_family(config, name: str):
  family = config.model.get('family', 'decoder')
  if family not in ('encoder', 'decoder'):
    raise ValueError(f'{name} needs model.family encoder or decoder, not {family!r}.')


def encode_texts(texts: list[str], tokenizer, max_len: int):
  """(tokens [N, max_len], lengths [N]) as labeled.encode: [CLS]/BOS text [SEP]/EOS."""
  from lm.data import labeled  # lazy: lm.data imports the tokenizers
  ex = labeled.encode([(t, None, None) for t in texts], np.zeros(len(texts), np.int32),
                      tokenizer, max_len)
  return ex.inputs, ex.lengths


class Embedder:
  """Embeds texts with a run's model (lm.infer.load.load_run), in fixed-shape batches (one
  compile per length bucket)."""

  def __init__(self, model, params, tokenizer, pooling: str, workdir: str = '',
               batch_size: int = 64):
    if pooling not in POOLINGS:
      raise ValueError(f'Unknown pooling {pooling!r}; known: {POOLINGS}.')
    self.model, self.params, self.tokenizer = model, params, tokenizer
    self.pooling, self.workdir, self.batch_size = pooling, str(workdir), batch_size
    self.max_len = model.cfg.max_len
    self._fn = jax.jit(functools.partial(embed_tokens, model, pooling=pooling))

  @classmethod
  def from_run(cls, workdir, pooling: str | None = None, **kwargs) -> 'Embedder':
    """The run's model; pooling: the run's task.pooling when it trained embeddings, else
    'mean' for an encoder and 'last' for a decoder."""
    from lm.infer import load  # lazy: loading pulls in checkpointing
    model, params, config, tokenizer = load.load_run(workdir)
    _check_family(config, f'Embeddings of {workdir}')
    if pooling is None:
      if config.task.name == 'embedding':
        pooling = config.task.pooling
      else:
        pooling = 'mean' if config.model.family == 'encoder' else 'last'
    return cls(model, params, tokenizer, pooling, workdir, **kwargs)

  def describe(self) -> dict:
    return dict(encoder=self.workdir, pooling=self.pooling)

  def embed(self, texts: list[str]) -> np.ndarray:
    """float32 [N, D] unit-norm embeddings (texts longer than model.max_len are cut)."""
    from lm.eval import scoring  # lazy: the length buckets of the eval harness
    tokens, lengths = encode_texts(texts, self.tokenizer, self.max_len)
    out = []
    for i in range(0, len(texts), self.batch_size):
      rows = slice(i, i + self.batch_size)
      t = scoring.bucket(int(lengths[rows].max()), self.max_len)
      tok_BT = np.zeros((self.batch_size, t), np.int32)
      seg_BT = np.zeros((self.batch_size, t), np.int32)
      n = len(lengths[rows])
      tok_BT[:n] = tokens[rows, :t]
      seg_BT[:n] = np.arange(t) < lengths[rows, None]
      out.append(np.asarray(self._fn(self.params, tok_BT, seg_BT))[:n])
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


# -- the embedding task -------------------------------------------------------------------

class PairTexts:
  """Tokenised (query, passage) pairs, padded: the examples pipeline's len() and batch()."""

  def __init__(self, queries, query_lengths, passages, passage_lengths, pad_id):
    self.q, self.ql, self.p, self.pl, self.pad = (queries, query_lengths, passages,
                                                  passage_lengths, pad_id)

  def __len__(self) -> int:
    return len(self.ql)

  def batch(self, rows_B):
    rows_B = np.asarray(rows_B, np.int64)
    valid_B = (rows_B >= 0) & (rows_B < len(self))
    idx_B = np.where(valid_B, rows_B, 0)
    out = dict(weights=valid_B.astype(np.float32))
    for side, tokens, lengths in (('query', self.q, self.ql), ('passage', self.p, self.pl)):
      seg_BT = ((np.arange(tokens.shape[1]) < lengths[idx_B][:, None])
                & valid_B[:, None]).astype(np.int32)
      out[f'{side}_inputs'] = np.where(seg_BT > 0, tokens[idx_B], self.pad).astype(np.int32)
      out[f'{side}_segment_ids'] = seg_BT
    return out


def read_pairs(path: str) -> list[tuple[str, str]]:
  from lm.data import sources  # lazy: lm.data imports the tokenizers
  out = []
  for where, record in sources.json_records(path):
    if not (isinstance(record, dict) and isinstance(record.get('query'), str)
            and isinstance(record.get('passage'), str)):
      raise ValueError(f'{where} is not {{"query": "...", "passage": "..."}}; fix the line or '
                       'rename its fields.')
    out.append((record['query'], record['passage']))
  if not out:
    raise ValueError(f'data.path {path!r} holds no (query, passage) pairs.')
  return out


def split_pairs(config, train: bool) -> list[tuple[str, str]]:
  """The training or held-out pairs (module docstring)."""
  if not config.data.path:
    from lm.rag import corpus  # lazy
    t = config.task
    town_list = corpus.held_out_towns(t.finetune_examples, t.finetune_eval)[0 if train else 1]
    pairs = corpus.retriever_pairs(town_list)
    pairs = pairs[:t.finetune_examples] if train else pairs[:t.finetune_eval]
    return [(p['query'], p['passage']) for p in pairs]
  if config.data.eval_path:
    return read_pairs(config.data.path if train else config.data.eval_path)
  from lm.data import labeled  # the same hold-out as labelled records
  return labeled.hold_out(read_pairs(config.data.path), config, train)


class Embedding(tasks.Task):
  """Contrastive (query, passage) embeddings with in-batch negatives (module docstring)."""
  name = 'embedding'

  def __init__(self, config):
    super().__init__(config)
    _check_family(config, 'task embedding')
    t = config.task
    if t.pooling not in POOLINGS:
      raise ValueError(f'Unknown task.pooling {t.pooling!r}; known: {POOLINGS}.')
    if t.embed_temperature <= 0:
      raise ValueError(f'task.embed_temperature={t.embed_temperature} must be > 0 (e.g. 0.05).')
    self._examples = {}

  def query_len(self) -> int:
    return self.config.task.query_len or self.config.model.max_len

  def batch_spec(self):
    b, m = self.config.train.batch_size, self.config.model.max_len
    q = self.query_len()
    return dict(query_inputs=((b, q), np.int32), query_segment_ids=((b, q), np.int32),
                passage_inputs=((b, m), np.int32), passage_segment_ids=((b, m), np.int32),
                weights=((b,), np.float32))

  def examples(self, tokenizer, train: bool) -> PairTexts:
    if train not in self._examples:
      pairs = split_pairs(self.config, train)
      q, ql = encode_texts([p[0] for p in pairs], tokenizer, self.query_len())
      p, pl = encode_texts([p[1] for p in pairs], tokenizer, self.config.model.max_len)
      pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
      self._examples[train] = PairTexts(q, ql, p, pl, pad)
    return self._examples[train]

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import pipeline  # lazy: lm.data imports the tokenizers
    examples = self.examples(tokenizer, split == 'train')
    if split == 'train':
      return pipeline.examples_train_iter(self.config, examples)
    return pipeline.examples_eval_iter(self.config, examples, num_batches)

  def _stats(self, model, params, batch, rng, deterministic):
    pooling = self.config.task.pooling
    rng_q, rng_p = jax.random.split(rng) if rng is not None else (None, None)
    q_BD = embed_tokens(model, params, batch['query_inputs'], batch['query_segment_ids'],
                        pooling, rng_q, deterministic)
    p_BD = embed_tokens(model, params, batch['passage_inputs'], batch['passage_segment_ids'],
                        pooling, rng_p, deterministic)
    weights_B = batch['weights'].astype(jnp.float32)
    logits_BB = q_BD @ p_BD.T / self.config.task.embed_temperature
    p_BT = batch['passage_inputs']  # another copy of the own passage is no negative
    copy_BB = jnp.all(p_BT[:, None] == p_BT[None, :], -1) & ~jnp.eye(len(p_BT), dtype=bool)
    logits_BB = jnp.where((weights_B[None, :] > 0) & ~copy_BB, logits_BB, -1e9)  # nor padding
    labels_B = jnp.arange(logits_BB.shape[0])
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BB, labels_B)
    nll_B = jnp.where(weights_B > 0, nll_B, 0.0)
    correct_B = (jnp.argmax(logits_BB, -1) == labels_B).astype(jnp.float32)
    return jnp.sum(nll_B * weights_B), jnp.sum(weights_B), jnp.sum(correct_B * weights_B)

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    s, w, c = self._stats(model, params, batch, rng, deterministic)
    return s, w, {'accuracy': c}

  def eval_stats(self, model, params, extra, batch):
    del extra
    s, w, c = self._stats(model, params, batch, None, True)
    return {'loss_sum': s, 'weight': w, 'correct': c}

  def eval_metrics(self, stats):
    weight = max(stats['weight'], 1.0)
    return {'eval/loss': stats['loss_sum'] / weight, 'eval/accuracy': stats['correct'] / weight}


tasks.register(Embedding)

