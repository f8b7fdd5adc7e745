"""Tokenizers: bytes, characters and SentencePiece behind one interface.

Every tokenizer maps text to int ids and back, knows its special ids (pad, bos,
eos, unk: an int, or None when it has none) and its user-defined symbols (T5
sentinels, [MASK], chat markers), which `encode` matches in the text and which
get ids after the base vocabulary unless the SentencePiece model has them.
`save(directory)` writes `tokenizer.json` (the kind and its settings) plus, for
SentencePiece, `tokenizer.model`; `load_tokenizer(directory)` reads them back.

Kinds are registered by name (`register_tokenizer`): this module's three, and
kinds defined elsewhere (lm.convert.hf_tokenizers' Hugging Face tokenizers),
which `_KINDS` names by module so that loading one imports the module that
registers it, and this module never imports them.
"""
from __future__ import annotations

import hashlib
import importlib
import io
import json
import re
from typing import Iterable, Sequence

from absl import logging
from etils import epath
import numpy as np

JSON_NAME = 'tokenizer.json'
SPM_NAME = 'tokenizer.model'
# Where kinds that keep a file named tokenizer.json of their own (Hugging Face's)
# write their kind and settings instead; load_tokenizer looks here first.
MANIFEST_NAME = 'lm_tokenizer.json'


class Tokenizer:
  """Base class. Subclasses define `_base_size`, `_encode_plain`, `_decode_plain`."""
  kind = ''
  pad_id: int | None = None
  bos_id: int | None = None
  eos_id: int | None = None
  unk_id: int | None = None
  _base_size = 0

  def __init__(self, user_symbols: Sequence[str] = ()):
    self.user_symbols = tuple(user_symbols)
    if len(set(self.user_symbols)) != len(self.user_symbols) or '' in self.user_symbols:
      raise ValueError(f'data.user_symbols must be distinct and non-empty: {self.user_symbols}')
    native = self._native_symbols()
    # Symbols the base vocabulary lacks get ids after it, in the order given.
    self._extra = [s for s in self.user_symbols if s not in native]
    self._symbol_ids = dict(native)
    self._symbol_ids.update({s: self._base_size + i for i, s in enumerate(self._extra)})
    self._id_symbols = {i: s for s, i in self._symbol_ids.items()}
    longest_first = sorted(self._symbol_ids, key=len, reverse=True)
    self._symbol_re = (re.compile('|'.join(map(re.escape, longest_first)))
                       if longest_first else None)

  # -- to override ------------------------------------------------------------
  def _native_symbols(self) -> dict[str, int]:
    return {}

  def _encode_plain(self, text: str) -> np.ndarray:
    raise NotImplementedError

  def _decode_plain(self, ids: list[int]) -> str:
    raise NotImplementedError

  def _config(self) -> dict:
    return {}

  # -- interface --------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._base_size + len(self._extra)

  @property
  def special_ids(self) -> set[int]:
    return {i for i in (self.pad_id, self.bos_id, self.eos_id) if i is not None}

  def symbol_id(self, symbol: str) -> int:
    if symbol not in self._symbol_ids:
      raise KeyError(f'{symbol!r} is not a user symbol of this tokenizer; add it to '
                     f'--config.data.user_symbols (now {self.user_symbols}).')
    return self._symbol_ids[symbol]

  def encode_np(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
    """Like `encode` but returns an int32 array (what the data pipeline uses)."""
    if self._symbol_re is None:
      parts = [self._encode_plain(text)]
    else:
      parts, start = [], 0
      for m in self._symbol_re.finditer(text):
        parts += [self._encode_plain(text[start:m.start()]),
                  np.array([self._symbol_ids[m.group()]], np.int32)]
        start = m.end()
      parts.append(self._encode_plain(text[start:]))
    if add_bos:
      parts.insert(0, np.array([self._require('bos_id')], np.int32))
    if add_eos:
      parts.append(np.array([self._require('eos_id')], np.int32))
    return np.concatenate(parts).astype(np.int32, copy=False)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    return self.encode_np(text, add_bos, add_eos).tolist()

  def encode_batch(self, texts: Iterable[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return [self.encode(t, add_bos, add_eos) for t in texts]

  def encode_batch_np(self, texts: Iterable[str], add_bos: bool = False,
                      add_eos: bool = False) -> list[np.ndarray]:
    return [self.encode_np(t, add_bos, add_eos) for t in texts]

  def decode(self, ids) -> str:
    """Text of `ids`; pad/bos/eos and ids outside the vocabulary are dropped."""
    ids = np.asarray(ids, np.int64).reshape(-1).tolist()
    out, run, skip = [], [], self.special_ids
    for i in ids:
      if i in self._id_symbols:
        out += [self._decode_plain(run), self._id_symbols[i]]
        run = []
      elif 0 <= i < self._base_size and i not in skip:
        run.append(i)
    out.append(self._decode_plain(run))
    return ''.join(out)

  def save(self, directory) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = dict(kind=self.kind, vocab_size=self.vocab_size, pad_id=self.pad_id,
                bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id,
                user_symbols=list(self.user_symbols), **self._config())
    (directory / JSON_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False))

  @classmethod
  def load(cls, directory) -> 'Tokenizer':
    """Restores a tokenizer of this kind from what `save(directory)` wrote."""
    raise NotImplementedError(f'{cls.__name__} does not implement load.')

  def fingerprint(self) -> str:
    """A short hash that changes whenever the id mapping does (keys token caches)."""
    h = hashlib.sha256(json.dumps([self.kind, self.user_symbols, self._config()],
                                  ensure_ascii=False).encode())
    self._hash_extra(h)
    return h.hexdigest()[:16]

  def _hash_extra(self, h) -> None:
    pass

  def _require(self, name: str) -> int:
    value = getattr(self, name)
    if value is None:
      raise ValueError(f'The {self.kind} tokenizer has no {name[:-3]} token; set '
                       f'--config.data.add_{name[:3]}=False or use another tokenizer.')
    return value

  def __repr__(self) -> str:
    return f'{type(self).__name__}(vocab_size={self.vocab_size}, user_symbols={self.user_symbols})'


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; then pad, bos, eos; then user symbols (259+)."""
  kind = 'bytes'
  pad_id, bos_id, eos_id, unk_id = 256, 257, 258, None  # every text is bytes: no unk
  _base_size = 259

  def _encode_plain(self, text):
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)

  def _decode_plain(self, ids):
    # A model can sample an invalid byte sequence: replace rather than raise.
    return bytes(ids).decode('utf-8', errors='replace')

  @classmethod
  def load(cls, directory):
    return cls(_read_meta(directory).get('user_symbols', ()))


class CharTokenizer(Tokenizer):
  """One id per character of a corpus's alphabet, in code point order (nanoGPT).

  No special ids, so tiny Shakespeare gives exactly 65 ids; the pipeline marks
  padding with segment id 0 and weight 0 instead of a pad token.
  """
  kind = 'char'

  def __init__(self, chars: str | Iterable[str], user_symbols: Sequence[str] = ()):
    self.chars = ''.join(sorted(set(chars)))
    if not self.chars:
      raise ValueError('The char tokenizer needs a non-empty corpus to build its vocabulary.')
    self._base_size = len(self.chars)
    self._codes = np.frombuffer(self.chars.encode('utf-32-le'), np.uint32)  # sorted
    super().__init__(user_symbols)

  @classmethod
  def from_texts(cls, texts: Iterable[str], user_symbols: Sequence[str] = ()) -> 'CharTokenizer':
    chars = set()
    for t in texts:
      chars.update(t)
    return cls(chars, user_symbols)

  def _encode_plain(self, text):
    codes = np.frombuffer(text.encode('utf-32-le'), np.uint32)
    ids = np.searchsorted(self._codes, codes)
    bad = (ids >= len(self._codes)) | (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes)
    if bad.any():
      missing = ''.join(sorted(set(chr(c) for c in codes[bad])))
      raise ValueError(
          f'{len(missing)} character(s) are not in the char vocabulary, which was built '
          f'from the training corpus: {missing[:20]!r}. Remove them from the text, or use '
          '--config.data.tokenizer=bytes (covers any text).')
    return ids.astype(np.int32)

  def _decode_plain(self, ids):
    return ''.join(self.chars[i] for i in ids)

  def _config(self):
    return dict(chars=self.chars)

  @classmethod
  def load(cls, directory):
    meta = _read_meta(directory)
    return cls(meta['chars'], meta.get('user_symbols', ()))


class SentencePieceTokenizer(Tokenizer):
  """Any SentencePiece `.model` (BPE or unigram); its pad/bos/eos/unk ids as set in it."""
  kind = 'sentencepiece'

  def __init__(self, model_proto: bytes, user_symbols: Sequence[str] = ()):
    import sentencepiece as spm
    self.model_proto = model_proto
    self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._base_size = self.sp.get_piece_size()
    none_if_negative = lambda i: None if i < 0 else i
    self.pad_id = none_if_negative(self.sp.pad_id())
    self.bos_id = none_if_negative(self.sp.bos_id())
    self.eos_id = none_if_negative(self.sp.eos_id())
    self.unk_id = none_if_negative(self.sp.unk_id())
    model_symbols = _user_defined_pieces(model_proto)  # [MASK] etc. trained into the model
    super().__init__(model_symbols + [s for s in user_symbols if s not in model_symbols])

  @classmethod
  def from_file(cls, path, user_symbols: Sequence[str] = ()) -> 'SentencePieceTokenizer':
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f'SentencePiece model {path} does not exist; set '
                              '--config.data.tokenizer_path to a .model file, or leave it '
                              'empty to train one (scripts/train_tokenizer.py).')
    return cls(path.read_bytes(), user_symbols)

  def _native_symbols(self):
    out = {}
    for s in self.user_symbols:
      i = self.sp.piece_to_id(s)
      if not (self.sp.is_unknown(i) or self.sp.is_control(i)):
        out[s] = i
    return out

  def _encode_plain(self, text):
    return np.asarray(self.sp.encode(text), np.int32)

  def _decode_plain(self, ids):
    return self.sp.decode(ids)

  def encode_batch(self, texts, add_bos=False, add_eos=False):
    if self._symbol_re is not None:  # extra symbols need the regex path
      return super().encode_batch(texts, add_bos, add_eos)
    if add_bos:
      self._require('bos_id')
    if add_eos:
      self._require('eos_id')
    return self.sp.encode(list(texts), add_bos=add_bos, add_eos=add_eos)

  def encode_batch_np(self, texts, add_bos=False, add_eos=False):
    return [np.asarray(ids, np.int32) for ids in self.encode_batch(texts, add_bos, add_eos)]

  def save(self, directory):
    super().save(directory)
    (epath.Path(directory) / SPM_NAME).write_bytes(self.model_proto)

  @classmethod
  def load(cls, directory):
    return cls((epath.Path(directory) / SPM_NAME).read_bytes(),
               _read_meta(directory).get('user_symbols', ()))

  def _hash_extra(self, h):
    h.update(self.model_proto)


def _user_defined_pieces(model_proto: bytes) -> list[str]:
  from sentencepiece import sentencepiece_model_pb2 as pb  # needs protobuf, as TFDS does
  model = pb.ModelProto()
  model.ParseFromString(model_proto)
  return [p.piece for p in model.pieces if p.type == pb.ModelProto.SentencePiece.USER_DEFINED]


# Kind -> its Tokenizer subclass, or the module that registers it when imported.
_KINDS: dict[str, type[Tokenizer] | str] = {}


def register_tokenizer(kind: str, cls: type[Tokenizer] | str) -> None:
  """Makes `load_tokenizer` (and `data.tokenizer=kind`) restore saved tokenizers of `kind`.

  `cls` has `load(directory)` and instances' `save(directory)`; or it is a module
  path (a string) whose import registers the class, for kinds this module must
  not import.
  """
  _KINDS[kind] = cls


def tokenizer_class(kind: str) -> type[Tokenizer]:
  """The class registered for `kind`, importing the module that registers it if need be."""
  entry = _KINDS.get(kind)
  if isinstance(entry, str):
    importlib.import_module(entry)  # registers the kind's class
    entry = _KINDS[kind]
    if isinstance(entry, str):
      raise RuntimeError(f'Importing {entry} did not register tokenizer kind {kind!r}.')
  if entry is None:
    raise ValueError(f'Unknown tokenizer kind {kind!r}; known: {", ".join(sorted(_KINDS))}.')
  return entry


for _cls in (ByteTokenizer, CharTokenizer, SentencePieceTokenizer):
  register_tokenizer(_cls.kind, _cls)
for _kind in ('hf_tokenizers', 'hf_sentencepiece'):  # imported Hugging Face tokenizers
  register_tokenizer(_kind, 'lm.convert.hf_tokenizers')
del _cls, _kind


def _meta_path(directory) -> epath.Path:
  directory = epath.Path(directory)
  for name in (MANIFEST_NAME, JSON_NAME):
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(f'No {JSON_NAME} in {directory}: not a saved tokenizer '
                          '(Tokenizer.save writes one).')


def _read_meta(directory) -> dict:
  """The kind and settings that `save(directory)` wrote."""
  return json.loads(_meta_path(directory).read_text())


def load_tokenizer(directory) -> Tokenizer:
  """Restores a tokenizer written by `Tokenizer.save(directory)`, of any registered kind."""
  path = _meta_path(directory)
  kind = json.loads(path.read_text()).get('kind')
  if kind is None:
    raise ValueError(f'{path} names no tokenizer kind: Tokenizer.save did not write it (a '
                     'Hugging Face tokenizer? import the model: scripts/convert_checkpoint.py).')
  if kind not in _KINDS:
    raise ValueError(f'Unknown tokenizer kind {kind!r} in {path}; known: '
                     f'{", ".join(sorted(_KINDS))}.')
  return tokenizer_class(kind).load(directory)


def build_tokenizer(config) -> Tokenizer:
  """The tokenizer that `config.data` asks for.

  bytes: fixed. char: the alphabet of every split of the dataset (as nanoGPT,
  so validation never meets an unknown character). sentencepiece: loads
  `data.tokenizer_path`, or trains `data.vocab_size` pieces on the train split
  once and keeps the model in the dataset's directory.
  """
  d = config.data
  symbols = tuple(d.get('user_symbols', ()))
  if d.tokenizer == 'bytes':
    return ByteTokenizer(symbols)
  if d.tokenizer in _KINDS and d.tokenizer not in ('char', 'sentencepiece'):
    # Another registered kind (imported Hugging Face runs): saved in data.tokenizer_path.
    return load_tokenizer(d.tokenizer_path)
  from lm.data import sources  # lazy: sources imports TFDS
  if d.tokenizer == 'char':
    return CharTokenizer.from_texts(sources.iter_texts(config, split=None), symbols)
  if d.tokenizer == 'sentencepiece':
    if d.tokenizer_path:
      return SentencePieceTokenizer.from_file(d.tokenizer_path, symbols)
    if d.vocab_size <= 0:
      raise ValueError('data.tokenizer=sentencepiece needs --config.data.tokenizer_path=FILE.model '
                       'or --config.data.vocab_size=N (pieces to train on the train split).')
    key = hashlib.sha256(json.dumps([d.spm_model_type, d.vocab_size, d.byte_fallback,
                                     symbols]).encode()).hexdigest()[:8]
    name = f'spm_{d.spm_model_type}_{d.vocab_size}_{key}.model'
    path = sources.dataset_dir(config) / 'tokenizers' / name
    if not path.exists():
      proto = train_sentencepiece(
          sources.iter_texts(config, split=d.train_split), vocab_size=d.vocab_size,
          model_type=d.spm_model_type, byte_fallback=d.byte_fallback, user_symbols=symbols)
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / (path.name + '.tmp')
      tmp.write_bytes(proto)
      tmp.rename(path)
    return SentencePieceTokenizer.from_file(path, symbols)
  raise ValueError(f'Unknown data.tokenizer {d.tokenizer!r}; use bytes, char or sentencepiece.')


def _chunks(texts: Iterable[str], max_chars: int, chunk_chars: int = 4096):
  """Splits documents into pieces of whole lines (SentencePiece's sentences), up to max_chars."""
  total = 0
  for text in texts:
    lines = text.splitlines(keepends=True)
    buf = ''
    for line in lines:
      if buf and len(buf) + len(line) > chunk_chars:
        yield buf
        total += len(buf)
        buf = ''
        if total >= max_chars:
          return
      buf += line
    if buf:
      yield buf
      total += len(buf)
    if total >= max_chars:
      return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str = 'bpe',
                        byte_fallback: bool = True, user_symbols: Sequence[str] = (),
                        max_chars: int = 100_000_000, character_coverage: float = 0.9995,
                        num_threads: int = 0) -> bytes:
  """Trains a SentencePiece model on `texts` and returns the serialized `.model`.

  Settings keep decode(encode(x)) == x: no normalization, whitespace and
  newlines kept (newlines stay inside pieces because whole documents are fed,
  not lines), and byte fallback for characters outside the learned alphabet.
  Ids: pad 0, unk 1, bos 2, eos 3, then user symbols.
  """
  import os
  import sentencepiece as spm
  if model_type not in ('bpe', 'unigram'):
    raise ValueError(f'model_type must be bpe or unigram, not {model_type!r}.')
  sentences = list(_chunks(texts, max_chars))
  if not sentences:
    raise ValueError('No text to train the SentencePiece model on (the split is empty).')
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback,
        character_coverage=1.0 if not byte_fallback else character_coverage,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16, user_defined_symbols=list(user_symbols),
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
        num_threads=num_threads or os.cpu_count() or 1, train_extremely_large_corpus=False)
  except RuntimeError as e:
    m = re.search(r'Vocabulary size too high \((\d+)\).*<= (\d+)', str(e))
    if m:
      raise ValueError(
          f'This corpus supports at most {m.group(2)} SentencePiece pieces ({model_type}), '
          f'not {m.group(1)}: lower the vocabulary size (--vocab_size / '
          f'--config.data.vocab_size) to <= {m.group(2)}, or train on more text.') from None
    m = re.search(r'smaller than required_chars\. (\d+) vs (\d+)', str(e))
    if m:
      raise ValueError(
          f'A vocabulary of {m.group(1)} pieces cannot hold the {m.group(2)} this corpus needs '
          '(its characters, plus 256 byte pieces with byte fallback): raise the vocabulary '
          f'size to > {m.group(2)}.') from None
    raise
  if not byte_fallback:
    logging.warning('SentencePiece without byte fallback maps unseen characters to unk, '
                    'so decode(encode(x)) may differ from x.')
  return model.getvalue()
