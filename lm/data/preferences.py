"""Preference pairs for alignment (tasks dpo and reward): JSON lines -> token rows -> batches.

Records, one JSON object a line (data.path: a file, a directory, a glob or a comma list, as
for text_files; data.eval_path the held-out pairs, or when it is empty the last
data.val_fraction of data.path's records, labeled.hold_out; data.path "" -> the embedded
verifiable set below):
  {"prompt": str, "chosen": str, "rejected": str}
  {"messages": [...context...], "chosen": str | [messages], "rejected": str | [messages]}

A prompt record is plain text as instruct.py's prompt/completion records (the SFT model saw
exactly these tokens): the prompt (BOS first where the tokenizer adds one) then the response
and EOS. A messages record goes through the run's chat template (instruct.chat_template): a
string response is one assistant turn after the context, a list is appended to the context
as is (it needs an assistant turn). The trained tokens (the log-prob / loss mask) are the
response's only, token by token as instruct.encode_record cuts them: assistant turns inside
the context are never trained.

Bad input is one error naming file and line: a missing or non-string field, an empty
response, chosen == rejected. A pair whose prompt + response (either side) is longer than a
row (train.seq_len, else model.max_len) is skipped, counted and reported (printed), never cut
(a cut response would compare truncated log-probs); all pairs skipped is an error.

The embedded set (data.path ""): lm/data/finetune_sets.py's examples with the same seeds and
split (task.finetune_examples train, task.finetune_eval held out, never overlapping); chosen
is the correct answer, rejected an incorrect one of the same kind, drawn deterministically:
add: another example's sum (a tiny model cannot tell 95 from 96: that pair needs the
arithmetic itself); reverse: the words in their given order or with two swapped; sort: the
words unsorted or with two neighbours swapped; field: another field's value.

Batches: one pair per example, both sides as instruct's rows of CausalLM ([B, 2, T]; index 0
chosen, 1 rejected; a row per side, never packed):
  inputs, targets, segment_ids, positions  int32 [B, 2, T]
  weights  float32 [B, 2, T]: 1 where the target is a response token
  ref_logps  float32 [B, 2] (only with precomputed reference log-probs: their sums)
Padding pairs of the last eval batch have all weights 0. Training visits the pairs in a
permutation per epoch from train.seed and resumes exactly (pipeline._Order).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from lm.data import finetune_sets, instruct, pipeline, sources

Batch = dict[str, np.ndarray]
KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


@dataclasses.dataclass
class Pair:
  where: str  # file:line, for errors
  chosen: instruct.Record
  rejected: instruct.Record
  context_turns: int = 0  # assistant turns inside a messages context (never trained)


# -- records --------------------------------------------------------------------------

def _response(value, where: str, side: str, chat: bool):
  if isinstance(value, str):
    if not value.strip():
      raise ValueError(f'{where}: "{side}" is empty; every response needs text (drop the '
                       'pair or fill it in).')
    return [dict(role='assistant', content=value)] if chat else value
  if chat and isinstance(value, list):
    instruct.parse_record({'messages': value}, f'{where} ("{side}")')  # roles, assistant turn
    if not any(m['content'].strip() for m in value if m['role'] == 'assistant'):
      raise ValueError(f'{where}: "{side}" has only empty assistant turns.')
    return [dict(role=m['role'], content=m['content']) for m in value]
  kind = 'a string or a list of messages' if chat else 'a string'
  raise ValueError(f'{where}: "{side}" must be {kind}, not {type(value).__name__}.')


def parse_pair(record, where: str) -> Pair:
  """A checked Pair of one decoded JSON value (module docstring)."""
  if not isinstance(record, dict) or 'chosen' not in record or 'rejected' not in record or (
      'prompt' not in record and 'messages' not in record):
    fields = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f'{where} is not a preference pair {{"prompt" (or "messages"), "chosen", '
                     f'"rejected"}} (found {fields}); fix the line or rename its fields.')
  chat = 'messages' in record
  chosen = _response(record['chosen'], where, 'chosen', chat)
  rejected = _response(record['rejected'], where, 'rejected', chat)
  if chosen == rejected:
    raise ValueError(f'{where}: "chosen" equals "rejected", so there is no preference; drop '
                     'the pair.')
  if not chat:
    if not isinstance(record['prompt'], str):
      raise ValueError(f'{where}: "prompt" must be a string.')
    return Pair(where, instruct.Record(where, prompt=record['prompt'], completion=chosen),
                instruct.Record(where, prompt=record['prompt'], completion=rejected))
  context = record['messages']
  if not isinstance(context, list):
    raise ValueError(f'{where}: "messages" must be a list of {{"role", "content"}}.')
  if context:  # the same checks as instruct's records (roles, contents)
    instruct.parse_record({'messages': context + [dict(role='assistant', content='x')]}, where)
  context = [dict(role=m['role'], content=m['content']) for m in context]
  turns = sum(m['role'] == 'assistant' for m in context)
  return Pair(where, instruct.Record(where, messages=context + chosen),
              instruct.Record(where, messages=context + rejected), turns)


def read_pairs(path: str) -> list[Pair]:
  out = [parse_pair(value, where) for where, value in sources.json_records(path)]
  if not out:
    raise ValueError(f'data.path {path!r} holds no preference pairs.')
  return out


# -- the embedded verifiable set ---------------------------------------------------------

def _swap(words: list[str], rng) -> list[str]:
  i = int(rng.integers(len(words) - 1))
  return words[:i] + [words[i + 1], words[i]] + words[i + 2:]


def wrong_answer(example: dict, rng: np.random.Generator, sums: list[str]) -> str:
  """An incorrect answer to one of finetune_sets' examples, of the same kind (sums: the
  split's add answers, one of which, not this one's, is a wrong sum)."""
  prompt, answer = example['prompt'], example['completion']
  kind = prompt.split(' ', 1)[0].rstrip(':')
  if kind == 'add':
    others = [s for s in sums[:64] if s != answer]
    return others[int(rng.integers(len(others)))]
  if kind in ('reverse', 'sort'):
    given = prompt.split(':', 1)[1].split()
    out = given if rng.random() < 0.5 else _swap(answer.split(), rng)
    return ' '.join(out if out != answer.split() else _swap(answer.split(), rng))
  if kind == 'field':
    values = [v.strip("'") for v in (kv.split('=')[1] for kv in
                                     prompt.split('(', 1)[1].rstrip(')\n').split(', '))]
    others = [v for v in values if v != answer]
    return others[int(rng.integers(len(others)))]
  raise ValueError(f'No wrong answer for {prompt!r}.')


def embedded_pairs(num_train: int, num_eval: int, seed: int = 0) -> tuple[list, list]:
  """(train, eval) lists of {"prompt", "chosen", "rejected"} from finetune_sets.make(num_train,
  num_eval, seed): the same prompts and split as the SFT set."""
  out = []
  for part, examples in zip(('train', 'eval'), finetune_sets.make(num_train, num_eval, seed)):
    rng = np.random.default_rng([seed, 20261207, part == 'eval'])
    sums = [e['completion'] for e in examples if e['prompt'].startswith('add')]
    out.append([dict(prompt=e['prompt'], chosen=e['completion'],
                     rejected=wrong_answer(e, rng, sums)) for e in examples])
  return out[0], out[1]


def split_pairs(config, train: bool) -> list[Pair]:
  if not config.data.path:
    t = config.task
    pairs = embedded_pairs(t.finetune_examples, t.finetune_eval)[0 if train else 1]
    name = 'train' if train else 'eval'
    return [parse_pair(r, f'embedded preference set {name}[{i}]') for i, r in enumerate(pairs)]
  if config.data.eval_path:
    return read_pairs(config.data.path if train else config.data.eval_path)
  from lm.data import labeled  # the same hold-out as labelled and instruction records
  return labeled.hold_out(read_pairs(config.data.path), config, train)


# -- tokens ---------------------------------------------------------------------------

def encode_side(record: instruct.Record, context_turns: int, tokenizer,
                template=None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], trained bool [L]): instruct.encode_record's, with the context's own
  assistant turns untrained (only the response is)."""
  if record.messages is None or not context_turns:
    return instruct.encode_record(record, tokenizer, template)
  template = template() if callable(template) else template or instruct.default_template()
  pieces, turn = [], 0
  for text, trained in instruct.segments(record, template):
    if trained:
      turn += 1
    pieces.append((instruct.encode_text(tokenizer, text), trained and turn > context_turns))
  tokens = np.concatenate([p for p, _ in pieces]).astype(np.int32)
  trained = np.concatenate([np.full(len(p), t) for p, t in pieces]).astype(bool)
  trained[0] = False
  return tokens, trained


@dataclasses.dataclass
class PairExamples:
  """Tokenised pairs, padded: side 0 chosen, 1 rejected."""
  tokens: np.ndarray  # int32 [N, 2, T]
  trained: np.ndarray  # bool [N, 2, T]
  lengths: np.ndarray  # int32 [N, 2]
  ref_logps: np.ndarray | None = None  # float32 [N, 2]: precomputed reference sums
  pad_id: int = 0
  skipped: int = 0

  def __len__(self) -> int:
    return len(self.lengths)

  def batch(self, rows_B) -> Batch:
    """The pairs `rows_B` (ids outside [0, len) give padding pairs of weight 0)."""
    rows_B = np.asarray(rows_B, np.int64)
    valid_B = (rows_B >= 0) & (rows_B < len(self))
    idx_B = np.where(valid_B, rows_B, 0)
    t = self.tokens.shape[-1]
    len_B2 = np.where(valid_B[:, None], self.lengths[idx_B], 0)
    seg_B2T = (np.arange(t) < len_B2[..., None]).astype(np.int32)
    tokens_B2T = np.where(seg_B2T > 0, self.tokens[idx_B], self.pad_id).astype(np.int32)
    # targets[i] = tokens[i + 1] of the same row; weights: that target is a response token
    next_ok = np.concatenate([seg_B2T[..., 1:], np.zeros_like(seg_B2T[..., :1])], -1) > 0
    targets_B2T = np.where(next_ok, np.roll(tokens_B2T, -1, -1), self.pad_id).astype(np.int32)
    trained_next = np.concatenate([self.trained[idx_B][..., 1:],
                                   np.zeros_like(self.trained[idx_B][..., :1])], -1)
    weights_B2T = (trained_next & next_ok).astype(np.float32)
    out = dict(inputs=tokens_B2T, targets=targets_B2T, segment_ids=seg_B2T,
               positions=(np.arange(t) * seg_B2T).astype(np.int32), weights=weights_B2T)
    if self.ref_logps is not None:
      out['ref_logps'] = np.where(valid_B[:, None], self.ref_logps[idx_B], 0).astype(np.float32)
    return out


def encode(pairs: list[Pair], tokenizer, template, seq_len: int, log=print) -> PairExamples:
  """Tokenised pairs of rows of seq_len tokens; longer pairs skipped, counted, reported."""
  if not pairs:
    raise ValueError('No preference pairs (task.finetune_examples / finetune_eval 0?).')
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  kept, longest = [], 0
  for pair in pairs:
    sides = [encode_side(r, pair.context_turns, tokenizer, template)
             for r in (pair.chosen, pair.rejected)]
    for x, w in sides:
      if not w.any():
        raise ValueError(f'{pair.where}: a response has no token to train.')
    n = max(len(x) for x, _ in sides)
    if n > seq_len:
      longest = max(longest, n)
      continue
    kept.append(sides)
  skipped = len(pairs) - len(kept)
  if skipped:
    log(f'Skipped {skipped} of {len(pairs)} preference pairs whose prompt + response is longer '
        f'than rows of {seq_len} tokens (the longest: {longest}); raise train.seq_len (or '
        'model.max_len) to keep them.')
  if not kept:
    raise ValueError(f'Every one of the {len(pairs)} preference pairs is longer than rows of '
                     f'{seq_len} tokens; raise train.seq_len / model.max_len or shorten them.')
  tokens = np.full((len(kept), 2, seq_len), pad, np.int32)
  trained = np.zeros((len(kept), 2, seq_len), bool)
  lengths = np.zeros((len(kept), 2), np.int32)
  for i, sides in enumerate(kept):
    for s, (x, w) in enumerate(sides):
      tokens[i, s, :len(x)], trained[i, s, :len(x)], lengths[i, s] = x, w, len(x)
  return PairExamples(tokens, trained, lengths, None, pad, skipped)


def load_examples(config, tokenizer, train: bool, log=print) -> PairExamples:
  cache = []

  def template():  # resolved only when a messages record needs it (jinja2 is optional)
    if not cache:
      cache.append(instruct.chat_template(config, tokenizer))
    return cache[0]
  from lm import config as lm_config  # lazy: lm.config imports lm.data
  return encode(split_pairs(config, train), tokenizer, template, lm_config.row_length(config),
                log)


# -- iterators (lm/data/pipeline.py: the order, sharding and Grain dataset) ------------

def make_train_iter(config, examples: PairExamples, process_index=None, process_count=None):
  """Endless, shuffled, resumable (get_state/set_state) batches of this process."""
  return pipeline.examples_train_iter(config, examples, process_index, process_count)


def make_eval_iter(config, examples: PairExamples, num_batches: int | None = None,
                   process_index=None, process_count=None):
  """One ordered pass over the eval pairs (capped at num_batches: spread evenly)."""
  return pipeline.examples_eval_iter(config, examples, num_batches, process_index,
                                     process_count)
