"""Labelled examples for sequence classification: JSON lines -> token rows -> batches.

Records are JSON lines, one example each: {"text": ..., "label": ...} (the fields
data.json_field and data.label_field) or text pairs {"text_a": ..., "text_b": ...,
"label": ...} (data.pair_fields). data.path names the training records (a file, a
directory, a glob or a comma list, as for text_files); data.eval_path the evaluation
records, or when it is empty the last data.val_fraction of data.path's records (in file
order) are held out for evaluation. Or a TFDS catalog dataset (data.dataset, e.g.
glue/sst2 with data.json_field=sentence and data.eval_split=validation): its splits'
examples, with the same fields.

Labels are ints (used as ids) or strings, mapped to ids in sorted order of the training
records' labels; task.labels (names in id order) pins the mapping instead, and the
classification task records the mapping it used there (so config.json keeps it).

Each example is tokenised with the run's tokenizer: BERT style `[CLS] a [SEP] b [SEP]`
with token types 0 then 1 when the tokenizer has [CLS] and [SEP], else `(bos) a eos
(b eos)` (bos where the tokenizer has one), truncated to model.max_len (longest text first
for pairs, as transformers' longest_first) and padded. Batches:
  inputs, token_types, segment_ids (1 on tokens, 0 on padding)  int32 [B, T]
  labels int32 [B];  weights float32 [B] (0 for the padding examples of the last eval batch)
Training visits the examples in a permutation per epoch drawn from train.seed and resumes
exactly (get_state/set_state), with the packed rows' order (pipeline._Order).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lm.data import pipeline, sources

Batch = dict[str, np.ndarray]


def find_symbol(tokenizer, symbol: str) -> int | None:
  """The id of `symbol` in the tokenizer (a user symbol, or a token of a Hugging Face or
  SentencePiece vocabulary), or None."""
  try:
    return tokenizer.symbol_id(symbol)
  except KeyError:
    pass
  backend = getattr(tokenizer, 'backend', None)  # a Hugging Face `tokenizers.Tokenizer`
  if backend is not None and backend.token_to_id(symbol) is not None:
    return int(backend.token_to_id(symbol))
  sp = getattr(tokenizer, 'sp', None)
  if sp is not None and not sp.is_unknown(sp.piece_to_id(symbol)):
    return int(sp.piece_to_id(symbol))
  return None


# -- records --------------------------------------------------------------------------

def read_records(path: str, config, records=None) -> list[tuple[str, str | None, object]]:
  """(text_a, text_b or None, label) of every JSON line of the files `path` names (or of
  `records`, (where, dict) pairs from elsewhere: a TFDS split)."""
  text_field, (field_a, field_b), label_field = (config.data.json_field,
                                                 tuple(config.data.pair_fields),
                                                 config.data.label_field)
  out = []
  for where, record in sources.json_records(path) if records is None else records:
    if not isinstance(record, dict) or label_field not in record:
      raise ValueError(f'{where} has no label field {label_field!r} (set '
                       '--config.data.label_field).')
    if isinstance(record.get(field_a), str) and isinstance(record.get(field_b), str):
      out.append((record[field_a], record[field_b], record[label_field]))
    elif isinstance(record.get(text_field), str):
      out.append((record[text_field], None, record[label_field]))
    else:
      raise ValueError(
          f'{where} has neither a string field {text_field!r} nor the pair '
          f'{field_a!r}, {field_b!r} (fields: {sorted(record)}); set '
          '--config.data.json_field or --config.data.pair_fields.')
  if not out:
    raise ValueError(f'data.path {path!r} holds no labelled records.')
  return out


def catalog_records(config, split: str) -> list:
  """The records of a split of the TFDS catalog dataset data.dataset (e.g. glue/sst2: its
  'sentence' is data.json_field, glue/mrpc's 'sentence1', 'sentence2' data.pair_fields),
  built as array_record on first use (sources.get_builder: needs the internet once)."""
  builder = sources.get_builder(config)
  if split not in builder.info.splits:
    raise ValueError(f'{config.data.dataset} has no split {split!r} (it has '
                     f'{sorted(builder.info.splits)}); set --config.data.train_split / '
                     'eval_split.')
  source = builder.as_data_source(split)
  text = lambda v: v.decode('utf-8') if isinstance(v, bytes) else v
  rows = ((f'{config.data.dataset}[{split}] example {i}',
           {k: text(v.item() if hasattr(v, 'item') else v) for k, v in source[i].items()})
          for i in range(len(source)))
  return read_records('', config, rows)


def split_records(config, split: str) -> list:
  """The records of data.train_split ('train') or the eval split."""
  if config.data.dataset not in ('default', 'text_files'):
    return catalog_records(config, split)
  if not config.data.path:
    raise ValueError('task classification needs --config.data.path=FILE.jsonl (records '
                     '{"text": ..., "label": ...}; see lm/data/labeled.py).')
  train = split == config.data.train_split
  if config.data.eval_path:
    return read_records(config.data.path if train else config.data.eval_path, config)
  return hold_out(read_records(config.data.path, config), config, train)


def hold_out(records: list, config, train: bool) -> list:
  """The first (train) or last (eval) records, the last data.val_fraction held out."""
  n_eval = int(round(len(records) * config.data.val_fraction))
  if not 0 < n_eval < len(records):
    raise ValueError(
        f'data.val_fraction={config.data.val_fraction} of {len(records)} records leaves '
        f'{n_eval} for evaluation and {len(records) - n_eval} for training; change it or '
        'give the eval records as --config.data.eval_path.')
  return records[:-n_eval] if train else records[-n_eval:]


def label_names(config) -> tuple[str, ...]:
  """Label names in id order: task.labels, or the sorted string labels of the training
  records; () when the labels are ints (they are the ids)."""
  if config.task.labels:
    return tuple(config.task.labels)
  labels = [r[2] for r in split_records(config, config.data.train_split)]
  kinds = {type(x) for x in labels}
  if kinds == {int}:
    return ()
  if kinds == {str}:
    return tuple(sorted(set(labels)))
  found = sorted(k.__name__ for k in kinds)
  raise ValueError(f'Labels must be all ints or all strings; found {found}.')


def label_ids(labels: list, names: tuple[str, ...], num_labels: int) -> np.ndarray:
  """Labels -> int32 ids in [0, num_labels) (a clear error for any that is not)."""
  if num_labels <= 0:
    raise ValueError('task classification needs --config.model.num_labels > 0 (the number '
                     'of classes).')
  if names:
    if len(names) != num_labels:
      raise ValueError(f'The data has {len(names)} labels {list(names)[:10]} but '
                       f'model.num_labels={num_labels}; set --config.model.num_labels='
                       f'{len(names)}.')
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({str(x) for x in labels if x not in index})
    if unknown:
      raise ValueError(f'Labels {unknown[:10]} are not among the label names {list(names)} '
                       '(those of the training records, or task.labels).')
    return np.array([index[x] for x in labels], np.int32)
  if not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
    raise ValueError('Labels must be all ints or all strings (or set task.labels).')
  ids = np.array(labels, np.int64)
  if ids.size and (ids.min() < 0 or ids.max() >= num_labels):
    raise ValueError(f'Int labels must lie in [0, model.num_labels={num_labels}); found '
                     f'{int(ids.min())}..{int(ids.max())}. Set --config.model.num_labels='
                     f'{int(ids.max()) + 1} (or fix the labels).')
  return ids.astype(np.int32)


# -- tokens ---------------------------------------------------------------------------

def _truncate(la: int, lb: int, budget: int) -> tuple[int, int]:
  """Lengths of a pair after transformers' longest_first truncation to `budget` tokens:
  one token at a time from the longer text (from b on ties)."""
  excess = max(0, la + lb - budget)
  cut = min(excess, abs(la - lb))
  la, lb = (la - cut, lb) if la > lb else (la, lb - cut)
  excess -= cut
  return la - excess // 2, lb - (excess + 1) // 2


@dataclasses.dataclass
class Examples:
  """Tokenised examples, padded to T."""
  inputs: np.ndarray  # int32 [N, T]
  token_types: np.ndarray  # int32 [N, T]
  lengths: np.ndarray  # int32 [N]
  labels: np.ndarray  # int32 [N]
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.labels)

  def batch(self, rows_B) -> Batch:
    """The examples `rows_B` (ids outside [0, len) give padding examples of weight 0)."""
    rows_B = np.asarray(rows_B, np.int64)
    valid_B = (rows_B >= 0) & (rows_B < len(self))
    idx_B = np.where(valid_B, rows_B, 0)
    t = self.inputs.shape[1]
    seg_BT = ((np.arange(t) < self.lengths[idx_B][:, None]) & valid_B[:, None]).astype(np.int32)
    return dict(inputs=np.where(seg_BT > 0, self.inputs[idx_B], self.pad_id).astype(np.int32),
                token_types=self.token_types[idx_B] * seg_BT, segment_ids=seg_BT,
                labels=np.where(valid_B, self.labels[idx_B], 0).astype(np.int32),
                weights=valid_B.astype(np.float32))


def encode(records: list, ids: np.ndarray, tokenizer, max_len: int) -> Examples:
  """Tokenised, truncated and padded examples (layout in the module docstring)."""
  cls, sep = find_symbol(tokenizer, '[CLS]'), find_symbol(tokenizer, '[SEP]')
  if cls is not None and sep is not None:
    start, end = [cls], [sep]
  else:
    if tokenizer.eos_id is None:
      raise ValueError(f'The {tokenizer.kind} tokenizer has neither [CLS]/[SEP] nor an eos '
                       'id to end each text with; use a tokenizer that has one.')
    start = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    end = [tokenizer.eos_id]
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  texts_a = tokenizer.encode_batch_np([r[0] for r in records])
  texts_b = tokenizer.encode_batch_np([r[1] or '' for r in records])
  n = len(records)
  inputs = np.full((n, max_len), pad, np.int32)
  types = np.zeros((n, max_len), np.int32)
  lengths = np.zeros(n, np.int32)
  for i, (record, a, b) in enumerate(zip(records, texts_a, texts_b)):
    pair = record[1] is not None
    specials = len(start) + len(end) * (2 if pair else 1)
    if max_len <= specials:
      raise ValueError(f'model.max_len={max_len} leaves no room for text.')
    la, lb = _truncate(len(a), len(b) if pair else 0, max_len - specials)
    first = np.concatenate([start, a[:la], end]).astype(np.int32)
    second = np.concatenate([b[:lb], end]).astype(np.int32) if pair else np.zeros(0, np.int32)
    k = len(first) + len(second)
    inputs[i, :k] = np.concatenate([first, second])
    types[i, len(first):k] = 1
    lengths[i] = k
  return Examples(inputs, types, lengths, ids, pad)


def load_examples(config, tokenizer, split: str, names: tuple[str, ...]) -> Examples:
  records = split_records(config, split)
  ids = label_ids([r[2] for r in records], names, config.model.num_labels)
  return encode(records, ids, tokenizer, config.model.max_len)


# -- iterators (lm/data/pipeline.py: the packed rows' order, sharding and Grain dataset) --

def make_train_iter(config, tokenizer, names: tuple[str, ...], process_index=None,
                    process_count=None):
  """Endless, shuffled, resumable (get_state/set_state) batches of this process."""
  examples = load_examples(config, tokenizer, config.data.train_split, names)
  return pipeline.examples_train_iter(config, examples, process_index, process_count)


def make_eval_iter(config, tokenizer, names: tuple[str, ...], num_batches: int | None = None,
                   process_index=None, process_count=None):
  """One ordered pass over the eval examples (capped at num_batches: spread evenly)."""
  examples = load_examples(config, tokenizer, config.data.eval_split, names)
  return pipeline.examples_eval_iter(config, examples, num_batches, process_index,
                                     process_count)
