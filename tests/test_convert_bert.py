"""BERT / RoBERTa import and export: parity with transformers, round trips, WordPiece, errors.

Every model here is random and tiny, built offline from a transformers config.
"""
import functools
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
pytest.importorskip('tokenizers')

from lm.convert import hf, hf_tokenizers  # noqa: E402
from conftest import subprocess_env  # noqa: E402
from lm.convert import safetensors_io as st  # noqa: E402
from lm.infer.load import load_run  # noqa: E402
from lm.models import get_model  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP = tempfile.TemporaryDirectory(prefix='test_convert_bert_')
MIXED = "Héllo, Wörld! Ünïcödé café: 123-456 中文字符 naïve RÉSUMÉ 3.14 don't [MASK] x²"
TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Hello world! How are you today?',
         MIXED, MIXED.lower(), 'Café résumé naïve: 12,345 and 678.', '中文 字符 文字'] * 10
V = 300  # >= every test tokenizer's vocabulary
SMALL = dict(vocab_size=V, max_position_embeddings=24, hidden_size=32, intermediate_size=48,
             num_hidden_layers=2, num_attention_heads=4)

# name: (architecture, config, tokenizer): heads 2, 3, 4 and 8, layers 1 to 3, both token
# type table sizes, BERT's and RoBERTa's epsilon.
CASES = {
    'bert_mlm': ('BertForMaskedLM', SMALL, 'wordpiece_txt'),
    'bert_model': ('BertModel', dict(SMALL, hidden_size=48, num_attention_heads=3,
                                     num_hidden_layers=3, intermediate_size=40), 'wordpiece_json'),
    'bert_cls': ('BertForSequenceClassification', dict(SMALL, num_hidden_layers=1,
                                                       num_attention_heads=8, num_labels=3),
                 'wordpiece_txt'),
    'roberta_mlm': ('RobertaForMaskedLM', dict(SMALL, max_position_embeddings=26,
                                               num_attention_heads=2, type_vocab_size=1,
                                               layer_norm_eps=1e-5, pad_token_id=1,
                                               bos_token_id=0, eos_token_id=2), 'bytelevel'),
}


# -- Building HF directories -------------------------------------------------------------------

def save_tokenizer(kind, directory, lowercase=True, strip_accents=None):
  """wordpiece_txt: vocab.txt + tokenizer_config.json only (older BERT directories);
  wordpiece_json: as transformers 5 saves BertTokenizer (tokenizer.json); bytelevel: RoBERTa."""
  from tokenizers import BertWordPieceTokenizer, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors, trainers
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  if kind == 'bytelevel':
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ['<s>', '<pad>', '</s>', '<unk>', '<mask>']
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=V, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.RobertaProcessing(('</s>', 2), ('<s>', 0))
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token='<s>', pad_token='<pad>', eos_token='</s>',
        unk_token='<unk>', mask_token='<mask>', cls_token='<s>', sep_token='</s>'
    ).save_pretrained(d)
    return d
  wp = BertWordPieceTokenizer(lowercase=lowercase, strip_accents=strip_accents)
  wp.train_from_iterator(TEXTS, vocab_size=200, min_frequency=1, show_progress=False)
  vocab = sorted(wp.get_vocab().items(), key=lambda kv: kv[1])
  (d / 'vocab.txt').write_text(''.join(token + '\n' for token, _ in vocab), encoding='utf-8')
  (d / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='BertTokenizer', do_lower_case=lowercase, strip_accents=strip_accents,
      tokenize_chinese_chars=True, unk_token='[UNK]', sep_token='[SEP]', pad_token='[PAD]',
      cls_token='[CLS]', mask_token='[MASK]')))
  if kind == 'wordpiece_json':
    transformers.BertTokenizer.from_pretrained(d).save_pretrained(d)
    (d / 'vocab.txt').unlink()  # transformers 5 writes tokenizer.json only
  return d


@functools.lru_cache(maxsize=None)
def hf_dir(name: str) -> pathlib.Path:
  """A saved random HF model (every weight random, norms included) and its tokenizer."""
  arch, cfg, tok = CASES[name]
  d = pathlib.Path(TMP.name) / f'hf_{name}'
  config_cls = transformers.RobertaConfig if arch.startswith('Roberta') else transformers.BertConfig
  torch.manual_seed(0)
  model = getattr(transformers, arch)(config_cls(**cfg)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  model.save_pretrained(d)
  save_tokenizer(tok, d)
  return d


@functools.lru_cache(maxsize=None)
def hf_model(name: str):
  return getattr(transformers, CASES[name][0]).from_pretrained(hf_dir(name)).eval()


SCANNED = ('roberta_mlm',)  # imported with stacked layers (runtime.scan_layers)


@functools.lru_cache(maxsize=None)
def imported(name: str):
  """(workdir, config, params, tokenizer) of the lm run converted from hf_dir(name)."""
  workdir = pathlib.Path(TMP.name) / f'lm_{name}'
  hf.convert_from_hf(hf_dir(name), workdir, scan_layers=name in SCANNED)
  _, params, config, tokenizer = load_run(workdir)
  return workdir, config, params, tokenizer


def batch(name):
  """Token ids, attention mask (the second row padded) and token types."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, V, (2, 12))
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  ids[1, 8:] = CASES[name][1].get('pad_token_id', 0)
  types = rng.integers(0, CASES[name][1].get('type_vocab_size', 2), ids.shape) * mask
  return ids, mask, types


def lm_outputs(model, params, ids, mask, types, heads):
  fn = jax.jit(lambda p: {h: model.apply({'params': p}, jnp.asarray(ids),
                                         token_types_BT=jnp.asarray(types),
                                         segment_ids_BT=jnp.asarray(mask), head=h)
                          for h in heads})
  return {h: np.asarray(x) for h, x in fn(params).items()}


def hf_outputs(model, ids, mask, types) -> dict:
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types))
  if 'logits' not in out:  # BertModel
    return dict(hidden=out.last_hidden_state.numpy(), pooled=out.pooler_output.numpy())
  return {'classify' if out.logits.ndim == 2 else 'mlm': out.logits.numpy()}


def assert_same_tensors(dir_a, dir_b):
  a = {k: st.read_tensor(v) for k, v in st.index_directory(dir_a).items()}
  b = {k: st.read_tensor(v) for k, v in st.index_directory(dir_b).items()}
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- Parity and round trips ----------------------------------------------------------------------

@pytest.mark.parametrize('name', list(CASES))
def test_parity_and_round_trip(name, tmp_path):
  d = hf_dir(name)
  workdir, config, params, _ = imported(name)
  if name in SCANNED:
    assert params['layers']['attn']['query']['kernel'].shape == (2, 32, 2, 16)
  ids, mask, types = batch(name)
  want = hf_outputs(hf_model(name), ids, mask, types)
  got = lm_outputs(get_model(config.model, config.runtime), params, ids, mask, types,
                   tuple(want))
  for head in want:  # padded positions are free to differ
    keep = mask[..., None] if want[head].ndim == 3 else 1
    diff = np.abs((got[head] - want[head]) * keep).max()
    assert diff <= 1e-4, f'{name} {head}: differs by {diff}'

  out = tmp_path / 'hf'
  hf.export_hf(workdir, out)
  assert_same_tensors(d, out)
  cfg_in, cfg_out = (json.loads((x / 'config.json').read_text()) for x in (d, out))
  assert {k: v for k, v in cfg_out.items() if k in cfg_in} == cfg_in
  again = getattr(transformers, CASES[name][0]).from_pretrained(out).eval()
  for head, x in hf_outputs(again, ids, mask, types).items():
    np.testing.assert_array_equal(x, want[head])
  assert transformers.AutoTokenizer.from_pretrained(out)(MIXED)['input_ids'] == \
      transformers.AutoTokenizer.from_pretrained(d)(MIXED)['input_ids']


def test_pretraining_checkpoint_layout(tmp_path):
  """bert-base-uncased's layout: BertForMaskedLM in config.json, but BertForPreTraining's
  tensors (the pooler, the next-sentence head, the tied decoder), LayerNorm gamma/beta."""
  from safetensors.numpy import load_file, save_file
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(transformers.BertConfig(**SMALL))
  model.save_pretrained(tmp_path / 'hf')
  d = tmp_path / 'hf'
  tensors = {k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                       'LayerNorm.beta'): v
             for k, v in load_file(d / st.SINGLE).items()}
  tensors['cls.predictions.decoder.weight'] = tensors['bert.embeddings.word_embeddings.weight']
  tensors['bert.embeddings.position_ids'] = np.arange(24)[None]
  save_file(tensors, d / st.SINGLE, metadata={'format': 'pt'})
  cfg = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps(dict(cfg, architectures=['BertForMaskedLM'])))
  m, params, _ = hf.import_hf(d)
  assert (m['pooler'], m['mlm_head'], m['num_labels']) == (True, True, 0)
  np.testing.assert_array_equal(params['pooler']['kernel'](),
                                tensors['bert.pooler.dense.weight'].T)
  np.testing.assert_array_equal(params['layers_1']['mlp_norm']['scale'](),
                                tensors['bert.encoder.layer.1.output.LayerNorm.gamma'])


# -- Tokenizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize('lowercase,strip_accents', [(True, None), (False, None), (True, False)])
def test_wordpiece_matches_transformers(lowercase, strip_accents, tmp_path):
  d = save_tokenizer('wordpiece_txt', tmp_path / 'hf', lowercase, strip_accents)
  tok = hf_tokenizers.from_hf_dir(d)
  assert tok.kind == 'hf_wordpiece' and tok.default_add_bos and tok.default_add_eos
  texts = [MIXED, 'Hello world!', 'ÀÉÎÕÜ àéîõü 中文 ¡¿ 3.14']
  for ref in (transformers.BertTokenizer.from_pretrained(d),
              transformers.BertTokenizerLegacy.from_pretrained(d)):
    for text in texts:
      assert tok.encode(text, add_bos=True, add_eos=True) == ref(text)['input_ids'], (ref, text)
  ref = transformers.BertTokenizer.from_pretrained(d)
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (
      ref.cls_token_id, ref.sep_token_id, ref.pad_token_id, ref.unk_token_id)
  assert tok.decode(tok.encode('hello world')) == 'hello world'
  if not lowercase:  # cased: accents kept, case kept
    assert tok.encode('Café') != tok.encode('cafe')
  masked = hf_tokenizers.HFWordPieceTokenizer(d, user_symbols=('[MASK]',))
  assert masked.symbol_id('[MASK]') == ref.mask_token_id
  tok.save(tmp_path / 'saved')
  again = hf_tokenizers.load(tmp_path / 'saved')
  assert type(again) is type(tok) and again.fingerprint() == tok.fingerprint()
  assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]


@pytest.mark.parametrize('kind', ['wordpiece_json', 'bytelevel'])
def test_tokenizer_json_bert_and_roberta(kind, tmp_path):
  """transformers-saved BERT (tokenizer.json) and RoBERTa (byte-level BPE) directories."""
  d = save_tokenizer(kind, tmp_path / 'hf')
  tok = hf_tokenizers.from_hf_dir(d)
  ref = transformers.AutoTokenizer.from_pretrained(d)
  assert tok.kind == 'hf_tokenizers' and tok.default_add_bos and tok.default_add_eos
  assert (tok.bos_id, tok.eos_id) == (ref.cls_token_id, ref.sep_token_id)
  for text in (MIXED, 'Hello world!', ' lead and trail '):
    assert tok.encode(text, add_bos=True, add_eos=True) == ref(text)['input_ids']


# -- The script and bad input --------------------------------------------------------------------

def test_script_imports(tmp_path):
  """--from_hf in a subprocess; the export is the same code as in-process."""
  env = subprocess_env()
  run = tmp_path / 'run'
  r = subprocess.run([sys.executable, 'scripts/convert_checkpoint.py',
                      f'--from_hf={hf_dir("bert_cls")}', f'--workdir={run}'],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert 'd_model 32' in r.stdout
  hf.export_hf(run, tmp_path / 'out')
  assert_same_tensors(hf_dir('bert_cls'), tmp_path / 'out')


def test_bad_input_is_named(tmp_path):
  d = tmp_path / 'hf'
  shutil.copytree(hf_dir('bert_mlm'), d)
  cfg = json.loads((d / 'config.json').read_text())
  (d / 'config.json').write_text(json.dumps(dict(cfg, hidden_act='gelu_new')))
  with pytest.raises(ValueError, match="hidden_act='gelu_new'.*exact GELU"):
    hf.import_hf(d)
  workdir = imported('bert_model')[0]
  with pytest.raises(ValueError, match=r'model\.mlm_head=True'):
    hf.export_hf(workdir, tmp_path / 'out', arch='BertForMaskedLM')
  with pytest.raises(ValueError, match=r'pos_offset'):
    hf.export_hf(imported('roberta_mlm')[0], tmp_path / 'out', arch='BertForMaskedLM')
