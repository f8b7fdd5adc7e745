"""Tokenizers of Hugging Face model directories, behind the project's Tokenizer interface.

`tokenizer.json` goes through the `tokenizers` library (kind 'hf_tokenizers'); a
directory with only `tokenizer.model` through SentencePiece (kind 'hf_sentencepiece');
BERT's `vocab.txt` alone through a `tokenizers` WordPiece built from it (kind 'hf_wordpiece').
Special ids come from tokenizer_config.json / special_tokens_map.json (then
config.json's *_token_id). `encode` adds BOS/EOS only when asked, as everywhere in
lm; `default_add_bos` / `default_add_eos` say what the model's tokenizer config does
(Llama: BOS; GPT-2: nothing), for callers that want HF's `tokenizer(text)`.

`save(directory)` copies the HF files and writes `lm_tokenizer.json` (a manifest with
the kind and the resolved ids; HF's own `tokenizer.json` keeps its name, so a saved
directory is also a HF tokenizer directory); `load(directory)` reads it back, as does
lm.data.load_tokenizer: importing this module registers the kinds there.
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
            'vocab.json', 'merges.txt', 'vocab.txt', 'spiece.model')
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
    if token is None and name in ('bos', 'eos'):  # BERT: [CLS] text [SEP]
      alias = 'cls' if name == 'bos' else 'sep'
      token = cfg.get(f'{alias}_token') or smap.get(f'{alias}_token')
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
    self.directory = pathlib.Path(directory)
    self.backend = self._load_backend()
    # Ids can have gaps: the size is the largest id plus one.
    self._base_size = max(self.backend.get_vocab(with_added_tokens=True).values()) + 1
    if specials is None:
      specials = _resolve_specials(self.directory, self.backend.token_to_id, hf_config, {})
      specials.setdefault('default_add_bos', self._adds(specials.get('bos_id'), 0))
      specials.setdefault('default_add_eos', self._adds(specials.get('eos_id'), -1))
    self._set_specials(specials)
    super().__init__(user_symbols)

  def _load_backend(self):
    from tokenizers import Tokenizer as Backend
    return Backend.from_file(str(self.directory / 'tokenizer.json'))

  def _adds(self, special: int | None, where: int) -> bool:
    """Whether tokenizer.json's post-processor puts `special` at the start (0) or end (-1)."""
    plain = self.backend.encode('a', add_special_tokens=False).ids
    full = self.backend.encode('a', add_special_tokens=True).ids
    return special is not None and len(full) > len(plain) and full[where] == special

  def _native_symbols(self):
    ids = {s: self.backend.token_to_id(s) for s in self.user_symbols}
    return {s: i for s, i in ids.items() if i is not None}

  def symbol_id(self, symbol: str) -> int:
    """A user symbol's id, or that of a token the tokenizer adds itself (T5's sentinels
    <extra_id_N>, [MASK]): tokenizer.json matches those in text already."""
    i = None if symbol in self._symbol_ids else self.backend.token_to_id(symbol)
    return super().symbol_id(symbol) if i is None else i

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
  """A SentencePiece tokenizer.model (Llama 2, Mistral v0.1) or T5's spiece.model, special
  ids from the HF config. T5's extra ids (tokenizer_config.json extra_ids, 100 by default)
  are the sentinels <extra_id_99> ... <extra_id_0> after the pieces, as T5Tokenizer has them
  (<extra_id_0> the top id)."""
  kind = 'hf_sentencepiece'

  def __init__(self, directory, hf_config: dict | None = None, specials: dict | None = None,
               user_symbols=()):
    self.directory = pathlib.Path(directory)
    t5 = not (self.directory / 'tokenizer.model').exists()  # spiece.model: T5's name
    path = self.directory / ('spiece.model' if t5 else 'tokenizer.model')
    n_extra = _json(self.directory / 'tokenizer_config.json').get('extra_ids', 100 if t5 else 0)
    sentinels = [f'<extra_id_{i}>' for i in reversed(range(n_extra))]
    super().__init__(path.read_bytes(),
                     sentinels + [s for s in user_symbols if s not in sentinels])
    if specials is None:
      sp = self.sp
      unk = sp.id_to_piece(sp.unk_id()) if sp.unk_id() >= 0 else None
      to_id = lambda t: None if sp.is_unknown(sp.piece_to_id(t)) and t != unk else sp.piece_to_id(t)
      # Without a tokenizer_config.json: LlamaTokenizer's defaults (BOS, no EOS); T5
      # appends EOS.
      found = dict(pad_id=self.pad_id, bos_id=self.bos_id, eos_id=self.eos_id, unk_id=self.unk_id,
                   default_add_bos=self.bos_id is not None and not t5, default_add_eos=t5)
      specials = _resolve_specials(self.directory, to_id, hf_config, found)
    self._set_specials(specials)

  def encode_batch(self, texts, add_bos=False, add_eos=False):
    # The parent's fast path adds SentencePiece's own BOS/EOS, which the HF config may override.
    return Tokenizer.encode_batch(self, texts, add_bos, add_eos)


class HFWordPieceTokenizer(HFTokenizer):
  """BERT's WordPiece from vocab.txt and tokenizer_config.json (directories without a
  tokenizer.json), built in the `tokenizers` library as transformers' BertTokenizer builds
  it: BERT's normalizer (lower-casing and accent stripping as do_lower_case and
  strip_accents say, CJK characters split), punctuation-splitting pre-tokenizer, '##'
  continuations, [CLS] text [SEP]."""
  kind = 'hf_wordpiece'

  def _load_backend(self):
    from tokenizers import Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors
    cfg = _json(self.directory / 'tokenizer_config.json')
    token = lambda name, default: (lambda t: t.get('content') if isinstance(t, dict) else t)(
        cfg.get(name) or default)
    unk, cls, sep = (token(f'{n}_token', f'[{n.upper()}]') for n in ('unk', 'cls', 'sep'))
    vocab = {}
    for line in (self.directory / 'vocab.txt').read_text(encoding='utf-8').split('\n'):
      if line:
        vocab.setdefault(line.rstrip('\r'), len(vocab))
    missing = [t for t in (unk, cls, sep) if t not in vocab]
    if missing:
      raise ValueError(f'{self.directory / "vocab.txt"} lacks {missing}: not a BERT vocabulary '
                       '(or tokenizer_config.json names other special tokens).')
    backend = Backend(models.WordPiece(
        vocab, unk_token=unk, max_input_chars_per_word=cfg.get('max_input_chars_per_word', 100)))
    lowercase = cfg.get('do_lower_case', True)  # BertTokenizer's defaults
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=cfg.get('tokenize_chinese_chars', True),
        strip_accents=cfg.get('strip_accents'), lowercase=lowercase)  # None: as lowercase
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix='##')
    backend.post_processor = processors.TemplateProcessing(
        single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    names = ('unk_token', 'sep_token', 'pad_token', 'cls_token', 'mask_token')
    backend.add_special_tokens([t for t in (token(n, None) for n in names) if t in vocab])
    return backend


KINDS = {cls.kind: cls for cls in (HFTokenizer, HFSentencePieceTokenizer, HFWordPieceTokenizer)}
for _cls in KINDS.values():
  register_tokenizer(_cls.kind, _cls)
del _cls


def from_hf_dir(directory, hf_config: dict | None = None) -> Tokenizer:
  """The tokenizer of a HF model directory: tokenizer.json first (as AutoTokenizer does)."""
  d = pathlib.Path(directory)
  if (d / 'tokenizer.json').exists():
    return HFTokenizer(d, hf_config)
  if (d / 'tokenizer.model').exists() or (d / 'spiece.model').exists():
    return HFSentencePieceTokenizer(d, hf_config)
  if (d / 'vocab.txt').exists():
    return HFWordPieceTokenizer(d, hf_config)
  raise FileNotFoundError(f'{d} has neither tokenizer.json (read with the tokenizers library) '
                          'nor tokenizer.model / spiece.model (SentencePiece) nor vocab.txt '
                          '(WordPiece); save '
                          'the tokenizer there too: '
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
