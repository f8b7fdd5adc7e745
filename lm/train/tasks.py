"""Tasks: what the trainer trains. The loop knows nothing else about an objective.

A task declares
- `batch_spec(config)`: the batch's keys -> (shape, dtype), global shapes;
- `doc_transform` / `batch_transform(tokenizer)`: hooks for the data pipeline
  (lm/data/pipeline.py), per document before packing and per packed batch, and
  `row_length()`, the packed rows' length; or `data_iter` for data of another shape;
- `loss(model, params, extra, batch, rng, deterministic)`: (sum, weight, aux sums), so
  microbatches add up exactly to the big batch; the trainer divides by the weight;
- `eval_stats` (sums over a batch) and `eval_metrics` (the metrics from summed stats), so
  evaluation over many batches and processes is exact too;
- `init_extra(params)`: extra state kept beside `params` in the train state and the
  checkpoint, never trained (a frozen reference model, a teacher); {} for most tasks.

Tasks are registered by name (`config.task.name`); `register` adds one (tests add their
own without touching the trainer). Here: causal_lm (decoder), masked_lm (encoder, BERT),
span_corruption (encdec, T5), classification (encoder or decoder; lm/data/labeled.py).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, Any]


class Task:
  """The base task: subclasses override what differs. `config` is the resolved run config."""
  name = ''
  # The checkpoint keeps the best eval by this metric (lower is better).
  best_metric = 'eval/loss'

  def __init__(self, config):
    self.config = config

  def batch_spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    raise NotImplementedError

  def doc_transform(self, tokenizer) -> Callable | None:
    del tokenizer
    return None

  def batch_transform(self, tokenizer) -> Callable | None:
    del tokenizer
    return None

  def row_length(self) -> int:
    """Tokens per packed row that the data pipeline cuts (model.max_len for most tasks)."""
    return self.config.model.max_len

  def data_iter(self, tokenizer, split: str, num_batches: int | None = None):
    """This process's batches (dicts of numpy arrays, keys as batch_spec): for split
    'train' an endless iterator with get_state/set_state, else one finite pass
    (num_batches caps it) that each iter() restarts. The default is lm.data's packed
    rows with this task's hooks; tasks with other data (labelled examples) override it."""
    from lm import data as lm_data  # lazy: lm.data imports the tokenizers
    hooks = dict(doc_transform=self.doc_transform(tokenizer),
                 transform=self.batch_transform(tokenizer), seq_len=self.row_length())
    if split == 'train':
      return lm_data.make_train_iter(self.config, tokenizer, **hooks)
    return lm_data.make_eval_iter(self.config, tokenizer, num_batches=num_batches, **hooks)

  def init_extra(self, params) -> dict:
    del params
    return {}

  def load_extra(self, mesh) -> dict | None:
    """Extra state read from elsewhere at the start of a new run (a teacher's weights, on
    `mesh`), replacing init_extra's; None: keep init_extra's."""
    del mesh
    return None

  def loss(self, model, params, extra, batch: Batch, rng, deterministic: bool):
    raise NotImplementedError

  def eval_stats(self, model, params, extra, batch: Batch) -> dict[str, jax.Array]:
    s, w, _ = self.loss(model, params, extra, batch, None, True)
    return {'loss_sum': s, 'weight': w}

  def eval_metrics(self, stats: dict[str, float]) -> dict[str, float]:
    return {'eval/loss': stats['loss_sum'] / max(stats['weight'], 1.0)}


def _forward(model, params, batch, rng, deterministic, **kwargs):
  rngs = None if deterministic or rng is None else {'dropout': rng}
  return model.apply({'params': params}, batch['inputs'], positions_BT=batch.get('positions'),
                     segment_ids_BT=batch.get('segment_ids'), deterministic=deterministic,
                     rngs=rngs, **kwargs)


def token_log_probs(logits_BTV, targets_BT):
  """log p(target) per position, in float32."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  return -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)


class CausalLM(Task):
  """Next-token cross entropy (float32), masked by batch['weights']; optional z-loss.

  The batch is the packed rows of lm/data/pipeline.py. Eval: loss and perplexity.
  """
  name = 'causal_lm'

  def row_length(self):
    from lm import config as lm_config  # lazy: lm.config imports lm.data
    return lm_config.row_length(self.config)  # train.seq_len, less a soft prompt

  def batch_spec(self):
    shape = (self.config.train.batch_size, self.row_length())
    return dict(inputs=(shape, np.int32), targets=(shape, np.int32),
                segment_ids=(shape, np.int32), positions=(shape, np.int32),
                weights=(shape, np.float32))

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    logits_BTV = _forward(model, params, batch, rng, deterministic).astype(jnp.float32)
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
    weights_BT = batch['weights'].astype(jnp.float32)
    aux = {}
    z_loss = self.config.task.z_loss
    if z_loss:  # PaLM's auxiliary loss keeps the softmax normaliser near 1
      z_BT = z_loss * jnp.square(jax.nn.logsumexp(logits_BTV, axis=-1))
      aux['z_loss'] = jnp.sum(z_BT * weights_BT)
      loss_BT = loss_BT + z_BT
    return jnp.sum(loss_BT * weights_BT), jnp.sum(weights_BT), aux

  def eval_stats(self, model, params, extra, batch):
    logits_BTV = _forward(model, params, batch, None, True)
    nll_BT = -token_log_probs(logits_BTV, batch['targets'])
    weights_BT = batch['weights'].astype(jnp.float32)
    return {'loss_sum': jnp.sum(nll_BT * weights_BT), 'weight': jnp.sum(weights_BT)}

  def eval_metrics(self, stats):
    loss = stats['loss_sum'] / max(stats['weight'], 1.0)
    return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0))}


def _rngs(rng, deterministic):
  return None if deterministic or rng is None else {'dropout': rng}


def _token_loss(logits_BTV, targets_BT, weights_BT):
  """Weighted cross-entropy sum, weight sum and correct-prediction sum (float32)."""
  weights_BT = weights_BT.astype(jnp.float32)
  nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32),
                                                           targets_BT)
  nll_BT = jnp.where(weights_BT > 0, nll_BT, 0.0)  # padding rows never leak a NaN
  correct_BT = (jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32)
  return (jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT), jnp.sum(correct_BT * weights_BT))


class _TokenAccuracy(Task):
  """Eval for token-level objectives: loss, accuracy (of the weighted tokens), perplexity."""

  def eval_stats(self, model, params, extra, batch):
    s, w, c = _token_loss(*self._logits_targets_weights(model, params, batch, None, True))
    return {'loss_sum': s, 'weight': w, 'correct': c}

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    s, w, _ = _token_loss(*self._logits_targets_weights(model, params, batch, rng,
                                                        deterministic))
    return s, w, {}

  def eval_metrics(self, stats):
    weight = max(stats['weight'], 1.0)
    loss = stats['loss_sum'] / weight
    return {'eval/loss': loss, 'eval/accuracy': stats['correct'] / weight,
            'eval/perplexity': math.exp(min(loss, 50.0))}


def _symbol_or_error(tokenizer, symbol: str, task: str) -> int:
  from lm.data import labeled  # lazy: lm.data imports the tokenizers
  i = labeled.find_symbol(tokenizer, symbol)
  if i is None:
    raise ValueError(
        f'task {task} needs the symbol {symbol!r}, which the {tokenizer.kind} tokenizer '
        f'lacks. Add it in a new run: --config.data.user_symbols="(\'{symbol}\',)" (it gets '
        'the id after the base vocabulary).')
  return i


def bert_mask(tokens_BT, maskable_BT, rng: np.random.Generator, mask_id: int,
              random_ids: np.ndarray, rate: float = 0.15):
  """BERT's masking: each maskable token is selected with probability `rate`; a selected
  token becomes mask_id (80%), a random id of random_ids (10%) or stays itself (10%).
  Returns (inputs_BT, selected_BT)."""
  selected_BT = maskable_BT & (rng.random(tokens_BT.shape) < rate)
  action_BT = rng.random(tokens_BT.shape)
  random_BT = random_ids[rng.integers(0, len(random_ids), tokens_BT.shape)]
  inputs_BT = np.where(selected_BT & (action_BT < 0.8), mask_id, tokens_BT)
  inputs_BT = np.where(selected_BT & (action_BT >= 0.8) & (action_BT < 0.9), random_BT,
                       inputs_BT)
  return inputs_BT.astype(np.int32), selected_BT


class MaskedLM(_TokenAccuracy):
  """BERT's masked LM on packed rows (encoder family; lm/data/pipeline.py's rows).

  batch_transform masks task.mask_rate of the non-special, non-padding tokens (bert_mask:
  80% mask_token, 10% a random non-special id, 10% kept); the loss and eval/accuracy are
  over the selected positions only. Packed documents do not attend across (segment ids).
  Eval: loss, accuracy, perplexity of the selected tokens.
  """
  name = 'masked_lm'

  def batch_spec(self):
    shape = (self.config.train.batch_size, self.config.model.max_len)
    return dict(inputs=(shape, np.int32), targets=(shape, np.int32),
                segment_ids=(shape, np.int32), positions=(shape, np.int32),
                weights=(shape, np.float32))

  def special_ids(self, tokenizer) -> tuple[int, np.ndarray]:
    """(the mask id, the ids never selected: pad/bos/eos, [MASK], [CLS], [SEP], unk)."""
    from lm.data import labeled  # lazy: lm.data imports the tokenizers
    mask_id = _symbol_or_error(tokenizer, self.config.task.mask_token, self.name)
    if mask_id >= self.config.model.vocab_size:
      raise ValueError(f'The mask id {mask_id} is outside model.vocab_size='
                       f'{self.config.model.vocab_size}; set it to 0 (the tokenizer\'s).')
    found = [labeled.find_symbol(tokenizer, s) for s in ('[CLS]', '[SEP]')]
    special = tokenizer.special_ids | {mask_id, tokenizer.unk_id} | set(found)
    return mask_id, np.array(sorted(i for i in special if i is not None), np.int64)

  def batch_transform(self, tokenizer):
    mask_id, special = self.special_ids(tokenizer)
    random_ids = np.setdiff1d(np.arange(tokenizer.vocab_size), special)
    rate = self.config.task.mask_rate

    def transform(batch, rng):
      tokens_BT = batch['inputs']
      maskable_BT = (batch['segment_ids'] > 0) & ~np.isin(tokens_BT, special)
      inputs_BT, selected_BT = bert_mask(tokens_BT, maskable_BT, rng, mask_id, random_ids,
                                         rate)
      return dict(inputs=inputs_BT, targets=tokens_BT, segment_ids=batch['segment_ids'],
                  positions=batch['positions'], weights=selected_BT.astype(np.float32))
    return transform

  def _logits_targets_weights(self, model, params, batch, rng, deterministic):
    logits_BTV = model.apply({'params': params}, batch['inputs'],
                             segment_ids_BT=batch['segment_ids'],
                             positions_BT=batch['positions'], deterministic=deterministic,
                             rngs=_rngs(rng, deterministic), head='mlm')
    return logits_BTV, batch['targets'], batch['weights']


# -- span corruption (T5) -------------------------------------------------------------

def span_counts(length: int, noise_density: float, mean_noise_span_length: float):
  """(noise tokens, noise spans) of a row of `length` tokens: seqio's
  random_spans_noise_mask arithmetic (rows shorter than 2 count as 2)."""
  length = max(length, 2)
  noise = min(max(int(round(length * noise_density)), 1), length - 1)
  return noise, max(int(round(noise / mean_noise_span_length)), 1)


def span_corruption_lengths(length: int, noise_density: float,
                            mean_noise_span_length: float) -> tuple[int, int]:
  """(inputs, targets) lengths for a row of `length` tokens: the non-noise tokens plus a
  sentinel per span plus EOS; the noise tokens plus a sentinel per span plus EOS."""
  noise, spans = span_counts(length, noise_density, mean_noise_span_length)
  return length - noise + spans + 1, noise + spans + 1


def raw_row_length(inputs_length: int, noise_density: float,
                   mean_noise_span_length: float) -> int:
  """The longest row whose corrupted inputs fit inputs_length (seqio's
  random_spans_helper: 568 for T5's 512)."""
  length = inputs_length - 1
  while span_corruption_lengths(length + 1, noise_density,
                                mean_noise_span_length)[0] <= inputs_length:
    length += 1
  return length


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator) -> np.ndarray:
  """bool [length], True on noise: seqio's random_spans_noise_mask with numpy randomness.

  span_counts' noise tokens in span_counts' spans; the noise and the non-noise tokens are
  each cut into that many non-empty spans at random, interleaved starting with non-noise
  (so the row ends with noise)."""
  if length == 0:
    return np.zeros(0, bool)
  orig_length, length = length, max(length, 2)
  noise, spans = span_counts(length, noise_density, mean_noise_span_length)

  def segment_lengths(num_items, num_segments):  # a random composition into non-empty parts
    first = np.zeros(num_items, bool)
    first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
    return np.bincount(np.cumsum(first), minlength=num_segments)

  interleaved = np.stack([segment_lengths(length - noise, spans),
                          segment_lengths(noise, spans)], axis=1).reshape(-1)
  starts = np.zeros(length, np.int64)
  starts[np.cumsum(interleaved)[:-1]] = 1
  return (np.cumsum(starts) % 2 == 1)[:orig_length]


def noise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel: int) -> np.ndarray:
  """Each noise span -> one sentinel (first_sentinel, first_sentinel - 1, ...), as seqio."""
  prev = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~prev
  tokens = np.where(first, first_sentinel + 1 - np.cumsum(first), tokens)
  return tokens[~(noise_mask & prev)]


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, first_sentinel: int) -> np.ndarray:
  return noise_span_to_unique_sentinel(tokens, ~noise_mask, first_sentinel)


class SpanCorruption(_TokenAccuracy):
  """T5's span corruption (encdec family), as the T5 paper and seqio/t5x do it.

  The pipeline cuts the concatenated documents (each ending with EOS, data.add_eos) into
  raw rows of row_length() tokens, the longest whose corrupted inputs fit model.max_len
  (seqio's random_spans_helper; T5: 568 -> 512 inputs, 114 targets). Each row is one
  example: random_spans_noise_mask picks task.noise_density of its tokens in spans of mean
  task.mean_noise_span_length; the inputs keep the other tokens with one sentinel per noise
  span, the targets are the noise spans each after its sentinel, both end with EOS.
  Sentinels count down from the tokenizer's '<extra_id_0>' when it has T5's extra ids
  (seqio's vocab_size - 1), else from model.vocab_size - 1, which must leave room above the
  tokenizer's ids (e.g. model.vocab_size = tokenizer's + 100).
  Batch: encoder_inputs / encoder_segment_ids [B, max_len]; decoder_inputs (the targets
  shifted right after model.decoder_start_id), decoder_targets, decoder_segment_ids,
  decoder_weights [B, max_target_len]. Eval: loss, token accuracy, perplexity.
  """
  name = 'span_corruption'

  def __init__(self, config):
    super().__init__(config)
    t, m = config.task, config.model
    if not (0 < t.noise_density < 1 and t.mean_noise_span_length >= 1):
      raise ValueError(f'task.noise_density={t.noise_density} must lie in (0, 1) and '
                       f'task.mean_noise_span_length={t.mean_noise_span_length} be >= 1.')
    if m.get('family') != 'encdec':
      raise ValueError(f'task span_corruption needs model.family=encdec, not {m.get("family")!r}.')
    self.counts = lambda n: span_counts(n, t.noise_density, t.mean_noise_span_length)
    targets = span_corruption_lengths(self.row_length(), t.noise_density,
                                      t.mean_noise_span_length)[1]
    if targets > m.max_target_len:
      raise ValueError(
          f'span_corruption: rows of {self.row_length()} tokens (model.max_len={m.max_len} '
          f'inputs) give {targets} targets (noise + a sentinel per span + EOS), more than '
          f'model.max_target_len={m.max_target_len}; set --config.model.max_target_len='
          f'{targets}.')

  def row_length(self):
    t = self.config.task
    return raw_row_length(self.config.model.max_len, t.noise_density, t.mean_noise_span_length)

  def batch_spec(self):
    b, m = self.config.train.batch_size, self.config.model
    enc, dec = (b, m.max_len), (b, m.max_target_len)
    return dict(encoder_inputs=(enc, np.int32), encoder_segment_ids=(enc, np.int32),
                decoder_inputs=(dec, np.int32), decoder_targets=(dec, np.int32),
                decoder_segment_ids=(dec, np.int32), decoder_weights=(dec, np.float32))

  def first_sentinel(self, tokenizer) -> int:
    """The id of the first sentinel (later ones count down), checked against the vocab."""
    from lm.data import labeled  # lazy: lm.data imports the tokenizers
    vocab = self.config.model.vocab_size
    spans = self.counts(self.row_length())[1]
    extra_0 = labeled.find_symbol(tokenizer, '<extra_id_0>')
    if extra_0 is not None:  # T5's own extra ids: <extra_id_i> = extra_0 - i
      last = labeled.find_symbol(tokenizer, f'<extra_id_{spans - 1}>')
      if last != extra_0 - spans + 1 or extra_0 >= vocab:
        raise ValueError(f'span_corruption needs {spans} sentinels, <extra_id_0> .. '
                         f'<extra_id_{spans - 1}> counting down from id {extra_0} below '
                         f'model.vocab_size={vocab}; this tokenizer\'s extra ids do not.')
      return extra_0
    if vocab - spans < tokenizer.vocab_size:
      raise ValueError(
          f'span_corruption needs {spans} sentinel ids at the top of the model\'s vocabulary, '
          f'above the tokenizer\'s {tokenizer.vocab_size} ids, but model.vocab_size={vocab}; '
          f'set --config.model.vocab_size={tokenizer.vocab_size + 100} (T5 leaves 100).')
    return vocab - 1

  def batch_transform(self, tokenizer):
    m, t = self.config.model, self.config.task
    if tokenizer.eos_id is None:
      raise ValueError(f'span_corruption ends inputs and targets with EOS; the '
                       f'{tokenizer.kind} tokenizer has none (use bytes or sentencepiece).')
    eos, pad = tokenizer.eos_id, tokenizer.pad_id if tokenizer.pad_id is not None else 0
    sentinel = self.first_sentinel(tokenizer)

    def transform(batch, rng):
      tokens_BR, valid_B = batch['inputs'], (batch['segment_ids'] > 0).sum(1)
      b = len(tokens_BR)
      enc_BS = np.full((b, m.max_len), pad, np.int32)
      enc_seg_BS = np.zeros((b, m.max_len), np.int32)
      dec_BT = np.full((b, m.max_target_len), pad, np.int32)
      dec_seg_BT = np.zeros((b, m.max_target_len), np.int32)
      for i in range(b):  # valid tokens are a prefix (only the split's last row is short)
        if not valid_B[i]:
          continue  # a padding row: weight 0
        row = tokens_BR[i, :valid_B[i]]
        noise = random_spans_noise_mask(len(row), t.noise_density, t.mean_noise_span_length,
                                        rng)
        inputs = np.append(noise_span_to_unique_sentinel(row, noise, sentinel), eos)
        targets = np.append(nonnoise_span_to_unique_sentinel(row, noise, sentinel), eos)
        enc_BS[i, :len(inputs)], enc_seg_BS[i, :len(inputs)] = inputs, 1
        dec_BT[i, :len(targets)], dec_seg_BT[i, :len(targets)] = targets, 1
      dec_in_BT = np.concatenate([np.full((b, 1), m.decoder_start_id, np.int32),
                                  dec_BT[:, :-1]], axis=1)
      return dict(encoder_inputs=enc_BS, encoder_segment_ids=enc_seg_BS,
                  decoder_inputs=np.where(dec_seg_BT > 0, dec_in_BT, pad).astype(np.int32),
                  decoder_targets=dec_BT, decoder_segment_ids=dec_seg_BT,
                  decoder_weights=dec_seg_BT.astype(np.float32))
    return transform

  def _logits_targets_weights(self, model, params, batch, rng, deterministic):
    logits_BTV = model.apply({'params': params}, batch['encoder_inputs'],
                             batch['decoder_inputs'],
                             encoder_segment_ids_BS=batch['encoder_segment_ids'],
                             decoder_segment_ids_BT=batch['decoder_segment_ids'],
                             deterministic=deterministic, rngs=_rngs(rng, deterministic))
    return logits_BTV, batch['decoder_targets'], batch['decoder_weights']


# -- sequence classification --------------------------------------------------------

class Classification(Task):
  """A label per sequence (lm/data/labeled.py's JSON-lines examples), cross entropy.

  encoder: head='classify' (the classifier on the pooled first token); decoder: its
  classifier on the last non-pad token (model.num_labels > 0 creates it). Eval: loss,
  accuracy and macro F1 (over the classes that occur as label or prediction, as
  sklearn's f1_score(average='macro')); the best checkpoint stays the lowest eval/loss.
  """
  name = 'classification'

  def __init__(self, config):
    super().__init__(config)
    family = config.model.get('family')
    if family not in ('encoder', 'decoder'):
      raise ValueError(f'task classification needs model.family encoder or decoder, not '
                       f'{family!r}.')
    if config.model.num_labels <= 0:
      raise ValueError('task classification needs --config.model.num_labels > 0 (the number '
                       'of classes).')

  def batch_spec(self):
    b, t = self.config.train.batch_size, self.config.model.max_len
    return dict(inputs=((b, t), np.int32), token_types=((b, t), np.int32),
                segment_ids=((b, t), np.int32), labels=((b,), np.int32),
                weights=((b,), np.float32))

  def data_iter(self, tokenizer, split, num_batches=None):
    from lm.data import labeled  # lazy: lm.data imports the tokenizers
    names = labeled.label_names(self.config)
    if names and not self.config.task.labels:
      self.config.task.labels = names  # so the run's config.json records the mapping
    if split == 'train':
      return labeled.make_train_iter(self.config, tokenizer, names)
    return labeled.make_eval_iter(self.config, tokenizer, names, num_batches)

  def _logits(self, model, params, batch, rng, deterministic):
    kwargs = dict(segment_ids_BT=batch['segment_ids'], deterministic=deterministic,
                  rngs=_rngs(rng, deterministic), head='classify')
    if self.config.model.family == 'encoder' and self.config.model.type_vocab_size >= 2:
      kwargs['token_types_BT'] = batch['token_types']
    return model.apply({'params': params}, batch['inputs'], **kwargs)

  def _nll(self, logits_BL, batch):
    weights_B = batch['weights'].astype(jnp.float32)
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BL, batch['labels'])
    return jnp.where(weights_B > 0, nll_B, 0.0), weights_B

  def loss(self, model, params, extra, batch, rng, deterministic):
    del extra
    nll_B, weights_B = self._nll(self._logits(model, params, batch, rng, deterministic), batch)
    return jnp.sum(nll_B * weights_B), jnp.sum(weights_B), {}

  def eval_stats(self, model, params, extra, batch):
    del extra
    logits_BL = self._logits(model, params, batch, None, True)
    nll_B, weights_B = self._nll(logits_BL, batch)
    pred_B, label_B = jnp.argmax(logits_BL, -1), batch['labels']
    stats = {'loss_sum': jnp.sum(nll_B * weights_B), 'weight': jnp.sum(weights_B),
             'correct': jnp.sum((pred_B == label_B) * weights_B)}
    for k in range(self.config.model.num_labels):  # scalars: the trainer sums them
      stats[f'tp_{k}'] = jnp.sum(((pred_B == k) & (label_B == k)) * weights_B)
      stats[f'fp_{k}'] = jnp.sum(((pred_B == k) & (label_B != k)) * weights_B)
      stats[f'fn_{k}'] = jnp.sum(((pred_B != k) & (label_B == k)) * weights_B)
    return stats

  def eval_metrics(self, stats):
    weight = max(stats['weight'], 1.0)
    f1s = []
    for k in range(self.config.model.num_labels):
      tp, fp, fn = stats[f'tp_{k}'], stats[f'fp_{k}'], stats[f'fn_{k}']
      if tp + fp + fn:
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {'eval/loss': stats['loss_sum'] / weight, 'eval/accuracy': stats['correct'] / weight,
            'eval/f1': float(np.mean(f1s)) if f1s else 0.0}


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
  """Adds a task class to the registry under its `name` (usable as a decorator)."""
  TASKS[cls.name] = cls
  return cls


register(CausalLM)
register(MaskedLM)
register(SpanCorruption)
register(Classification)


def get_task(config) -> Task:
  name = config.task.name
  if name not in TASKS:
    raise ValueError(f'Unknown task.name {name!r}; known: {sorted(TASKS)}.')
  return TASKS[name](config)
from lm.train import sft  # noqa: E402,F401  (registers task sft)
from lm.train import rl  # noqa: E402,F401  (registers tasks grpo, ppo)
from lm.train import align  # noqa: E402,F401  (registers tasks dpo, reward)
from lm.train import distill  # noqa: E402,F401  (registers task distill)
from lm.rag import embed  # noqa: E402,F401  (registers task embedding)
