"""Tokenizers of Hugging Face model directories, behind the project's Tokenizer interface.

`tokenizer.json` goes through the `tokenizers` library (kind 'hf_tokenizers'); a
directory with only `tokenizer.model` through SentencePiece (kind 'hf_sentencepiece').
Special ids come from tokenizer_config.json / special_tokens_map.json (then
config.json's *_token_id). `encode` adds BOS/EOS only when asked, as everywhere in
lm; `default_add_bos` / `default_add_eos` say what the model's tokenizer config does
(Llama: BOS; GPT-2: nothing), for callers that want HF's `tokenizer(text)`.

`save(directory)` copies the HF files and writes `lm_tokenizer.json` (a manifest with
the kind and the resolved ids; HF's own `tokenizer.json` keeps its name, so a saved
directory is also a HF tokenizer directory); `load(directory)` reads it back, as does
lm.data.load_tokenizer: importing this module registers both kinds there.
"""
from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np

from lm.data.tokenizers import MANIFEST_NAME, register_tokenizer, SentencePieceTokenizer, Tokenizer

MANIFEST = MANIFEST_NAME  # lm_tokenizer.json: HF's own tokenizer.json keeps its name
HF_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
            'tokenizer.model', 'added_tokens.json', 'chat_template.jinja', 'chat_template.json',
            'vocab.json', 'merges.txt')
SPECIALS = ('pad_id', 'bos_id', 'eos_id', 'unk_id', 'default_add_bos', 'default_add_eos')


def _json(path: pathlib.Path) -> dict:
  return json.loads(path.read_text()) if path.exists() else {}


def _resolve_specials(directory, token_to_id, hf_config: dict | None, found: dict) -> dict:
  """Special ids and BOS/EOS defaults as the HF tokenizer config says; `found` fills gaps."""
  d = pathlib.Path(directory)
  cfg, smap = _json(d / 'tokenizer_config.json'), _json(d / 'special_tokens_map.json')
  hf_config = hf_config or {}
  out = dict(found)
  for name in ('pad', 'bos', 'eos', 'unk'):
    token = cfg.get(f'{name}_token') or smap.get(f'{name}_token')
    token = token.get('content') if isinstance(token, dict) else token
    i = token_to_id(token) if isinstance(token, str) else None
    if i is None:
      i = hf_config.get(f'{name}_token_id')
      i = (i[0] if i else None) if isinstance(i, list) else i
    if i is not None:
      out[f'{name}_id'] = int(i)
  for key in ('add_bos_token', 'add_eos_token'):
    if cfg.get(key) is not None:
      out['default_' + key[:-6]] = bool(cfg[key])
  return out


class _HFFiles:
  """Saving and fingerprinting shared by both kinds: the HF files plus the manifest."""
  directory: pathlib.Path

  def _set_specials(self, specials: dict) -> None:
    for key in SPECIALS:
      setattr(self, key, specials.get(key))

  def save(self, directory) -> None:
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in HF_FILES if (self.directory / f).exists()]
    for f in files:
      if (self.directory / f).resolve() != (out / f).resolve():
        shutil.copyfile(self.directory / f, out / f)
    manifest = dict(kind=self.kind, vocab_size=self.vocab_size, files=files,
                    user_symbols=list(self.user_symbols),
                    specials={k: getattr(self, k) for k in SPECIALS})
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))

  @classmethod
  def load(cls, directory):
    """Restores a tokenizer that `save(directory)` wrote (reads lm_tokenizer.json)."""
    manifest = _manifest(directory)
    return cls(directory, specials=manifest['specials'],
               user_symbols=manifest.get('user_symbols', ()))

  def _config(self) -> dict:
    return {k: getattr(self, k) for k in SPECIALS}

  def _hash_extra(self, h) -> None:
    for f in HF_FILES:
      if (self.directory / f).exists():
        h.update((self.directory / f).read_bytes())


class HFTokenizer(_HFFiles, Tokenizer):
  """A `tokenizers` tokenizer.json (GPT-2, Llama 3, Mistral, Qwen2, ...)."""
  kind = 'hf_tokenizers'

  def __init__(self, directory, hf_config: dict | None = None, specials: dict | None = None,
               user_symbols=()):
    from tokenizers import Tokenizer as Backend
    self.directory = pathlib.Path(directory)
    self.backend = Backend.from_file(str(self.directory / 'tokenizer.json'))
    # Ids can have gaps: the size is the largest id plus one.
    self._base_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
    if specials is None:
      specials = _resolve_specials(self.directory, self.backend.token_to_id, hf_config, {})
      specials.setdefault('default_add_bos', self._adds(specials.get('bos_id'), 0))
      specials.setdefault('default_add_eos', self._adds(specials.get('eos_id'), -1))
    self._set_specials(specials)
    super().__init__(user_symbols)

  def _adds(self, special: int | None, where: int) -> bool:
    """Whether tokenizer.json's post-processor puts `special` at the start (0) or end (-1)."""
    plain = self.backend.encode('a', add_special_tokens=False).ids
    full = self.backend.encode('a', add_special_tokens=True).ids
    return special is not None and len(full) > len(plain) and full[where] == special

  def _native_symbols(self):
    ids = {s: self.backend.token_to_id(s) for s in self.user_symbols}
    return {s: i for s, i in ids.items() if i is not None}

  def _encode_plain(self, text):
    return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, np.int32)

  def _decode_plain(self, ids):
    return self.backend.decode(ids, skip_special_tokens=False)

  def encode_batch(self, texts, add_bos=False, add_eos=False):
    if self._symbol_re is not None:
      return super().encode_batch(texts, add_bos, add_eos)
    pre = [self._require('bos_id')] if add_bos else []
    post = [self._require('eos_id')] if add_eos else []
    return [pre + e.ids + post
            for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]


class HFSentencePieceTokenizer(_HFFiles, SentencePieceTokenizer):
  """A SentencePiece tokenizer.model (Llama 2, Mistral v0.1), special ids from the HF config."""
  kind = 'hf_sentencepiece'

  def __init__(self, directory, hf_config: dict | None = None, specials: dict | None = None,
               user_symbols=()):
    self.directory = pathlib.Path(directory)
    super().__init__((self.directory / 'tokenizer.model').read_bytes(), user_symbols)
    if specials is None:
      sp = self.sp
      unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
      to_id = lambda t: None if sp.is_unknown(sp.piece_to_id(t)) and t != unk else sp.piece_to_id(t)
      # Without a tokenizer_config.json: LlamaTokenizer's defaults (BOS, no EOS).
      found = dict(pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id,
                   default_add_bos=self.bos_id is not None, default_add_eos=False)
      specials = _resolve_specials(self.directory, to_id, hf_config, found)
    self._set_specials(specials)

  def encode_batch(self, texts, add_bos=False, add_eos=False):
    # The parent's fast path adds SentencePiece's own BOS/EOS, which the HF config may override.
    return Tokenizer.encode_batch(self, texts, add_bos, add_eos)


KINDS = {cls.kind: cls for cls in (HFTokenizer, HFSentencePieceTokenizer)}
for _cls in KINDS.values():
  register_tokenizer(_cls.kind, _cls)
del _cls


def from_hf_dir(directory, hf_config: dict | None = None) -> Tokenizer:
  """The tokenizer of a HF model directory: tokenizer.json first (as AutoTokenizer does)."""
  d = pathlib.Path(directory)
  if (d / 'tokenizer.json').exists():
    return HFTokenizer(d, hf_config)
  if (d / 'tokenizer.model').exists():
    return HFSentencePieceTokenizer(d, hf_config)
  raise FileNotFoundError(f'{d} has neither tokenizer.json (read with the tokenizers library) '
                          'nor tokenizer.model (SentencePiece); save the tokenizer there too: '
                          'AutoTokenizer.from_pretrained(...).save_pretrained(DIR).')


def _manifest(directory) -> dict:
  d = pathlib.Path(directory)
  if not (d / MANIFEST).exists():
    raise FileNotFoundError(f'No {MANIFEST} in {d}: not a saved Hugging Face tokenizer.')
  return json.loads((d / MANIFEST).read_text())


def load(directory) -> Tokenizer:
  """Restores a tokenizer that `save(directory)` wrote, of either kind."""
  kind = _manifest(directory)['kind']
  if kind not in KINDS:
    raise ValueError(f'Unknown tokenizer kind {kind!r} in {pathlib.Path(directory) / MANIFEST}; '
                     f'known: {", ".join(KINDS)}.')
  return KINDS[kind].load(directory)
