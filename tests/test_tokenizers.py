"""Tokenizers: round trips on any Unicode, special ids, user symbols, save/load, bad input."""
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from lm.config import base_config
from lm.data import tokenizers as tk

REPO = pathlib.Path(__file__).resolve().parents[1]

UNICODE = ('Hello, world!\n\tTabs  and   spaces  \r\n'
           'Ελληνικά, русский, עברית, العربية, हिन्दी, 中文, 日本語, 한국어, ไทย\n'
           'emoji: 👋🏽 👨‍👩‍👧 🇫🇷 and combining é (e\u0301) \u200b zero-width\n')


def _corpus(lines=400):
  """Pseudo-random words in four scripts: enough distinct substrings for ~1000 pieces."""
  rng = random.Random(0)
  alphabets = ['abcdefghijklmnopqrstuvwxyz', 'абвгдежзийклмнопрстуфхцчшщыэюя',
               'αβγδεζηθικλμνξοπρστυφχψω', '天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏']
  out = []
  for _ in range(lines):
    abc = rng.choice(alphabets)
    out.append(' '.join(''.join(rng.choice(abc[:rng.randint(5, len(abc))])
                                for _ in range(rng.randint(1, 8))) for _ in range(12)))
  return '\n'.join(out) + '\n'


CORPUS = _corpus()


@pytest.fixture(scope='module')
def spm_models():
  return {t: tk.train_sentencepiece([CORPUS], vocab_size=400, model_type=t,
                                    user_symbols=['[MASK]'])
          for t in ('bpe', 'unigram')}


def _all(spm_models):
  yield tk.ByteTokenizer()
  yield tk.ByteTokenizer(['[MASK]', '<extra_id_0>'])
  yield tk.CharTokenizer(UNICODE + CORPUS)
  for proto in spm_models.values():
    yield tk.SentencePieceTokenizer(proto)


def test_round_trip_unicode(spm_models):
  for tok in _all(spm_models):
    for text in (UNICODE, '', ' leading and trailing  ', '\n\n', CORPUS[:500]):
      ids = tok.encode(text)
      assert all(0 <= i < tok.vocab_size for i in ids), tok
      assert tok.decode(ids) == text, tok
    assert tok.encode_batch([UNICODE, 'ab']) == [tok.encode(UNICODE), tok.encode('ab')]
    assert tok.decode(np.array(tok.encode(UNICODE))) == UNICODE  # arrays too


def test_sentencepiece_byte_fallback_and_specials(spm_models):
  tok = tk.SentencePieceTokenizer(spm_models['bpe'])
  unseen = 'ᚠᚢᚦ 🦜 ∮ E⋅da'  # none of these characters is in the training text
  assert tok.decode(tok.encode(unseen)) == unseen
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  ids = tok.encode('fox [MASK] dog', add_bos=True, add_eos=True)  # fox: unseen
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
  assert tok.symbol_id('[MASK]') in ids and tok.vocab_size == 400  # native symbol
  assert tok.decode(ids) == 'fox [MASK] dog'
  assert tok.encode_batch(['a b'], add_eos=True) == [tok.encode('a b', add_eos=True)]


def test_bytes_tokenizer():
  tok = tk.ByteTokenizer(['[MASK]'])
  assert tok.vocab_size == 260 and tk.ByteTokenizer().vocab_size == 259
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (256, 257, 258, None)
  ids = tok.encode('a[MASK]é', add_bos=True, add_eos=True)
  assert ids == [257, 97, 259, 0xC3, 0xA9, 258]
  assert tok.decode(ids + [256, 256, 10_000]) == 'a[MASK]é'  # specials, out-of-range dropped
  assert tok.decode([0xC3]) == '\ufffd'  # a sampled broken byte sequence never raises


def test_char_tokenizer():
  tok = tk.CharTokenizer.from_texts(['hello', 'world\n'])
  assert tok.vocab_size == 8 and tok.chars == '\ndehlorw'
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (None, None, None, None)
  assert tok.encode('hold') == [3, 5, 4, 1]
  with pytest.raises(ValueError, match=r"not in the char vocabulary.*' zé'.*tokenizer=bytes"):
    tok.encode('hello zé')
  with pytest.raises(ValueError, match='no bos token'):
    tok.encode('hello', add_bos=True)
  tok = tk.CharTokenizer('ab', ['<sep>'])
  assert tok.vocab_size == 3 and tok.encode('a<sep>b') == [0, 2, 1]


def test_save_load(tmp_path, spm_models):
  for i, tok in enumerate(_all(spm_models)):
    tok.save(tmp_path / str(i))
    back = tk.load_tokenizer(tmp_path / str(i))
    assert type(back) is type(tok) and back.vocab_size == tok.vocab_size
    assert back.fingerprint() == tok.fingerprint()
    assert back.encode(UNICODE) == tok.encode(UNICODE)
    assert (back.pad_id, back.bos_id, back.eos_id, back.unk_id) == (
        tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id)
  with pytest.raises(FileNotFoundError, match='not a saved tokenizer'):
    tk.load_tokenizer(tmp_path / 'nothing')


def test_load_any_model_file(tmp_path, spm_models):
  path = tmp_path / 'any.model'
  path.write_bytes(spm_models['unigram'])
  config = base_config()
  config.data.update(tokenizer='sentencepiece', tokenizer_path=str(path),
                     user_symbols=('<|im_start|>',))
  tok = tk.build_tokenizer(config)
  assert tok.vocab_size == 401  # a symbol the model lacks gets the next id
  assert tok.encode('<|im_start|>') == [400]
  config.data.tokenizer_path = str(tmp_path / 'missing.model')
  with pytest.raises(FileNotFoundError, match='missing.model does not exist'):
    tk.build_tokenizer(config)


def test_vocab_size_the_corpus_cannot_support():
  with pytest.raises(ValueError, match=r'at most \d+ SentencePiece pieces.*lower the vocabulary'):
    tk.train_sentencepiece(['tiny corpus'] * 5, vocab_size=5000, model_type='unigram')
  with pytest.raises(ValueError, match=r'cannot hold the \d+ this corpus needs'):
    tk.train_sentencepiece([CORPUS], vocab_size=200)


def test_char_tokenizer_on_shakespeare_has_65_symbols(shakespeare_path, tmp_path):
  config = base_config()
  config.data.update(dataset='text_files', path=str(shakespeare_path), tokenizer='char',
                     data_dir=str(tmp_path))
  tok = tk.build_tokenizer(config)
  assert tok.vocab_size == 65
  assert tok.chars == "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def test_build_sentencepiece_trains_once_into_data_dir(tmp_path):
  (tmp_path / 'corpus.txt').write_text(CORPUS)
  config = base_config()
  config.data.update(dataset='text_files', path=str(tmp_path / 'corpus.txt'),
                     tokenizer='sentencepiece', vocab_size=450, spm_model_type='unigram',
                     data_dir=str(tmp_path / 'data'))
  tok = tk.build_tokenizer(config)
  assert tok.vocab_size == 450 and tok.decode(tok.encode(UNICODE)) == UNICODE
  [model] = (tmp_path / 'data').rglob('*.model')
  mtime = model.stat().st_mtime_ns
  assert tk.build_tokenizer(config).fingerprint() == tok.fingerprint()
  assert model.stat().st_mtime_ns == mtime  # reused, not retrained
  config.data.update(vocab_size=0)
  with pytest.raises(ValueError, match='tokenizer_path=FILE.model or --config.data.vocab_size'):
    tk.build_tokenizer(config)


def test_train_tokenizer_script(tmp_path):
  (tmp_path / 'a.jsonl').write_text('\n'.join('{"body": "%s"}' % line for line in
                                              CORPUS.splitlines() if line))
  out = tmp_path / 'out.model'
  cmd = [sys.executable, str(REPO / 'scripts/train_tokenizer.py'), f'--path={tmp_path}/*.jsonl',
         '--json_field=body', '--model_type=unigram', '--vocab_size=400',
         f'--data_dir={tmp_path}/data', f'--output={out}']
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'characters per token' in result.stdout
  tok = tk.SentencePieceTokenizer.from_file(out)
  assert tok.vocab_size == 400 and tok.decode(tok.encode(UNICODE)) == UNICODE


def _run_python(code):
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def test_tokenizers_import_without_the_pipeline():
  out = _run_python(
      'import sys\n'
      'import lm.data\n'
      'from lm.data import load_tokenizer\n'
      'import lm.data.tokenizers\n'
      "heavy = ('grain', 'tensorflow_datasets', 'lm.data.pipeline', 'lm.data.sources',\n"
      "         'lm.convert')\n"
      'print(sorted(m for m in heavy if m in sys.modules))\n'
      'lm.data.make_train_iter, lm.data.PackedRows, lm.data.sources\n'  # lazy, still there
      "print('grain' in sys.modules)\n")
  assert out.split('\n')[:2] == ['[]', 'True']


def test_tokenizers_module_never_imports_convert():
  import ast
  tree = ast.parse((REPO / 'lm/data/tokenizers.py').read_text())
  imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  imported += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
  assert not [m for m in imported if m and m.startswith('lm.convert')]


def test_registered_kind_saves_loads_and_builds(tmp_path, monkeypatch):
  monkeypatch.setattr(tk, '_KINDS', dict(tk._KINDS))

  class Reversed(tk.ByteTokenizer):
    kind = 'test_reversed'

    def _encode_plain(self, text):
      return super()._encode_plain(text[::-1])

    def _decode_plain(self, ids):
      return super()._decode_plain(ids)[::-1]

  tok = Reversed(['<x>'])
  tok.save(tmp_path / 'rev')
  with pytest.raises(ValueError, match="Unknown tokenizer kind 'test_reversed'.*known: bytes"):
    tk.load_tokenizer(tmp_path / 'rev')
  tk.register_tokenizer('test_reversed', Reversed)
  back = tk.load_tokenizer(tmp_path / 'rev')
  assert type(back) is Reversed and back.user_symbols == ('<x>',)
  assert back.encode('ab<x>') == tok.encode('ab<x>') == [98, 97, 259]
  config = base_config()
  config.data.update(tokenizer='test_reversed', tokenizer_path=str(tmp_path / 'rev'))
  assert type(tk.build_tokenizer(config)) is Reversed
  # A kind named by module: loading imports the module, which must register it.
  tk.register_tokenizer('test_unregistered', 'json')
  with pytest.raises(RuntimeError, match='did not register'):
    tk.tokenizer_class('test_unregistered')
  (tmp_path / 'nokind').mkdir()
  (tmp_path / 'nokind' / tk.JSON_NAME).write_text('{"model": {}}')  # e.g. a HF tokenizer.json
  with pytest.raises(ValueError, match='names no tokenizer kind'):
    tk.load_tokenizer(tmp_path / 'nokind')


def test_saved_hf_tokenizer_loads_through_lm_data(tmp_path):
  """lm.data.load_tokenizer imports lm.convert.hf_tokenizers (which registers the kind)."""
  tokenizers = pytest.importorskip('tokenizers')
  from lm.convert import hf_tokenizers
  vocab = {'<s>': 0, '</s>': 1, 'hello': 2, 'world': 3, '[UNK]': 4}
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  (tmp_path / 'hf').mkdir()
  backend.save(str(tmp_path / 'hf' / 'tokenizer.json'))
  (tmp_path / 'hf' / 'tokenizer_config.json').write_text(
      '{"bos_token": "<s>", "eos_token": "</s>"}')
  tok = hf_tokenizers.from_hf_dir(tmp_path / 'hf')
  tok.save(tmp_path / 'saved')
  out = _run_python(
      'import sys\n'
      'from lm.data import load_tokenizer\n'
      "print('lm.convert.hf_tokenizers' in sys.modules)\n"
      f'tok = load_tokenizer({str(tmp_path / "saved")!r})\n'
      "print(tok.kind, tok.bos_id, tok.eos_id, tok.encode('hello world', add_bos=True))\n")
  assert out.splitlines() == ['False', 'hf_tokenizers 0 1 [0, 2, 3]']
