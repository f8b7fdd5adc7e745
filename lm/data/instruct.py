"""Instruction data for supervised fine-tuning (task sft): JSON lines -> packed rows -> batches.

Records, one JSON object a line (data.path: a file, a directory, a glob or a comma list, as
for text_files; data.eval_path the eval records, or when it is empty the last
data.val_fraction of data.path's records; data.path "" -> the embedded set of
lm/data/finetune_sets.py, task.finetune_examples / task.finetune_eval):
  {"prompt": str, "completion": str}
  {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}

prompt/completion records are plain text, as TRL's prompt-completion format: the prompt's
tokens (BOS first where the tokenizer's config adds one, as lm.infer.sampling.encode_prompt
does for generation), untrained, then the completion's tokens and EOS, trained. No chat
template: the prompt carries its own cue (the embedded set ends prompts with a newline);
write messages records to go through the template.

messages records go through a chat template, a Jinja template as transformers defines
`chat_template` (rendered as apply_chat_template does: a sandbox with trim_blocks and
lstrip_blocks, variables messages, add_generation_prompt, bos_token, eos_token). Which one:
task.chat_template (the text, or a file holding it), else the tokenizer's own (an imported
Hugging Face tokenizer's chat_template), else DEFAULT_TEMPLATE ("User: ...\\nAssistant:
...<eos>"). bos_token / eos_token render as private markers that become the tokenizer's BOS /
EOS ids, so a template works with tokenizers that have no text for them (bytes).
The loss mask is exact token by token: assistant turn i trains exactly the text
render(messages[:i+1]) minus its prefix render(messages[:i], add_generation_prompt=True) (the
template must be prefix-stable; the text between turns is untrained); the pieces are
tokenised separately and concatenated, so the boundaries are exact and the tokens before a
turn are what generation is prompted with. Messages after the last assistant turn are
dropped (nothing to train).

An example longer than a row (train.seq_len, else model.max_len) is cut to it (counted,
logged once); one whose trained tokens would all be cut is an error. Packing puts examples greedily, in order,
into rows of that many tokens, never splitting one: each its own segment id (1, 2, ...;
0 = padding) with positions from 0, so attention never crosses examples. Batches are
CausalLM's:
  inputs, targets (the next token of the same example), segment_ids, positions  int32 [B, T]
  weights  float32 [B, T]: 1 where the target is a trained token of the same example
An encoder-decoder (T5) reads the prompt (all tokens before the last trained piece) in its
encoder and learns the target (that piece: the completion + EOS, or the last assistant
turn) in its decoder; examples pack side by side in both (lm.data.instruct.Seq2SeqExamples,
SpanCorruption's batch keys plus decoder_positions).
Training visits the examples in a permutation per epoch drawn from (train.seed, epoch), packed
per epoch, endless and resumable (get_state/set_state); eval is one ordered pass over rows
packed in file order (num_batches caps it, spread over the split), padded with empty rows.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys

from absl import logging
from etils import epath
import numpy as np

from lm.data import finetune_sets, pipeline, sources

Batch = dict[str, np.ndarray]
ROLES = ('system', 'user', 'assistant')
# Stand-ins for bos_token / eos_token in rendered text (private-use code points).
BOS_MARK, EOS_MARK = '\ue000<bos>\ue001', '\ue000<eos>\ue001'
_MARKS = re.compile(f'({re.escape(BOS_MARK)}|{re.escape(EOS_MARK)})')
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% else %}{{ 'User: ' + message['content'] + '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")


# -- records --------------------------------------------------------------------------

@dataclasses.dataclass
class Record:
  where: str  # file:line, for errors
  prompt: str | None = None
  completion: str | None = None
  messages: list | None = None


def parse_record(record, where: str) -> Record:
  """A checked Record of one decoded JSON value."""
  if isinstance(record, dict) and isinstance(record.get('messages'), list):
    messages = record['messages']
    for j, m in enumerate(messages):
      if not (isinstance(m, dict) and isinstance(m.get('content'), str) and 'role' in m):
        raise ValueError(f'{where}: message {j} is not {{"role": ..., "content": "..."}}.')
      if m['role'] not in ROLES:
        raise ValueError(f'{where}: message {j} has the unknown role {m["role"]!r}; roles '
                         f'are {", ".join(ROLES)} (map others, e.g. "human" -> "user").')
    if not any(m['role'] == 'assistant' for m in messages):
      raise ValueError(f'{where}: the messages have no assistant turn, so nothing to train; '
                       'add one or drop the record.')
    return Record(where, messages=[dict(role=m['role'], content=m['content'])
                                   for m in messages])
  if (isinstance(record, dict) and isinstance(record.get('prompt'), str)
      and isinstance(record.get('completion'), str)):
    return Record(where, prompt=record['prompt'], completion=record['completion'])
  fields = sorted(record) if isinstance(record, dict) else type(record).__name__
  raise ValueError(f'{where} is neither {{"prompt": str, "completion": str}} nor {{"messages": '
                   f'[{{"role": ..., "content": ...}}, ...]}} (found {fields}); fix the line '
                   'or rename its fields.')


def read_records(path: str) -> list[Record]:
  """The records of every JSON line of the files `path` names."""
  out = [parse_record(value, where) for where, value in sources.json_records(path)]
  if not out:
    raise ValueError(f'data.path {path!r} holds no instruction records.')
  return out


def split_records(config, train: bool) -> list[Record]:
  """The training or eval records: data.path / data.eval_path, the last data.val_fraction of
  data.path's, or the embedded set when data.path is ""."""
  if not config.data.path:
    t, which = config.task, config.task.get('finetune_set', 'tasks')
    if which == 'rag':  # the reading set of lm/rag/corpus.py
      from lm.rag import corpus  # lazy: only this set needs it
      pair = corpus.reader_sets(t.finetune_examples, t.finetune_eval)
    elif which == 'tasks':
      pair = finetune_sets.make(t.finetune_examples, t.finetune_eval)
    else:
      raise ValueError(f'Unknown task.finetune_set {which!r}; known: tasks, rag.')
    return [Record(f'embedded set {"train" if train else "eval"}[{i}]', **r)
            for i, r in enumerate(pair[0 if train else 1])]
  if config.data.eval_path:
    return read_records(config.data.path if train else config.data.eval_path)
  from lm.data import labeled  # the same hold-out as labelled records
  return labeled.hold_out(read_records(config.data.path), config, train)


# -- chat templates -------------------------------------------------------------------

class ChatTemplate:
  """A transformers-style Jinja chat template."""

  def __init__(self, source: str, origin: str = 'the chat template'):
    try:
      import jinja2
      from jinja2 import ext, sandbox
    except ImportError:
      raise ImportError('Chat templates need jinja2: pip install jinja2.') from None

    class Generation(ext.Extension):  # transformers' {% generation %} marks: rendered as is
      tags = {'generation'}

      def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(('name:endgeneration',), drop_needle=True)

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[ext.loopcontrols, Generation])
    env.filters['tojson'] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals['raise_exception'] = raise_exception
    self.origin, self.source = origin, source
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f'{origin} is not a valid Jinja template (line {e.lineno}: '
                       f'{e.message}).') from None

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                 bos_token=BOS_MARK, eos_token=EOS_MARK)


_DEFAULT = []


def default_template() -> ChatTemplate:
  if not _DEFAULT:
    _DEFAULT.append(ChatTemplate(DEFAULT_TEMPLATE, 'the default chat template'))
  return _DEFAULT[0]


def tokenizer_template(tokenizer) -> str | None:
  """The tokenizer's own chat template: its `chat_template` attribute, else the files of an
  imported Hugging Face tokenizer's directory (chat_template.jinja, chat_template.json,
  tokenizer_config.json); a named set gives its 'default' (as transformers)."""
  template = getattr(tokenizer, 'chat_template', None)
  directory = getattr(tokenizer, 'directory', None)
  if template is None and directory is not None:
    d = pathlib.Path(directory)
    if (d / 'chat_template.jinja').exists():
      template = (d / 'chat_template.jinja').read_text(encoding='utf-8')
    else:
      for name in ('chat_template.json', 'tokenizer_config.json'):
        if (d / name).exists():
          template = json.loads((d / name).read_text(encoding='utf-8')).get('chat_template')
          if template:
            break
  if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
    template = {t.get('name'): t.get('template') for t in template if isinstance(t, dict)}
  if isinstance(template, dict):
    template = template.get('default')
  return template if isinstance(template, str) and template else None


def chat_template(config, tokenizer) -> ChatTemplate:
  """task.chat_template (text or a file), else the tokenizer's, else DEFAULT_TEMPLATE."""
  source = config.task.get('chat_template', '')
  if source:
    if '{{' in source or '{%' in source:
      return ChatTemplate(source, 'task.chat_template')
    path = epath.Path(os.path.expanduser(source))
    if not path.exists():
      raise ValueError(f'task.chat_template={source!r} is neither a Jinja template (it has no '
                       '"{{" or "{%") nor an existing file.')
    return ChatTemplate(path.read_text(), f'task.chat_template file {source}')
  own = tokenizer_template(tokenizer)
  if own:
    return ChatTemplate(own, f"the {tokenizer.kind} tokenizer's chat_template")
  return default_template()


# -- tokens ---------------------------------------------------------------------------

def _special(tokenizer, name: str, why: str) -> int:
  i = getattr(tokenizer, f'{name}_id', None)
  if i is None:
    raise ValueError(f'{why} needs the tokenizer\'s {name.upper()} id; the {tokenizer.kind} '
                     'tokenizer has none (use bytes, sentencepiece or a Hugging Face one).')
  return i


def encode_text(tokenizer, text: str) -> np.ndarray:
  """Token ids of rendered text: its BOS/EOS markers become the tokenizer's ids."""
  parts = [np.zeros(0, np.int32)]
  for piece in _MARKS.split(text):
    if piece == BOS_MARK:
      parts.append(np.array([_special(tokenizer, 'bos', 'The chat template')], np.int32))
    elif piece == EOS_MARK:
      parts.append(np.array([_special(tokenizer, 'eos', 'The chat template')], np.int32))
    elif piece:
      parts.append(tokenizer.encode_np(piece))
  return np.concatenate(parts).astype(np.int32)


def segments(record: Record, template: ChatTemplate) -> list[tuple[str, bool]]:
  """(text, trained) pieces of a messages record, in order (module docstring)."""
  messages = record.messages
  last = max(i for i, m in enumerate(messages) if m['role'] == 'assistant')
  out, done = [], ''
  for i in range(last + 1):
    if messages[i]['role'] != 'assistant':
      continue
    prefix = template.render(messages[:i], add_generation_prompt=True)
    full = template.render(messages[:i + 1])
    if not (prefix.startswith(done) and full.startswith(prefix)):
      raise ValueError(
          f'{record.where}: {template.origin} is not prefix-stable: rendering the messages '
          f'up to assistant turn {i} (with the generation prompt) does not extend the '
          'rendering before it, so the trained tokens cannot be cut out exactly. Give a '
          'template that renders each turn after the previous ones (--config.task.'
          'chat_template).')
    out += [(prefix[len(done):], False), (full[len(prefix):], True)]
    done = full
  return out


def encode_record(record: Record, tokenizer, template=None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], trained bool [L]) of a record. template: for messages records, a
  ChatTemplate or a callable returning one (None: DEFAULT_TEMPLATE)."""
  if record.messages is None:
    add_bos = tokenizer.bos_id is not None and bool(getattr(tokenizer, 'default_add_bos', False))
    prompt = tokenizer.encode_np(record.prompt, add_bos=add_bos)
    if not len(prompt):
      raise ValueError(f'{record.where}: the prompt is empty; the first completion token needs '
                       'a token before it.')
    eos = _special(tokenizer, 'eos', 'Ending each completion')
    completion = np.append(tokenizer.encode_np(record.completion), eos).astype(np.int32)
    pieces = [(prompt, False), (completion, True)]
  else:
    template = template() if callable(template) else template or default_template()
    pieces = [(encode_text(tokenizer, text), trained)
              for text, trained in segments(record, template)]
  tokens = np.concatenate([p for p, _ in pieces]).astype(np.int32)
  trained = np.concatenate([np.full(len(p), t) for p, t in pieces]).astype(bool)
  if len(trained):
    trained[0] = False  # nothing before it to predict it from
  return tokens, trained


def prompt_and_target(record: Record, tokenizer, template=None) -> tuple[list[int], list[int]]:
  """(prompt ids, target ids) for generation: the target is the record's last trained
  piece (the completion + EOS; a messages record's last assistant turn), the prompt all
  tokens before it."""
  tokens, trained = encode_record(record, tokenizer, template)
  end = int(np.nonzero(trained)[0][-1]) + 1
  start = end
  while start > 0 and trained[start - 1]:
    start -= 1
  return tokens[:start].tolist(), tokens[start:end].tolist()


@dataclasses.dataclass
class Examples:
  """Tokenised examples back to back; batch() packs given rows of example ids."""
  tokens: np.ndarray  # int32 [N]
  trained: np.ndarray  # bool [N]
  offsets: np.ndarray  # int64 [E+1]: example e is [offsets[e], offsets[e+1])
  seq_len: int  # T
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def batch(self, rows: list[np.ndarray]) -> Batch:
    """Rows of example ids (each fits in T tokens) -> a batch (module docstring)."""
    b, t = len(rows), self.seq_len
    inputs_BT = np.full((b, t), self.pad_id, np.int32)
    targets_BT = np.full((b, t), self.pad_id, np.int32)
    seg_BT, pos_BT = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    weights_BT = np.zeros((b, t), np.float32)
    for r, ids in enumerate(rows):
      at = 0
      for s, e in enumerate(ids, 1):
        lo, hi = self.offsets[e], self.offsets[e + 1]
        n = hi - lo
        inputs_BT[r, at:at + n] = self.tokens[lo:hi]
        targets_BT[r, at:at + n - 1] = self.tokens[lo + 1:hi]
        weights_BT[r, at:at + n - 1] = self.trained[lo + 1:hi]
        seg_BT[r, at:at + n], pos_BT[r, at:at + n] = s, np.arange(n)
        at += n
    return dict(inputs=inputs_BT, targets=targets_BT, segment_ids=seg_BT, positions=pos_BT,
                weights=weights_BT)


@dataclasses.dataclass
class Seq2SeqExamples:
  """An encoder-decoder's examples (T5): the prompt is the encoder's input, the trained
  target (completion + EOS; a messages record's last assistant turn) the decoder's."""
  inputs: list  # int32 arrays: the prompts
  targets: list  # int32 arrays: the targets, EOS last
  seq_len: tuple[int, int]  # (S, T): model.max_len, model.max_target_len
  start_id: int  # model.decoder_start_id
  pad_id: int = 0

  def __len__(self) -> int:
    return len(self.inputs)

  @property
  def lengths(self) -> np.ndarray:
    """[N, 2]: each example's encoder and decoder tokens (pack's two budgets)."""
    return np.array([[len(a), len(b)] for a, b in zip(self.inputs, self.targets)], np.int64)

  def batch(self, rows: list[np.ndarray]) -> Batch:
    """Rows of example ids, packed side by side in the encoder and the decoder (segment k
    of the decoder reads segment k of the encoder), as SpanCorruption's batches."""
    (s, t), b = self.seq_len, len(rows)
    out = dict(encoder_inputs=np.full((b, s), self.pad_id, np.int32),
               encoder_segment_ids=np.zeros((b, s), np.int32),
               decoder_inputs=np.full((b, t), self.pad_id, np.int32),
               decoder_targets=np.full((b, t), self.pad_id, np.int32),
               decoder_segment_ids=np.zeros((b, t), np.int32),
               decoder_positions=np.zeros((b, t), np.int32),
               decoder_weights=np.zeros((b, t), np.float32))
    for r, ids in enumerate(rows):
      at_s = at_t = 0
      for seg, e in enumerate(ids, 1):
        x, y = self.inputs[e], self.targets[e]
        out['encoder_inputs'][r, at_s:at_s + len(x)] = x
        out['encoder_segment_ids'][r, at_s:at_s + len(x)] = seg
        out['decoder_inputs'][r, at_t:at_t + len(y)] = np.append(self.start_id, y[:-1])
        out['decoder_targets'][r, at_t:at_t + len(y)] = y
        out['decoder_segment_ids'][r, at_t:at_t + len(y)] = seg
        out['decoder_positions'][r, at_t:at_t + len(y)] = np.arange(len(y))
        out['decoder_weights'][r, at_t:at_t + len(y)] = 1.0
        at_s, at_t = at_s + len(x), at_t + len(y)
    return out


def encode_seq2seq(records: list[Record], tokenizer, template, seq_len: tuple[int, int],
                   start_id: int) -> Seq2SeqExamples:
  """Seq2SeqExamples of records: prompts cut to S tokens from the left (the end of a
  prompt is what the answer follows), targets to T (both counted, logged once)."""
  if not records:
    raise ValueError('No instruction records (task.finetune_examples / finetune_eval 0?).')
  inputs, targets, cut = [], [], 0
  for record in records:
    prompt, target = prompt_and_target(record, tokenizer, template)
    if not target:
      raise ValueError(f'{record.where} has no token to train (an empty completion).')
    cut += len(prompt) > seq_len[0] or len(target) > seq_len[1]
    inputs.append(np.array(prompt[-seq_len[0]:], np.int32))
    targets.append(np.array(target[:seq_len[1]], np.int32))
  if cut:
    logging.warning('%d of %d instruction examples are longer than model.max_len (prompt) or '
                    'model.max_target_len (target) and were cut.', cut, len(records))
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return Seq2SeqExamples(inputs, targets, seq_len, start_id, pad)


def encode(records: list[Record], tokenizer, template, seq_len: int) -> Examples:
  """Tokenised examples, each cut to seq_len tokens (module docstring)."""
  if not records:
    raise ValueError('No instruction records (task.finetune_examples / finetune_eval 0?).')
  tokens, trained, cut = [], [], 0
  for record in records:
    x, w = encode_record(record, tokenizer, template)
    if not w.any():
      raise ValueError(f'{record.where} has no token to train (an empty completion).')
    if len(x) > seq_len:
      if not w[:seq_len].any():
        raise ValueError(f'{record.where}: the prompt alone has {int(np.argmax(w))} tokens, so '
                         f'rows of {seq_len} tokens cut off the whole completion; raise '
                         'train.seq_len (or model.max_len) or shorten the prompt.')
      x, w, cut = x[:seq_len], w[:seq_len], cut + 1
    tokens.append(x)
    trained.append(w)
  if cut:
    logging.warning('%d of %d instruction examples are longer than rows of %d tokens '
                    'and were cut to it.', cut, len(records), seq_len)
  offsets = np.concatenate([[0], np.cumsum([len(x) for x in tokens])]).astype(np.int64)
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  return Examples(np.concatenate(tokens).astype(np.int32), np.concatenate(trained), offsets,
                  seq_len, pad)


def load_examples(config, tokenizer, train: bool) -> Examples:
  records = split_records(config, train)
  cache = []

  def template():  # resolved only when a messages record needs it (jinja2 is optional)
    if not cache:
      cache.append(chat_template(config, tokenizer))
    return cache[0]
  m = config.model
  if m.get('family') == 'encdec':
    return encode_seq2seq(records, tokenizer, template, (m.max_len, m.max_target_len),
                          m.decoder_start_id)
  from lm import config as lm_config  # lazy: lm.config imports lm.data
  return encode(records, tokenizer, template, lm_config.row_length(config))


def pack(lengths: np.ndarray, order: np.ndarray, seq_len) -> list[np.ndarray]:
  """Rows of example ids: the examples of `order`, in order, greedily into rows of
  seq_len tokens (each length <= seq_len; a loop over Python ints: ~0.2 us an example).
  An encoder-decoder packs under two budgets: lengths [N, 2], seq_len (S, T)."""
  if np.ndim(lengths) == 2:  # a new row when either side would overflow
    (s, t), starts = seq_len, []
    fill_s, fill_t = s, t
    for i, (a, b) in enumerate(lengths[order].tolist()):
      if fill_s + a > s or fill_t + b > t:
        starts.append(i)
        fill_s, fill_t = a, b
      else:
        fill_s, fill_t = fill_s + a, fill_t + b
    starts.append(len(order))
    return [order[a:b] for a, b in zip(starts[:-1], starts[1:])]
  starts, fill = [], seq_len
  for i, n in enumerate(lengths[order].tolist()):
    if fill + n > seq_len:
      starts.append(i)
      fill = n
    else:
      fill += n
  starts.append(len(order))
  return [order[a:b] for a, b in zip(starts[:-1], starts[1:])]


# -- iterators --------------------------------------------------------------------------

# pylint: disable-next=protected-access  (pipeline's row order, sharding and Grain dataset)
_Order, _shard, _dataset = pipeline._Order, pipeline._shard, pipeline._dataset
_EMPTY = np.zeros(0, np.int64)


@dataclasses.dataclass
class _TrainOrder:
  """The rows of local batch k: the row stream is epoch 0's packed rows, then epoch 1's,
  ...; epoch e packs the examples in a permutation drawn from (seed, e). Global batch k is
  stream rows [kB, (k+1)B), process p taking those = p mod count (as pipeline._Order).
  Stateless given k: resuming needs nothing but k."""
  lengths: np.ndarray
  seq_len: int
  local_batch: int
  index: int
  count: int
  seed: int | None
  _starts: list = dataclasses.field(default_factory=lambda: [0])  # first row of epoch e
  _rows: dict = dataclasses.field(default_factory=dict)

  def epoch_rows(self, epoch: int) -> list[np.ndarray]:
    if epoch not in self._rows:
      if len(self._rows) >= 2:  # a batch spans at most two epochs (but for tiny sets)
        self._rows.pop(min(self._rows))
      n = len(self.lengths)
      order = (np.arange(n) if self.seed is None
               else np.random.default_rng([self.seed, epoch]).permutation(n))
      self._rows[epoch] = pack(self.lengths, order, self.seq_len)
    return self._rows[epoch]

  def __call__(self, k: int) -> list[np.ndarray]:
    pos_B = (k * self.local_batch + np.arange(self.local_batch)) * self.count + self.index
    while self._starts[-1] <= pos_B.max():
      self._starts.append(self._starts[-1] + len(self.epoch_rows(len(self._starts) - 1)))
    epoch_B = np.searchsorted(self._starts, pos_B, side='right') - 1
    return [self.epoch_rows(int(e))[int(p - self._starts[e])] for e, p in zip(epoch_B, pos_B)]


@dataclasses.dataclass
class _EvalOrder:
  """pipeline._Order over fixed rows; positions past the end give empty rows."""
  order: _Order
  rows: list

  def __call__(self, k: int) -> list[np.ndarray]:
    return [self.rows[i] if 0 <= i < len(self.rows) else _EMPTY for i in self.order(k)]


def make_train_iter(config, tokenizer, process_index=None, process_count=None):
  """Endless, shuffled, resumable (get_state/set_state) batches of this process."""
  examples = load_examples(config, tokenizer, True)
  index, count, local_batch = _shard(config, process_index, process_count)
  seed = config.train.seed % 2**32
  order = _TrainOrder(examples.lengths, examples.seq_len, local_batch, index, count,
                      seed if config.data.shuffle else None)
  return iter(_dataset(order, examples, sys.maxsize, None, seed, config))


def make_eval_iter(config, tokenizer, num_batches: int | None = None, process_index=None,
                   process_count=None):
  """One ordered pass over the eval examples packed in order (capped at num_batches:
  rows spread evenly over the split); the last batch is padded with empty rows."""
  examples = load_examples(config, tokenizer, False)
  rows = pack(examples.lengths, np.arange(len(examples)), examples.seq_len)
  order, n, _ = pipeline.eval_order(config, len(rows), num_batches, process_index,
                                    process_count)
  return _dataset(_EvalOrder(order, rows), examples, n, None, 0, config)
