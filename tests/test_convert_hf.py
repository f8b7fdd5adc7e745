"""Hugging Face import/export: parity with transformers, round trips, tokenizers, bad input.

Every model here is random and tiny, built offline from a transformers config.
"""
import functools
import io
import json
import os
import pathlib
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
from lm.eval import scoring  # noqa: E402
from lm.infer.load import load_run  # noqa: E402
from lm.models import get_model, init_cache  # noqa: E402
from lm.train import checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP = tempfile.TemporaryDirectory(prefix='test_convert_hf_')  # shared models, removed at exit
TEXTS = ['The quick brown fox jumps over the lazy dog. ' * 3, 'Hello world! How are you today?',
         'Tokenizers are fun, 123 456.', 'Sphinx of black quartz, judge my vow.'] * 20
V = 400  # >= every test tokenizer's vocabulary
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=V, initializer_range=0.1, bos_token_id=1, eos_token_id=2)

# name: (architecture, config, tokenizer). Among them: GQA, MQA, untied heads, non-default
# rope_theta, llama3 and linear RoPE scaling, a sliding window, q/k/v biases, head_dim != D/N.
CASES = {
    'gpt2': ('GPT2LMHeadModel', dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2,
                                     n_head=4, initializer_range=0.1, bos_token_id=0,
                                     eos_token_id=0), 'bytelevel'),
    'gpt2_untied': ('GPT2LMHeadModel', dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2,
                                            n_head=4, initializer_range=0.1, bos_token_id=0,
                                            eos_token_id=0,
                                            tie_word_embeddings=False), 'bytelevel'),
    'llama3_gqa': ('LlamaForCausalLM', dict(SMALL, num_key_value_heads=2, rope_parameters=dict(
        rope_type='llama3', rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16),
        max_position_embeddings=64), 'llama_json'),
    'llama2_linear_tied': ('LlamaForCausalLM', dict(SMALL, tie_word_embeddings=True,
                                                    rope_parameters=dict(rope_type='linear',
                                                                         rope_theta=10000.0,
                                                                         factor=2.0)),
                           'sentencepiece'),
    'mistral_mqa_window': ('MistralForCausalLM', dict(SMALL, num_key_value_heads=1, head_dim=32,
                                                      sliding_window=6), 'sentencepiece'),
    'qwen2_bias_tied': ('Qwen2ForCausalLM', dict(SMALL, num_key_value_heads=2,
                                                 tie_word_embeddings=True,
                                                 rope_parameters=dict(rope_type='default',
                                                                      rope_theta=1e6)),
                        'bytelevel'),
}


# -- Building HF directories -------------------------------------------------------------------

def save_tokenizer(kind, directory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  if kind == 'sentencepiece':  # Llama 2 style: tokenizer.model only
    import sentencepiece as spm
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_writer=proto, vocab_size=400, model_type='bpe',
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, byte_fallback=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False, split_digits=True)
    os.makedirs(directory, exist_ok=True)
    (directory / 'tokenizer.model').write_bytes(proto.getvalue())
    (directory / 'tokenizer_config.json').write_text(json.dumps(dict(
        add_bos_token=True, add_eos_token=False, bos_token='<s>', eos_token='</s>',
        unk_token='<unk>', tokenizer_class='LlamaTokenizer')))
    return
  if kind == 'bytelevel':  # GPT-2 style
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ['<|endoftext|>']
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    names = dict(bos_token=specials[0], eos_token=specials[0], unk_token=specials[0])
  else:  # Llama 3 / Mistral style tokenizer.json whose post-processor adds BOS
    tok = Tokenizer(models.BPE(unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=['<unk>', '<s>', '</s>'],
                                  show_progress=False)
    names = dict(bos_token='<s>', eos_token='</s>', unk_token='<unk>')
  tok.train_from_iterator(TEXTS, trainer)
  if kind == 'llama_json':
    tok.post_processor = processors.TemplateProcessing(
        single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)])
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **names).save_pretrained(directory)


@functools.lru_cache(maxsize=None)
def hf_dir(name: str) -> pathlib.Path:
  """A saved random HF model (and tokenizer) for CASES[name]."""
  arch, cfg, tok = CASES[name]
  d = pathlib.Path(TMP.name) / f'hf_{name}'
  config_cls = getattr(transformers, arch.replace('LMHeadModel', 'Config').replace(
      'ForCausalLM', 'Config'))
  torch.manual_seed(0)
  model = getattr(transformers, arch)(config_cls(**cfg)).eval()
  model.save_pretrained(d)
  save_tokenizer(tok, d)
  return d


@functools.lru_cache(maxsize=None)
def hf_model(directory: pathlib.Path):
  return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


@functools.lru_cache(maxsize=None)
def imported(name: str, scan_layers: bool = False):
  """(workdir, config, params, tokenizer) of the lm run converted from hf_dir(name)."""
  workdir = pathlib.Path(TMP.name) / f'lm_{name}{"_scan" if scan_layers else ""}'
  hf.convert_from_hf(hf_dir(name), workdir, scan_layers=scan_layers)
  _, params, config, tokenizer = load_run(workdir)
  return workdir, config, params, tokenizer


def hf_logits(directory, ids):
  with torch.no_grad():
    return hf_model(directory)(torch.tensor(ids)).logits.numpy()


@functools.lru_cache(maxsize=None)
def jit_apply(model):
  return jax.jit(model.apply, static_argnames=('decode', 'mutable'))


def token_ids(b=2, t=12, seed=0):
  return np.random.default_rng(seed).integers(0, V, (b, t)).tolist()


def lm_greedy(model, params, prompt, n):
  """Greedy decoding with the lm KV cache, one token per step (prompt included: one compile)."""
  apply = jit_apply(model)
  # Committed like the step's outputs, so the second step does not compile again.
  cache = jax.device_put(init_cache(model, 1, len(prompt) + n), jax.devices()[0])
  out = []
  for i in range(len(prompt) + n - 1):
    token = prompt[i] if i < len(prompt) else out[-1]
    logits, v = apply({'params': params, 'cache': cache}, jnp.asarray([[token]]), decode=True,
                      mutable=('cache',))
    cache = v['cache']
    if i >= len(prompt) - 1:
      out.append(int(jnp.argmax(logits[0, -1])))
  return out


def hf_greedy(directory, prompt, n):
  model = hf_model(directory)
  model.generation_config.eos_token_id = None  # never stop early
  with torch.no_grad():
    mask = torch.ones(1, len(prompt), dtype=torch.long)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                         pad_token_id=0, attention_mask=mask)
  return out[0, len(prompt):].tolist()


# Each compile costs seconds on CPU: greedy decoding for one case per architecture, scoring
# for GPT-2 here and for llama3_gqa through scripts/score.py.
GREEDY = ('gpt2', 'llama3_gqa', 'mistral_mqa_window', 'qwen2_bias_tied')
SCORED = ('gpt2',)


def assert_same_tensors(dir_a, dir_b):
  a = {k: st.read_tensor(v) for k, v in st.index_directory(dir_a).items()}
  b = {k: st.read_tensor(v) for k, v in st.index_directory(dir_b).items()}
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype, k
    np.testing.assert_array_equal(a[k].astype(np.float32), b[k].astype(np.float32), err_msg=k)


# -- Parity --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(CASES))
def test_parity_with_transformers(name):
  d = hf_dir(name)
  _, config, params, tokenizer = imported(name)
  model = get_model(config.model)
  ids = token_ids()
  diff = np.abs(np.asarray(jit_apply(model)({'params': params}, jnp.asarray(ids)))
                - hf_logits(d, ids)).max()
  assert diff <= 1e-4, f'{name}: logits differ by {diff}'

  if name in GREEDY:
    prompt = tokenizer.encode('Hello world!', add_bos=tokenizer.default_add_bos)
    assert lm_greedy(model, params, prompt, 20) == hf_greedy(d, prompt, 20)
  if name not in SCORED:
    return
  # Log-probabilities as score.py computes them, against transformers' on the same ids.
  seqs = [tokenizer.encode(t, add_bos=tokenizer.default_add_bos) for t in TEXTS[:3]]
  for seq, got in zip(seqs, scoring.score(model, params, seqs)):
    logp = torch.log_softmax(torch.tensor(hf_logits(d, [seq])[0, :-1]), -1)
    want = logp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])].numpy()
    assert got['token_logprobs'][0] is None
    np.testing.assert_allclose(got['token_logprobs'][1:], want, atol=1e-4)
    assert abs(got['total_logprob'] - want.sum()) <= 1e-4 * len(seq)


@pytest.mark.parametrize('name', list(CASES))
def test_round_trip_gives_the_original_tensors(name, tmp_path):
  d = hf_dir(name)
  workdir = imported(name)[0]
  out = tmp_path / 'hf'
  hf.export_hf(workdir, out)
  assert_same_tensors(d, out)
  # config.json keeps every field (and adds the spellings older transformers read).
  cfg_in, cfg_out = (json.loads((x / 'config.json').read_text()) for x in (d, out))
  assert {k: v for k, v in cfg_out.items() if k in cfg_in} == cfg_in
  # transformers loads the export: same logits, same tokenizer.
  ids = token_ids(1, 10, seed=1)
  with torch.no_grad():
    logits = transformers.AutoModelForCausalLM.from_pretrained(out)(torch.tensor(ids)).logits
  np.testing.assert_array_equal(logits.numpy(), hf_logits(d, ids))
  assert transformers.AutoTokenizer.from_pretrained(out)('Hello world')['input_ids'] == \
      transformers.AutoTokenizer.from_pretrained(d)('Hello world')['input_ids']


@pytest.mark.parametrize('arch', ['GPT2ForSequenceClassification',
                                  'LlamaForSequenceClassification'])
def test_sequence_classifiers_match_transformers_and_round_trip(arch, tmp_path):
  """A decoder with model.num_labels (a reward model: one label) is transformers'
  ...ForSequenceClassification: the score on the last non-pad token, both ways."""
  cfg = (dict(CASES['gpt2'][1], pad_token_id=3) if arch.startswith('GPT2') else
         dict(SMALL, num_key_value_heads=2, pad_token_id=3))
  config_cls = getattr(transformers, arch.replace('ForSequenceClassification', 'Config'))
  torch.manual_seed(0)
  d = tmp_path / 'hf'
  getattr(transformers, arch)(config_cls(num_labels=1, **cfg)).eval().save_pretrained(d)
  save_tokenizer('bytelevel', d)
  hf.convert_from_hf(d, tmp_path / 'run')
  model, params, config, _ = load_run(tmp_path / 'run')
  assert config.model.num_labels == 1
  ids = np.array(token_ids(2, 10)) % (V - 4) + 4  # never the pad id (3); row 2 right-padded
  ids[1, 7:] = 3
  seg = (ids != 3).astype(np.int32)
  ours = model.apply({'params': params}, jnp.asarray(ids), segment_ids_BT=jnp.asarray(seg),
                     head='classify')
  with torch.no_grad():
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(d).eval()(
        torch.tensor(ids)).logits.numpy()
  assert np.abs(np.asarray(ours) - theirs).max() <= 1e-4
  hf.export_hf(tmp_path / 'run', tmp_path / 'out')
  assert_same_tensors(d, tmp_path / 'out')
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['architectures'] == [arch]


def test_scanned_layers_import_and_export(tmp_path):
  name = 'llama3_gqa'
  workdir, config, params, _ = imported(name, scan_layers=True)
  assert config.runtime.scan_layers and params['layers']['attn']['key']['kernel'].shape[0] == 2
  ids = token_ids()
  logits = jit_apply(get_model(config.model, config.runtime))({'params': params}, jnp.asarray(ids))
  assert np.abs(np.asarray(logits) - hf_logits(hf_dir(name), ids)).max() <= 1e-4
  hf.export_hf(workdir, tmp_path / 'hf', max_shard_bytes=60_000)  # several shards
  assert len(list((tmp_path / 'hf').glob('model-*.safetensors'))) > 1
  assert_same_tensors(hf_dir(name), tmp_path / 'hf')


def test_hub_gpt2_layout_in_shards(tmp_path):
  """The Hub's GPT-2 files: no 'transformer.' prefix, causal-mask buffers, here in 2 shards."""
  from safetensors.numpy import load_file, save_file
  d = copy_hf('gpt2', tmp_path)
  tensors = {k.removeprefix('transformer.'): v for k, v in load_file(d / st.SINGLE).items()}
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 64, 64), np.float32))
  names = sorted(tensors)
  shards = {'model-00001-of-00002.safetensors': names[:10],
            'model-00002-of-00002.safetensors': names[10:]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, d / file, metadata={'format': 'pt'})
  (d / st.INDEX).write_text(json.dumps({'weight_map': {k: f for f, ks in shards.items()
                                                       for k in ks}}))
  (d / st.SINGLE).unlink()
  _, params, _ = hf.import_hf(d)
  np.testing.assert_array_equal(params['embed'](), tensors['wte.weight'])
  np.testing.assert_array_equal(params['layers_1']['mlp']['wo']['kernel'](),
                                tensors['h.1.mlp.c_proj.weight'])


def test_bfloat16_checkpoints_and_exports(tmp_path):
  """A bf16 checkpoint imports as float32 params; --hf_dtype=bfloat16 writes bf16 back."""
  name = 'llama2_linear_tied'
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(name))
  model.to(torch.bfloat16).save_pretrained(tmp_path / 'bf16')
  save_tokenizer('sentencepiece', tmp_path / 'bf16')
  hf.convert_from_hf(tmp_path / 'bf16', tmp_path / 'run')
  hf.export_hf(tmp_path / 'run', tmp_path / 'out', dtype='bfloat16')
  assert_same_tensors(tmp_path / 'bf16', tmp_path / 'out')


def test_export_from_a_training_checkpoint(tmp_path):
  """A fine-tuned run holds params inside the training state: export finds them there."""
  workdir, config, params, tokenizer = imported('llama3_gqa')
  checkpoint.write_run_files(tmp_path / 'run', config, tokenizer)
  (tmp_path / 'run' / hf.HF_CONFIG).write_text((workdir / hf.HF_CONFIG).read_text())
  ckpt = checkpoint.Checkpointer(tmp_path / 'run', None)
  ckpt.save(7, {'params': params, 'step': np.int32(7)})
  ckpt.close()
  hf.export_hf(tmp_path / 'run', tmp_path / 'out')
  assert_same_tensors(hf_dir('llama3_gqa'), tmp_path / 'out')


# -- The scripts ---------------------------------------------------------------------------------

def run_script(*args):
  env = subprocess_env()
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_scripts_convert_and_score(tmp_path):  # export: the same code, tested in-process
  name = 'llama3_gqa'
  d = hf_dir(name)
  r = run_script('scripts/convert_checkpoint.py', f'--from_hf={d}', f'--workdir={tmp_path / "run"}')
  assert r.returncode == 0, r.stderr
  text = 'Hello world! How are you?'
  r = run_script('scripts/score.py', f'--workdir={tmp_path / "run"}', f'--text={text}')
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  ids = transformers.AutoTokenizer.from_pretrained(d)(text)['input_ids']  # BOS, as HF does
  assert got['token_ids'] == ids
  logp = torch.log_softmax(torch.tensor(hf_logits(d, [ids])[0, :-1]), -1)
  want = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
  np.testing.assert_allclose(got['token_logprobs'][1:], want, atol=1e-4)
  assert abs(got['total_logprob'] - float(want.sum())) <= 1e-3


# -- Tokenizers ----------------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['bytelevel', 'llama_json', 'sentencepiece'])
def test_tokenizers_match_transformers(kind, tmp_path):
  save_tokenizer(kind, tmp_path / 'hf')
  tok = hf_tokenizers.from_hf_dir(tmp_path / 'hf')
  assert tok.kind == ('hf_sentencepiece' if kind == 'sentencepiece' else 'hf_tokenizers')
  ref = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  # No leading space: transformers 5 converts tokenizer.model to a Metaspace tokenizer that
  # does not prepend '▁' to text that starts with a space; SentencePiece (and transformers 4)
  # do, and the native SentencePiece path follows SentencePiece.
  texts = ['Hello world!', 'two  spaces and a\nnewline', 'fox 123']
  for text in texts:
    want = ref(text)['input_ids']
    assert tok.encode(text, add_bos=tok.default_add_bos, add_eos=tok.default_add_eos) == want
  assert tok.default_add_bos == (kind != 'bytelevel')
  if kind == 'sentencepiece':
    assert tok.encode(' lead') == tok.sp.encode(' lead')
  assert (tok.bos_id, tok.eos_id) == (ref.bos_token_id, ref.eos_token_id)
  assert tok.decode(tok.encode('Hello world!', add_bos=True)) == ref.decode(
      ref('Hello world!', add_special_tokens=False)['input_ids'])
  assert tok.encode_batch(texts, add_eos=True) == [tok.encode(t, add_eos=True) for t in texts]
  tok.save(tmp_path / 'saved')
  assert json.loads((tmp_path / 'saved' / hf_tokenizers.MANIFEST).read_text())['kind'] == tok.kind
  again = hf_tokenizers.load(tmp_path / 'saved')
  assert type(again) is type(tok) and again.fingerprint() == tok.fingerprint()
  assert [again.encode(t) for t in texts] == [tok.encode(t) for t in texts]
  assert (again.bos_id, again.default_add_bos, again.vocab_size) == \
      (tok.bos_id, tok.default_add_bos, tok.vocab_size)


# -- Bad input -----------------------------------------------------------------------------------

def copy_hf(name, tmp_path):
  import shutil
  d = tmp_path / 'hf'
  shutil.copytree(hf_dir(name), d)
  return d


def edit_config(d, **changes):
  cfg = json.loads((d / 'config.json').read_text())
  cfg.update(changes)
  (d / 'config.json').write_text(json.dumps(cfg))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
  d = copy_hf('gpt2', tmp_path)
  edit_config(d, architectures=['GPTNeoXForCausalLM'], model_type='gpt_neox')
  with pytest.raises(ValueError, match='GPTNeoXForCausalLM.*GPT2LMHeadModel.*LlamaForCausalLM'):
    hf.import_hf(d)


def test_missing_tensor_is_named(tmp_path):
  from safetensors.numpy import load_file, save_file
  d = copy_hf('llama3_gqa', tmp_path)
  tensors = load_file(d / 'model.safetensors')
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, d / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.up_proj\.weight is missing'):
    hf.import_hf(d)


def test_shape_mismatch_is_named(tmp_path):
  d = copy_hf('llama3_gqa', tmp_path)
  edit_config(d, intermediate_size=128)
  with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.gate_proj\.weight has shape '
                                       r'\[96, 64\].*\[128, 64\]'):
    hf.import_hf(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = copy_hf('mistral_mqa_window', tmp_path)
  edit_config(d, architectures=['LlamaForCausalLM'], model_type='llama', attention_bias=False)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(d / 'model.safetensors')
  tensors['model.layers.0.self_attn.q_proj.bias'] = np.zeros(128, np.float32)
  save_file(tensors, d / 'model.safetensors', metadata={'format': 'pt'})
  with pytest.raises(ValueError, match=r'q_proj\.bias'):
    hf.import_hf(d)


def test_tokenizer_too_big_for_the_model(tmp_path):
  d = copy_hf('gpt2', tmp_path)  # its tokenizer has 300 ids
  torch.manual_seed(0)
  small = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=100, n_positions=16, n_embd=32, n_layer=1, n_head=2))
  small.save_pretrained(d)
  with pytest.raises(ValueError, match='tokenizer .* has 300 ids .* vocabulary .* 100'):
    hf.convert_from_hf(d, tmp_path / 'run')


def test_directory_without_config_says_what_it_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match='no config.json; expected .*save_pretrained'):
    hf.import_hf(tmp_path)


def test_unsupported_features_are_named(tmp_path):
  d = copy_hf('gpt2', tmp_path)
  edit_config(d, activation_function='relu')
  with pytest.raises(ValueError, match='activation_function'):
    hf.import_hf(d)
  d2 = copy_hf('llama3_gqa', tmp_path / 'x')
  edit_config(d2, rope_parameters=dict(rope_type='yarn', rope_theta=1e4, factor=4.0))
  with pytest.raises(ValueError, match="'yarn'.*default, linear, llama3"):
    hf.import_hf(d2)


def test_nonzero_param_the_architecture_lacks_blocks_export(tmp_path):
  """Qwen2's o_proj has no bias: imported as zero, it must stay zero to export."""
  workdir, config, params, tokenizer = imported('qwen2_bias_tied')
  params = jax.tree.map(np.asarray, params)
  params['layers_0']['attn']['out']['bias'] = params['layers_0']['attn']['out']['bias'] + 1.0
  checkpoint.save_inference_run(tmp_path / 'run', params, config, tokenizer)
  (tmp_path / 'run' / hf.HF_CONFIG).write_text((workdir / hf.HF_CONFIG).read_text())
  with pytest.raises(ValueError, match='layers_0/attn/out/bias is not zero'):
    hf.export_hf(tmp_path / 'run', tmp_path / 'out')
  assert not (tmp_path / 'out').exists()  # checked before writing anything
  # As Llama (attention_bias=True, mlp_bias=True) it is exportable, with the same logits.
  hf.export_hf(tmp_path / 'run', tmp_path / 'out', arch='LlamaForCausalLM')
  ids = token_ids(1, 10)
  with torch.no_grad():
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out')(
        torch.tensor(ids)).logits.numpy()
  want = jit_apply(get_model(config.model, config.runtime))({'params': params},
                                                            jnp.asarray(ids))
  assert np.abs(got - np.asarray(want)).max() <= 1e-4


def test_fine_tune_an_imported_run(tmp_path, data_dir):
  """init_from an imported run starts from its params with its model and tokenizer; the
  imported directory itself is never trained in."""
  from lm.config import base_config
  from lm.train import trainer
  workdir, config, params, _ = imported('llama3_gqa')
  run = tmp_path / 'ft'
  c = base_config()  # model fields left at defaults: they come from the source run
  c.init_from = str(workdir)
  c.data.update(dataset='default', data_dir=str(data_dir))
  c.train.update(steps=2, batch_size=2, log_every=1, eval_every=0)
  c.checkpoint.update(async_save=False)
  c.optimizer.update(lr=0.0, min_lr=0.0, warmup_steps=0, weight_decay=0.0)  # lr 0: unchanged
  out = trainer.train(c, run, log=lambda s: None, devices=jax.devices()[:1])
  assert out['step'] == 2 and out['config'].model.to_dict() == config.model.to_dict()
  _, tuned, _, _ = load_run(run)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), params, tuned)
  # Straight from the Hugging Face directory: the same weights and model.
  c.init_from = str(hf_dir('llama3_gqa'))
  out = trainer.train(c, tmp_path / 'ft_hf', log=lambda s: None, devices=jax.devices()[:1])
  assert out['config'].model.to_dict() == config.model.to_dict()
  _, tuned, _, tokenizer = load_run(tmp_path / 'ft_hf')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), params, tuned)
  assert tokenizer.encode('Hello world') == hf_tokenizers.from_hf_dir(
      hf_dir('llama3_gqa')).encode('Hello world')
  # A params-only directory is never silently re-purposed as a training run.
  c.init_from = ''
  with pytest.raises(ValueError, match='init_from'):
    trainer.train(c, workdir, log=lambda s: None, devices=jax.devices()[:1])
