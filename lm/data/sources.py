"""Documents as TFDS datasets (array_record, no TensorFlow) and their token caches.

`config.data.dataset` picks the source:
  default     the running interpreter's standard library sources (a few MB,
              every machine has them): the quickstart corpus.
  text_files  the user's text or JSON-lines files (`data.path`: a file, a
              directory, a glob or a comma-separated list; local or gs://).
  other       a TFDS catalog name (tiny_shakespeare, lm1b, c4/en, ...); needs
              the internet the first time, and TensorFlow for most builders.
The first two are built once into `data.data_dir` under a name hashed from
their inputs (paths, sizes, mtimes, split fractions), then read with
`as_data_source`. Token ids are cached per split and tokenizer next to them.
"""
from __future__ import annotations

import codecs
import dataclasses
import glob as globlib
import gzip
import hashlib
import json
import logging as logging_std
import os
import sys
import sysconfig
from typing import Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

DEFAULT_DATA_DIR = '~/.cache/lm/tfds'
DEFAULT_CORPUS_BYTES = 4 << 20  # enough for quick runs, built in about a second
JSON_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_FORMAT = 1  # bump when the build or cache layout changes


def data_dir(config) -> epath.Path:
  return epath.Path(os.path.expanduser(config.data.data_dir or DEFAULT_DATA_DIR))


# -- reading files ---------------------------------------------------------------------

_replaced = [0]


def _count_and_replace(err: UnicodeDecodeError):
  _replaced[0] += err.end - err.start
  return '\ufffd', err.end


codecs.register_error('lm_count_replace', _count_and_replace)


def _has_magic(path: str) -> bool:
  return any(c in path for c in '*?[')


def resolve_files(path: str) -> list[str]:
  """Files named by `data.path`: files, directories (recursively), globs; comma-separated."""
  if not path:
    raise ValueError('data.dataset=text_files needs --config.data.path=FILE, DIR or GLOB '
                     '(text or .jsonl files, local or gs://).')
  files = []
  for part in [p.strip() for p in path.split(',') if p.strip()]:
    if _has_magic(part):
      if '://' in part:  # epath globs relative to the last directory before the pattern
        head = part[:min(part.find(c) for c in '*?[' if c in part)].rsplit('/', 1)[0]
        found = [os.fspath(p) for p in epath.Path(head).glob(part[len(head) + 1:])]
      else:
        found = globlib.glob(os.path.expanduser(part), recursive=True)
      found = [f for f in found if epath.Path(f).is_file()]
    elif epath.Path(os.path.expanduser(part)).is_dir():
      found = []
      for dirpath, dirnames, filenames in epath.Path(os.path.expanduser(part)).walk():
        dirnames[:] = [d for d in dirnames if not d.startswith('.')]  # skip .git and such
        found += [os.fspath(dirpath / f) for f in filenames if not f.startswith('.')]
    elif epath.Path(os.path.expanduser(part)).exists():
      found = [os.path.expanduser(part)]
    else:
      found = []
    if not found:
      raise FileNotFoundError(
          f'data.path {part!r} matches no file. Pass an existing file, a directory or a glob '
          "(e.g. --config.data.path='corpus/*.txt').")
    files += sorted(found)
  return sorted(set(files))


def _is_json(path: str) -> bool:
  return path.removesuffix('.gz').endswith(JSON_SUFFIXES)


def _read_text(path: str) -> str:
  data = epath.Path(path).read_bytes()
  if path.endswith('.gz'):
    data = gzip.decompress(data)
  _replaced[0] = 0
  text = data.decode('utf-8', errors='lm_count_replace')
  if _replaced[0]:
    logging.warning('%s: %d bytes are not UTF-8; replaced by U+FFFD.', path, _replaced[0])
  return text


def json_records(path: str) -> Iterator[tuple[str, object]]:
  """(file:line, decoded value) of every non-blank JSON line of the files `path` names
  (a file, directory, glob or comma list); a line that is not JSON is an error naming it."""
  for name in resolve_files(path):
    for n, line in enumerate(_read_text(name).splitlines(), 1):
      if line.strip():
        try:
          yield f'{name}:{n}', json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{name}:{n} is not valid JSON ({e.msg}); one record a line.') \
              from None


def _read_docs(path: str, json_field: str) -> list[str]:
  """The documents of one file: the whole text, or one per JSON line."""
  text = _read_text(path)
  if not _is_json(path):
    return [text]
  docs, missing, malformed, seen = [], 0, 0, set()
  for line in text.splitlines():
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      malformed += 1
      continue
    value = record.get(json_field) if isinstance(record, dict) else None
    if isinstance(value, str):
      docs.append(value)
    else:
      missing += 1
      if isinstance(record, dict):
        seen.update(record)
  fields = ', '.join(sorted(map(repr, seen))[:10]) or 'none'
  if not docs and (missing or malformed):
    raise ValueError(
        f'{path}: none of its {missing + malformed} JSON lines has a string field '
        f'{json_field!r} (fields seen: {fields}); set --config.data.json_field to the '
        'field that holds the text.')
  if missing:
    logging.warning('%s: skipped %d of %d JSON lines without a string field %r (fields '
                    'seen: %s).', path, missing, missing + malformed + len(docs),
                    json_field, fields)
  if malformed:
    logging.warning('%s: skipped %d lines that are not valid JSON.', path, malformed)
  return docs


# -- deterministic splits --------------------------------------------------------------

def _check_fractions(val: float, test: float) -> None:
  if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
    raise ValueError(f'data.val_fraction={val} and data.test_fraction={test} must be in '
                     '[0, 1) with a sum below 1.')


def _hash_unit(name: str) -> float:
  return int(hashlib.sha256(name.encode()).hexdigest()[:12], 16) / 16**12


def split_plan(files: list[str], names: list[str], val: float,
               test: float) -> dict[str, list[tuple[str, float, float]]]:
  """{split: [(file, lo, hi)]}: each file's documents [int(n*lo), int(n*hi)) go to split.

  One file is split by position (first part train, as nanoGPT); many files by
  a hash of their paths below their common directory, so adding a file leaves
  the others where they were (but a split that would be empty borrows the
  train file hashed nearest to it).
  """
  _check_fractions(val, test)
  if len(files) == 1:
    a, b = 1 - val - test, 1 - test
    plan = {'train': [(files[0], 0.0, a)], 'validation': [(files[0], a, b)],
            'test': [(files[0], b, 1.0)]}
  else:
    plan = {'train': [], 'validation': [], 'test': []}
    unit = {f: _hash_unit(n) for f, n in zip(files, names)}
    for f in files:
      split = 'validation' if unit[f] < val else 'test' if unit[f] < val + test else 'train'
      plan[split].append((f, 0.0, 1.0))
    # With a handful of files a split can come out empty: move in the nearest train file.
    for split, want, lo in (('validation', val, 0.0), ('test', test, val)):
      if want > 0 and not plan[split] and len(plan['train']) > 1:
        entry = min(plan['train'], key=lambda e: unit[e[0]] - lo)
        plan['train'].remove(entry)
        plan[split].append(entry)
  if val == 0:
    del plan['validation']
  if test == 0:
    del plan['test']
  return plan


def _common_names(files: list[str]) -> list[str]:
  """Paths relative to their common directory: split hashes survive moving the data."""
  parts = [f.split('/') for f in files]
  n = 0
  while all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
    n += 1
  return ['/'.join(p[n:]) for p in parts]


# -- TFDS builders ---------------------------------------------------------------------

class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents from files following a split plan; one `text` feature per document."""
  name = 'text_files'
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # no checksums/metadata files next to the code (and no importlib_resources)

  def __init__(self, *, plan, json_field: str = 'text', **kwargs):
    self._plan, self._json_field = plan, json_field
    self._last = (None, [])
    super().__init__(**kwargs)

  @classmethod
  def get_builder_config(cls, name, version=None):
    del version
    return tfds.core.BuilderConfig(name=name)  # any name: configs are hashes of the inputs

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: the eval pass and position splits rely on it

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(entries) for split, entries in self._plan.items()}

  def _generate_examples(self, entries):
    key = 0
    for path, lo, hi in entries:
      if self._last[0] != path:  # a file split by position is read once for all splits
        self._last = (path, _read_docs(path, self._json_field))
      docs = self._last[1]
      if not _is_json(path):  # one text: split by characters
        n = len(docs[0])
        docs = [docs[0][int(n * lo):int(n * hi)]]
      else:
        docs = docs[int(len(docs) * lo):int(len(docs) * hi)]
      for doc in docs:
        if doc:
          yield key, {'text': doc}
          key += 1


class PythonStdlib(TextFiles, skip_registration=True):
  name = 'python_stdlib'


@dataclasses.dataclass
class _Spec:
  cls: type
  plan: dict
  json_field: str
  inputs: list  # what the build depends on, hashed into the config name


def _stdlib_files() -> tuple[list[str], list[str]]:
  """A deterministic sample (by name hash) of the stdlib's .py files, capped in size."""
  root = sysconfig.get_paths()['stdlib']
  skip = {'site-packages', 'dist-packages', 'test', 'tests', 'idle_test'}
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith('.')]
    found += [os.path.join(dirpath, f) for f in filenames if f.endswith('.py')]
  names = {f: os.path.relpath(f, root) for f in found}
  files, total = [], 0
  # Salted: the split hashes these names again, and must not see only small hashes.
  for f in sorted(found, key=lambda f: hashlib.sha256(b'sample:' + names[f].encode()).digest()):
    size = os.path.getsize(f)
    if size and total + size <= DEFAULT_CORPUS_BYTES:
      files.append(f)
      total += size
  if not files:
    raise FileNotFoundError(f'No Python sources under {root} for the default corpus; pass '
                            'your own: --config.data.dataset=text_files --config.data.path=...')
  files.sort()
  return files, [names[f] for f in files]


def _spec(config) -> _Spec:
  d = config.data
  if d.dataset == 'default':
    files, names = _stdlib_files()
    cls, json_field = PythonStdlib, 'text'
  else:
    files = resolve_files(d.path)
    empty = [f for f in files if epath.Path(f).stat().length == 0]
    if len(empty) == len(files):
      raise ValueError(f'data.path {d.path!r}: every file is empty ({", ".join(empty[:5])}); '
                       'point it at files with text.')
    if empty:
      logging.warning('data.path: skipping %d empty files of %d (e.g. %s).', len(empty),
                      len(files), empty[0])
      files = [f for f in files if f not in set(empty)]
    names = _common_names(files)
    cls, json_field = TextFiles, d.json_field
  stats = [epath.Path(f).stat() for f in files]
  inputs = [_FORMAT, sys.version_info[:2], json_field, d.val_fraction, d.test_fraction,
            [(f, s.length, s.mtime) for f, s in zip(files, stats)]]
  return _Spec(cls, split_plan(files, names, d.val_fraction, d.test_fraction),
               json_field, inputs)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `config.data` (built on first use)."""
  d = config.data
  root = data_dir(config)
  if d.dataset not in ('default', 'text_files'):
    return _catalog_builder(d.dataset, root)
  spec = _spec(config)
  digest = hashlib.sha256(json.dumps(spec.inputs, default=str).encode()).hexdigest()[:12]
  prefix = 'py%d%d_' % sys.version_info[:2] if d.dataset == 'default' else 'h'
  name = prefix + digest
  builder = spec.cls(plan=spec.plan, json_field=spec.json_field, data_dir=os.fspath(root),
                     config=name, file_format='array_record')
  if not builder.is_prepared():
    logging.info('Building %s/%s into %s.', spec.cls.name, name, root)
    tfds.disable_progress_bar()
    builder.download_and_prepare()
  return builder


class _QuietVariantCheck(logging_std.Filter):
  """TFDS warns about the not-yet-built version folder before every first build."""

  def filter(self, record):
    return not str(record.msg).startswith('Variant folder')


logging_std.getLogger('absl').addFilter(_QuietVariantCheck())


def _catalog_builder(name: str, root: epath.Path):
  try:
    builder = tfds.builder(name, data_dir=os.fspath(root), file_format='array_record')
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'data.dataset={name!r} is not default, text_files or a TFDS catalog '
                     'name (https://www.tensorflow.org/datasets/catalog).') from None
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception as e:  # offline, no TensorFlow, ...: one clear message
      raise RuntimeError(
          f'Could not download and prepare the TFDS dataset {name!r} into {root} '
          f'({type(e).__name__}: {str(e)[:200]}). Catalog datasets need the internet and '
          "usually TensorFlow (pip install 'lm[tf]'). Offline, pass local files instead: "
          '--config.data.dataset=text_files --config.data.path=FILE_DIR_OR_GLOB.') from e
  return builder


def dataset_dir(config) -> epath.Path:
  """The built dataset's own directory (token caches and trained tokenizers go there)."""
  return epath.Path(get_builder(config).data_dir)


def _splits(builder, split: str | None) -> list[str]:
  available = sorted(builder.info.splits.keys())
  if split is None:
    return available
  if split not in available:
    raise ValueError(f'The dataset {builder.name} has no split {split!r} (it has '
                     f'{available}); set --config.data.train_split/eval_split, or '
                     '--config.data.val_fraction > 0 for text files.')
  return [split]


def _iter_source_texts(builder, split: str, field: str, chunk: int = 512) -> Iterator[str]:
  source = builder.as_data_source(split)
  for start in range(0, len(source), chunk):
    for record in source.__getitems__(range(start, min(start + chunk, len(source)))):
      if field not in record:
        raise ValueError(f'{builder.name} examples have no feature {field!r} (they have '
                         f'{sorted(record)}); set --config.data.json_field.')
      value = record[field]
      yield value.decode('utf-8', errors='replace') if isinstance(value, bytes) else str(value)


def _text_field(config) -> str:
  """Our builders store `text`; catalog datasets name it (data.json_field)."""
  return 'text' if config.data.dataset in ('default', 'text_files') else config.data.json_field


def iter_texts(config, split: str | None = None) -> Iterator[str]:
  """The documents of one split, or of every split when split is None, in order."""
  builder = get_builder(config)
  field = _text_field(config)
  for s in _splits(builder, split):
    yield from _iter_source_texts(builder, s, field)


# -- token caches ----------------------------------------------------------------------

def _save_npy(path: epath.Path, array: np.ndarray) -> None:
  tmp = path.parent / f'{path.name}.tmp{os.getpid()}'
  with tmp.open('wb') as f:
    np.save(f, array)
  tmp.rename(path)  # atomic: a reader never sees half a file


def _load_npy(path: epath.Path) -> np.ndarray:
  if '://' not in os.fspath(path):
    return np.load(os.fspath(path), mmap_mode='r')
  with path.open('rb') as f:
    return np.load(f)


def load_tokens(config, tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N], offsets [D+1]): the split's documents tokenized and concatenated.

  Tokenized once per (dataset, tokenizer, bos/eos) and cached as .npy next to
  the dataset; document i is tokens[offsets[i]:offsets[i+1]] (never empty).
  """
  builder = get_builder(config)
  _splits(builder, split)
  add_bos = bool(config.data.add_bos) and tokenizer.bos_id is not None
  add_eos = bool(config.data.add_eos) and tokenizer.eos_id is not None
  cache = (epath.Path(builder.data_dir) / 'lm_tokens' /
           f'{tokenizer.kind}-{tokenizer.fingerprint()}-{int(add_bos)}{int(add_eos)}-v{_FORMAT}')
  tokens_path, offsets_path = cache / f'{split}.tokens.npy', cache / f'{split}.offsets.npy'
  if tokens_path.exists() and offsets_path.exists():
    return _load_npy(tokens_path), _load_npy(offsets_path)
  field = _text_field(config)
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  pieces, lengths, batch = [], [], []

  def flush():
    for ids in tokenizer.encode_batch_np(batch, add_bos, add_eos):
      if len(ids):
        pieces.append(ids.astype(dtype))
        lengths.append(len(ids))
    batch.clear()

  for text in _iter_source_texts(builder, split, field):
    batch.append(text)
    if len(batch) >= 1024:
      flush()
  flush()
  tokens = np.concatenate(pieces) if pieces else np.zeros([0], dtype)
  offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
  cache.mkdir(parents=True, exist_ok=True)
  _save_npy(tokens_path, tokens)
  _save_npy(offsets_path, offsets)
  return tokens, offsets
