"""Evaluation tasks: what to score (records of one kind) and how (the kind's settings).

A task is named on the command line (`--tasks=NAME,...`) in one of three ways:
  NAME       an embedded task (EMBEDDED below: no files, no network)
  KIND:PATH  a JSON-lines file of one kind, default settings (a .txt file for perplexity,
             a CrowS-Pairs .csv for bias_pairs)
  FILE.yaml  a task file: `kind`, `path` (relative to the YAML's folder) or `tfds` (a
             TFDS catalog name, online) and any settings of Task below, e.g.
               kind: multiple_choice
               path: arc.jsonl
               num_fewshot: 5
               fewshot_path: arc_train.jsonl
               target_delimiter: " "

Record formats, one JSON object per line:
  perplexity       {"text": ...}  (or a plain text file: one document)
  multiple_choice  {"context": ..., "choices": [...], "label": i}
  generation       {"input": ..., "references": [...]}
  classification   {"text": ..., "label": name or id}
  bias_pairs       {"sent_more": ..., "sent_less": ..., "bias_type": ...}  (or the CrowS-Pairs
                   CSV: columns sent_more, sent_less, bias_type)
Every problem in a file is reported with its file and line.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

KINDS = ('perplexity', 'multiple_choice', 'generation', 'classification', 'bias_pairs')
PROBE_FILE = pathlib.Path(__file__).parent / 'data' / 'bias_probe.jsonl'


@dataclasses.dataclass
class Task:
  """A task's records and settings; defaults follow lm-eval-harness where it has one."""
  name: str  # as given on the command line (the results' key)
  kind: str
  path: str = ''  # the records' file ('' when `records` or `tfds` are given)
  records: list | None = None  # parsed records (embedded tasks), else read from path
  # or a TFDS catalog dataset's split (built as array_record on first use: needs the
  # internet once), its features renamed to the record's fields by `fields`, e.g.
  # {text: sentence} for glue/sst2
  tfds: str = ''
  split: str = 'validation'
  fields: dict | None = None
  data_dir: str = ''  # where TFDS builds ('': ~/.cache/lm/tfds)
  # perplexity: windows of max_len tokens every stride tokens (0: the model's context, half)
  max_len: int = 0
  stride: int = 0
  # multiple_choice / generation: the prompt is the few-shot examples, then the record's
  # context; each shot is context + target_delimiter + its answer, joined by fewshot_delimiter
  num_fewshot: int = 0
  fewshot_path: str = ''  # where shots come from ('': the task's own records, never the same)
  target_delimiter: str = ' '
  fewshot_delimiter: str = '\n\n'
  # generation: greedy (num_beams 1) or beam search; the output ends at EOS or a stop string
  max_new_tokens: int = 64
  num_beams: int = 1
  stop: tuple[str, ...] = ()
  use_stemmer: bool = False  # ROUGE's Porter stemmer
  # classification: by the run's classifier head ('head'), or by the log-likelihood of each
  # label word after prompt.format(text=...) + target_delimiter ('label_words')
  method: str = 'auto'  # auto: the head when the model has one
  label_words: dict | None = None  # label name -> word (default: the name itself)
  prompt: str = '{text}'
  # robustness: the task again under each input perturbation (lm/eval/perturb.py specs)
  perturb: tuple[str, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Task {self.name!r}: unknown kind {self.kind!r}; the kinds are '
                       f'{", ".join(KINDS)}.')


def _where(path, line: int) -> str:
  return f'{path}:{line}'


def _need(record: dict, field: str, types, where: str, what: str):
  if field not in record:
    raise ValueError(f'{where}: missing field "{field}" ({what}).')
  value = record[field]
  if not isinstance(value, types) or isinstance(value, bool):
    names = ' or '.join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
    raise ValueError(f'{where}: field "{field}" must be {names}, got {type(value).__name__}.')
  return value


def parse_record(kind: str, record, where: str) -> dict:
  """One record of `kind`, checked (a ValueError naming `where` and the problem)."""
  if not isinstance(record, dict):
    raise ValueError(f'{where}: expected a JSON object, got {type(record).__name__}.')
  if kind == 'perplexity':
    text = _need(record, 'text', str, where, 'the document')
    return dict(text=text)
  if kind == 'multiple_choice':
    context = _need(record, 'context', str, where, 'the question or prompt')
    choices = _need(record, 'choices', list, where, 'the answers to score')
    if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
      raise ValueError(f'{where}: "choices" must be a list of at least 2 non-empty strings.')
    label = _need(record, 'label', int, where, 'the index of the right choice')
    if not 0 <= label < len(choices):
      raise ValueError(f'{where}: label {label} is out of range for {len(choices)} choices '
                       f'(0..{len(choices) - 1}).')
    return dict(context=context, choices=choices, label=label)
  if kind == 'generation':
    text = _need(record, 'input', str, where, 'the prompt')
    refs = _need(record, 'references', list, where, 'the reference outputs')
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
      raise ValueError(f'{where}: "references" must be a non-empty list of non-empty strings.')
    return dict(input=text, references=refs)
  if kind == 'classification':
    text = _need(record, 'text', str, where, 'the text to classify')
    label = _need(record, 'label', (str, int), where, 'a label name or id')
    return dict(text=text, label=label)
  if kind == 'bias_pairs':
    more = _need(record, 'sent_more', str, where, 'the more stereotyping sentence')
    less = _need(record, 'sent_less', str, where, 'the less stereotyping sentence')
    if not more.strip() or not less.strip() or more == less:
      raise ValueError(f'{where}: sent_more and sent_less must be two different, non-empty '
                       'sentences.')
    bias_type = record.get('bias_type', 'all')
    return dict(sent_more=more, sent_less=less, bias_type=str(bias_type or 'all'))
  raise ValueError(f'Unknown task kind {kind!r}; the kinds are {", ".join(KINDS)}.')


def read_records(kind: str, path: str) -> list[dict]:
  """The checked records of a file (JSON lines; plain text for perplexity, CSV for
  bias_pairs)."""
  p = pathlib.Path(path)
  if not p.is_file():
    raise FileNotFoundError(f'Task data {path} does not exist (or is not a file).')
  if kind == 'perplexity' and p.suffix not in ('.jsonl', '.json', '.ndjson'):
    text = p.read_text(encoding='utf-8', errors='replace')
    if not text:
      raise ValueError(f'{path}: the file is empty; nothing to score.')
    return [dict(text=text)]
  if kind == 'bias_pairs' and p.suffix == '.csv':
    with p.open(newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
    out = [parse_record(kind, row, _where(path, i + 2)) for i, row in enumerate(rows)]
  else:
    out = []
    with p.open(encoding='utf-8') as f:
      for i, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{_where(path, i)}: not valid JSON ({e.msg}).') from None
        out.append(parse_record(kind, record, _where(path, i)))
  if not out:
    raise ValueError(f'{path}: no records; nothing to evaluate.')
  return out


def catalog_records(task: Task) -> list[dict]:
  """The checked records of a TFDS catalog dataset's split (task.tfds, task.split)."""
  import os
  from lm.data import sources
  root = os.path.expanduser(task.data_dir or sources.DEFAULT_DATA_DIR)
  builder = sources._catalog_builder(task.tfds, sources.epath.Path(root))
  if task.split not in builder.info.splits:
    raise ValueError(f'{task.tfds} has no split {task.split!r} (it has '
                     f'{sorted(builder.info.splits)}); set split: in the task file.')
  source = builder.as_data_source(task.split)
  rename = {v: k for k, v in (task.fields or {}).items()}  # feature -> record field
  value = lambda v: (v.decode('utf-8') if isinstance(v, bytes) else
                     v.item() if hasattr(v, 'item') else v)
  return [parse_record(task.kind, {rename.get(k, k): value(v) for k, v in source[i].items()},
                       f'{task.tfds}[{task.split}] example {i}') for i in range(len(source))]


def load_records(task: Task) -> list[dict]:
  if task.records is not None:
    return task.records
  if task.tfds:
    return catalog_records(task)
  return read_records(task.kind, task.path)


# -- embedded tasks (no files, no network) ------------------------------------------------

def _corpus(limit_bytes: int = 1 << 16) -> list[dict]:
  """The held-out split of the embedded corpus (the quickstart's), first 64 KB of it."""
  from lm.config import base_config
  from lm.data import sources
  docs, total = [], 0
  for text in sources.iter_texts(base_config(), 'validation'):
    if text.strip():
      docs.append(dict(text=text[:limit_bytes - total]))
      total += len(docs[-1]['text'])
    if total >= limit_bytes:
      break
  return docs


def _finetune_generation() -> list[dict]:
  from lm.data import finetune_sets
  return [dict(input=e['prompt'], references=[e['completion']])
          for e in finetune_sets.make(0, 200)[1]]


def _finetune_choice() -> list[dict]:
  """The held-out fine-tuning prompts with their answer and three wrong ones of the same
  kind (lm/data/preferences.py's), in a seeded order."""
  import numpy as np
  from lm.data import finetune_sets, preferences
  examples = finetune_sets.make(0, 200)[1]
  sums = [e['completion'] for e in examples if e['prompt'].startswith('add')]
  out = []
  for i, e in enumerate(examples):
    rng = np.random.default_rng([i, 20261208])
    wrong = []
    for _ in range(50):
      w = preferences.wrong_answer(e, rng, sums)
      if w not in wrong and w != e['completion']:
        wrong.append(w)
      if len(wrong) == 3:
        break
    choices = [e['completion']] + wrong
    order = rng.permutation(len(choices))
    out.append(dict(context=e['prompt'], choices=[choices[j] for j in order],
                    label=int(np.argmax(order == 0))))
  return out


def _probe() -> list[dict]:
  return read_records('bias_pairs', str(PROBE_FILE))


# name -> (kind, records maker, settings)
EMBEDDED = {
    'corpus': ('perplexity', _corpus, {}),
    'finetune': ('generation', _finetune_generation, dict(max_new_tokens=32)),
    'finetune_choice': ('multiple_choice', _finetune_choice, dict(target_delimiter='')),
    'finetune_choice_robust': ('multiple_choice', _finetune_choice,
                               dict(target_delimiter='',
                                    perturb=('typos:0.05', 'case:0.2', 'whitespace:0.2'))),
    'bias_probe': ('bias_pairs', _probe, {}),
}


def _from_yaml(spec: str) -> Task:
  import yaml
  path = pathlib.Path(spec)
  if not path.is_file():
    raise FileNotFoundError(f'Task file {spec} does not exist.')
  try:
    data = yaml.safe_load(path.read_text())
  except yaml.YAMLError as e:
    raise ValueError(f'{spec}: not valid YAML ({e}).') from None
  if not isinstance(data, dict) or 'kind' not in data:
    raise ValueError(f'{spec}: a task file is a mapping with at least "kind" and "path".')
  fields = {f.name for f in dataclasses.fields(Task)} - {'name', 'records'}
  unknown = sorted(set(data) - fields)
  if unknown:
    raise ValueError(f'{spec}: unknown setting(s) {unknown}; the settings are '
                     f'{", ".join(sorted(fields))}.')
  for key in ('path', 'fewshot_path'):
    if data.get(key) and not pathlib.Path(data[key]).is_absolute():
      data[key] = str(path.parent / data[key])
  for key in ('stop', 'perturb'):
    if key in data:
      data[key] = tuple([data[key]] if isinstance(data[key], str) else data[key])
  if not data.get('path') and not data.get('tfds'):
    raise ValueError(f'{spec}: "path" (the records\' file) or "tfds" (a catalog name) is '
                     'missing.')
  return Task(name=spec, **data)


def resolve(spec: str, **overrides) -> Task:
  """The Task a command-line name gives (module docstring), with `overrides` (settings
  given on the command line, e.g. num_fewshot) applied."""
  spec = spec.strip()
  if spec in EMBEDDED:
    kind, make, settings = EMBEDDED[spec]
    task = Task(name=spec, kind=kind, records=make(), **settings)
  elif spec.endswith(('.yaml', '.yml')):
    task = _from_yaml(spec)
  elif ':' in spec and spec.split(':', 1)[0] in KINDS:
    kind, path = spec.split(':', 1)
    task = Task(name=spec, kind=kind, path=path)
  else:
    raise ValueError(f'Unknown task {spec!r}: give an embedded task ({", ".join(EMBEDDED)}), '
                     f'KIND:PATH with KIND one of {", ".join(KINDS)}, or a task file '
                     'FILE.yaml.')
  return dataclasses.replace(task, **{k: v for k, v in overrides.items() if v is not None})
