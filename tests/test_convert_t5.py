"""T5 import/export: logits parity with transformers' T5ForConditionalGeneration (v1.0 and
v1.1 layouts), round trips, T5's SentencePiece tokenizer with its sentinels, bad input.

Every model here is random and tiny, built offline. `make_t5_checkpoint` is reused by the
generation parity tests.
"""
import functools
import io
import json
import pathlib
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
pytest.importorskip('sentencepiece')

from lm.convert import hf, hf_tokenizers  # noqa: E402
from lm.convert import safetensors_io as st  # noqa: E402
from lm.infer.load import load_run  # noqa: E402
from lm.models import get_model  # noqa: E402

TMP = tempfile.TemporaryDirectory(prefix='test_convert_t5_')  # shared models, removed at exit
V = 256  # model vocabulary: >= the test tokenizer's pieces + 100 sentinels, padded as T5's
TEXTS = ['The quick brown fox jumps over the lazy dog.', 'Hello world! How are you today?',
         'Tokenizers are fun, 123 456 7.89; (yes) "quotes" & more...',
         'Café déjà vu, naïve façade, crème brûlée à São Paulo.',
         '東京 日本語のテキスト 中文字符 한국어',
         'Sphinx of black quartz, judge my vow?'] * 10
# Accents, punctuation, digits, CJK, sentinels, unknown characters, runs of spaces.
MIXED = ('Café <extra_id_0> déjà-vu! 123,456.78 東京<extra_id_1>x  two  spaces, naïve '
         '(façade) <extra_id_99>end ~§ 中文')

# name: T5Config fields. v1.0: ReLU, tied head scaled by d**-0.5; v1.1: gated GELU, an untied
# head; d_kv != d_model / num_heads; uneven encoder and decoder depths.
CASES = {
    'v1_0': dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    'v1_1': dict(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                 feed_forward_proj='gated-gelu', tie_word_embeddings=False),
    'v1_0_dkv': dict(d_model=48, d_kv=12, d_ff=64, num_layers=1, num_decoder_layers=2,
                     num_heads=3, relative_attention_num_buckets=16,
                     relative_attention_max_distance=64),
}


# -- Building HF directories -----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def spiece_model() -> bytes:
  """A tiny unigram SentencePiece model with T5's special ids (pad 0, eos 1, unk 2)."""
  import sentencepiece as spm
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TEXTS), model_writer=proto, vocab_size=120, model_type='unigram',
      hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
      character_coverage=1.0)
  return proto.getvalue()


def t5_vocab_size() -> int:
  """The test tokenizer's ids: its pieces, then the 100 sentinels."""
  import sentencepiece as spm
  return spm.SentencePieceProcessor(model_proto=spiece_model()).get_piece_size() + 100


def save_t5_tokenizer(directory, tokenizer_json: bool = True) -> pathlib.Path:
  """spiece.model (as T5's Hub directories have it) and, with tokenizer_json, the files
  transformers' T5Tokenizer saves (tokenizer.json with the 100 <extra_id_N> tokens)."""
  d = pathlib.Path(directory)
  d.mkdir(parents=True, exist_ok=True)
  (d / 'spiece.model').write_bytes(spiece_model())
  (d / 'tokenizer_config.json').write_text(json.dumps(dict(
      tokenizer_class='T5Tokenizer', extra_ids=100, eos_token='</s>', unk_token='<unk>',
      pad_token='<pad>')))
  if tokenizer_json:
    transformers.T5Tokenizer.from_pretrained(d).save_pretrained(d)
  return d


def make_t5_checkpoint(directory, seed: int = 0, tokenizer: bool = True, **config) -> pathlib.Path:
  """A random T5ForConditionalGeneration (and T5's tokenizer) saved as save_pretrained does.

  config: T5Config fields over tiny defaults. tie_word_embeddings=False makes v1.1's layout:
  an untied lm_head.weight and no output scaling. The relative bias tables are scaled up so
  that the position buckets matter to the logits.
  """
  d = pathlib.Path(directory)
  cfg = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
             relative_attention_num_buckets=8, relative_attention_max_distance=20,
             dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  cfg.update(config)
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**cfg)).eval()
  with torch.no_grad():
    for stack in (model.encoder, model.decoder):
      stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.mul_(5.0)
    if not cfg.get('tie_word_embeddings', True):  # v1.1: the head is a tensor of its own
      head = torch.randn(cfg['vocab_size'], cfg['d_model']) * cfg['d_model'] ** -0.5
      model.lm_head.weight = torch.nn.Parameter(head)
  model.save_pretrained(d)
  if tokenizer:
    save_t5_tokenizer(d)
  return d


@functools.lru_cache(maxsize=None)
def hf_dir(name: str) -> pathlib.Path:
  return make_t5_checkpoint(pathlib.Path(TMP.name) / f'hf_{name}', **CASES[name])


@functools.lru_cache(maxsize=None)
def hf_model(directory: pathlib.Path):
  return transformers.T5ForConditionalGeneration.from_pretrained(directory).eval()


def hf_logits(directory, enc, dec, mask=None):
  with torch.no_grad():
    return hf_model(directory)(
        input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec),
        attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


def lm_params(directory, scan_layers=False):
  m, lazy_params, _ = hf.import_hf(directory, scan_layers)
  return m, jax.tree.map(lambda leaf: jnp.asarray(leaf()), lazy_params)


def batch(seed=0, b=2, s=23, t=9):
  """Encoder ids with padding at the end of the second row, and decoder inputs."""
  rng = np.random.default_rng(seed)
  enc = rng.integers(3, V, (b, s))
  mask = np.ones((b, s), np.int64)
  mask[1, s - 7:] = 0
  enc = np.where(mask == 1, enc, 0)
  dec = np.concatenate([np.zeros((b, 1), np.int64), rng.integers(1, V, (b, t - 1))], 1)
  return enc, mask, dec


# -- Parity ----------------------------------------------------------------------------------

# v1_1's parity is checked through its scanned run in the round-trip test (compiles cost).
@pytest.mark.parametrize('name', ['v1_0', 'v1_0_dkv'])
def test_logits_match_transformers(name):
  d = hf_dir(name)
  m, params = lm_params(d)
  assert m['tie_embeddings'] == CASES[name].get('tie_word_embeddings', True)
  model = get_model(hf.model_config(m))
  enc, mask, dec = batch()
  got = jax.jit(model.apply)({'params': params}, enc, dec, mask)
  want = hf_logits(d, enc, dec, mask)
  diff = np.abs(np.asarray(got) - want).max()
  assert diff <= 1e-4, f'{name}: logits differ by {diff}'
  assert np.abs(want).max() > 1.0  # the check compares something


def test_relative_buckets_match_transformers():
  """Every relative position up to well past max_distance, both directions, the bucket
  layouts of t5-small and of the tests (float32 log boundaries included)."""
  from lm.models.encdec import relative_bucket
  relative_bucket = jax.jit(relative_bucket, static_argnums=(1, 2, 3))  # eager: 10x slower
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-1200, 1201)
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 20), (16, 64), (64, 1000)):
      want = bucket(torch.tensor(rel), bidirectional, buckets, distance).numpy()
      got = relative_bucket(jnp.asarray(rel), bidirectional, buckets, distance)
      np.testing.assert_array_equal(got, want)


def test_round_trip_scanned_and_transformers_loads_the_export(tmp_path):
  """v1.1 (untied) through an lm run with scanned layers (two stacks of different depths)
  and back: the same tensors; transformers' model from the export gives the same logits."""
  d = hf_dir('v1_1')
  run = tmp_path / 'run'
  hf.convert_from_hf(d, run, scan_layers=True)
  model, params, config, tokenizer = load_run(run)
  assert config.model.family == 'encdec' and config.runtime.scan_layers
  assert params['decoder']['layers']['attn']['query']['kernel'].shape[0] == 3
  n = t5_vocab_size()
  assert tokenizer.vocab_size == n and tokenizer.symbol_id('<extra_id_0>') == n - 1
  enc, mask, dec = batch(1)
  got = jax.jit(model.apply)({'params': params}, enc, dec, mask)
  assert np.abs(np.asarray(got) - hf_logits(d, enc, dec, mask)).max() <= 1e-4

  out = tmp_path / 'hf'
  hf.export_hf(run, out)
  a = {k: st.read_tensor(v) for k, v in st.index_directory(d).items()}
  b = {k: st.read_tensor(v) for k, v in st.index_directory(out).items()}
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  again = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  with torch.no_grad():
    logits = again(input_ids=torch.tensor(enc), decoder_input_ids=torch.tensor(dec),
                   attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_array_equal(logits, hf_logits(d, enc, dec, mask))
  ref = transformers.AutoTokenizer.from_pretrained(d)
  assert transformers.AutoTokenizer.from_pretrained(out)(MIXED)['input_ids'] == \
      ref(MIXED)['input_ids']


def test_hub_layout_with_embedding_copies_round_trips(tmp_path):
  """Older checkpoints also hold encoder/decoder.embed_tokens (and v1.0 lm_head) copies of
  shared.weight and an unused cross-attention bias table: import ignores them, export
  writes what transformers 5 saves."""
  from safetensors.numpy import load_file, save_file
  d = tmp_path / 'hub'
  shutil.copytree(hf_dir('v1_0'), d)
  tensors = load_file(d / st.SINGLE)
  for name in ('encoder.embed_tokens.weight', 'decoder.embed_tokens.weight', 'lm_head.weight'):
    tensors[name] = tensors['shared.weight']
  bias = 'decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight'
  tensors[bias.replace('0.SelfAttention', '1.EncDecAttention')] = tensors[bias]  # t5-small's
  save_file(tensors, d / st.SINGLE, metadata={'format': 'pt'})
  cfg = json.loads((d / 'config.json').read_text())
  for key in ('scale_decoder_outputs', 'dense_act_fn', 'is_gated_act'):  # a 4.x config.json
    cfg.pop(key, None)
  (d / 'config.json').write_text(json.dumps(cfg))
  (d / 'tokenizer.json').unlink()  # spiece.model alone, as google/t5-v1_1-* have it
  hf.convert_from_hf(d, tmp_path / 'run')
  hf.export_hf(tmp_path / 'run', tmp_path / 'out')
  got = {k: st.read_tensor(v) for k, v in st.index_directory(tmp_path / 'out').items()}
  assert sorted(got) == sorted(load_file(hf_dir('v1_0') / st.SINGLE))
  np.testing.assert_array_equal(got['shared.weight'], tensors['shared.weight'])
  out_cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert out_cfg['tie_word_embeddings'] and out_cfg['feed_forward_proj'] == 'relu'
  enc, mask, dec = batch(2)
  np.testing.assert_array_equal(hf_logits(tmp_path / 'out', enc, dec, mask),
                                hf_logits(hf_dir('v1_0'), enc, dec, mask))
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / 'out')(MIXED)['input_ids'] == \
      transformers.AutoTokenizer.from_pretrained(hf_dir('v1_0'))(MIXED)['input_ids']


# -- Tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize('tokenizer_json', [True, False])
def test_tokenizer_ids_match_transformers(tokenizer_json, tmp_path):
  d = save_t5_tokenizer(tmp_path / 'hf', tokenizer_json)
  tok = hf_tokenizers.from_hf_dir(d)
  ref = transformers.T5Tokenizer.from_pretrained(d)
  n = t5_vocab_size()
  assert tok.vocab_size == len(ref) == n
  for text in [MIXED, *TEXTS[:6]]:
    assert tok.encode(text, add_eos=tok.default_add_eos) == ref(text)['input_ids'], text
  assert tok.default_add_eos and not tok.default_add_bos
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  for i in (0, 1, 99):  # sentinels count down from the top of the vocabulary
    assert tok.symbol_id(f'<extra_id_{i}>') == ref.convert_tokens_to_ids(f'<extra_id_{i}>') \
        == n - 1 - i
  ids = tok.encode('Hello <extra_id_0> world')
  # (Spaces next to a sentinel may differ: SentencePiece decodes each run on its own.)
  assert tok.decode(ids).replace(' ', '') == ref.decode(ids).replace(' ', '') == \
      'Hello<extra_id_0>world'
  tok.save(tmp_path / 'saved')
  again = hf_tokenizers.load(tmp_path / 'saved')
  assert again.encode(MIXED) == tok.encode(MIXED) and again.vocab_size == n


# -- Bad input -------------------------------------------------------------------------------

def test_unsupported_mlp_is_named(tmp_path):
  d = tmp_path / 'hf'
  shutil.copytree(hf_dir('v1_0'), d)
  cfg = json.loads((d / 'config.json').read_text())
  cfg['feed_forward_proj'] = 'gated-silu'
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'.*'gated-gelu'"):
    hf.import_hf(d)
