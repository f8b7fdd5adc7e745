"""Parameter-efficient fine-tuning (lm/peft.py): LoRA equals the base at step 0 and merges
and unmerges exactly; QLoRA's base is NF4; prompt and prefix tuning decode with the KV
cache as the full forward pass does; adapter runs train only the adapters from init_from,
keep the base out of their checkpoints, resume bitwise, load (merged) for inference and
travel to and from PEFT; bad targets and a mismatched base are named."""
import dataclasses
import functools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, peft
from lm.config import base_config, llama_model
from lm.data.tokenizers import ByteTokenizer
from lm.infer import sampling
from lm.infer.load import load_run
from lm.ops.backend import Kernels
from lm.train import checkpoint, flops, metrics as metrics_lib, trainer

V = 260  # the bytes tokenizer's ids


@pytest.fixture(scope='module', autouse=True)
def _rbg_prng():
  old = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')  # faster init compiles (test_family_tasks)
  yield
  jax.config.update('jax_default_prng_impl', old)


@pytest.fixture(autouse=True)
def _fast(monkeypatch):
  monkeypatch.setattr(metrics_lib, 'plot_losses', lambda workdir: None)
  monkeypatch.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))


def model_config(**kw):
  """A tiny LLaMA-style decoder (its Hugging Face twin is LlamaForCausalLM)."""
  c = base_config('decoder')
  c.model.update(llama_model(vocab_size=V, max_len=48, d_model=32, n_layers=1, n_heads=4,
                             n_kv_heads=2), **kw)
  return c


_JITTED = {}


def apply(model, params, tokens, dec_tokens=None, **kw):
  """model.apply, jitted once per model and keywords (compiles are most of these tests);
  dec_tokens: an encoder-decoder's decoder input."""
  statics = tuple(sorted((k, v) for k, v in kw.items() if isinstance(v, str)))
  arrays = {k: v for k, v in kw.items() if not isinstance(v, str)}
  key = (id(model), statics, tuple(sorted(arrays)))
  if key not in _JITTED:
    _JITTED[key] = (model, jax.jit(functools.partial(model.apply, **dict(statics))))
  args = (tokens,) if dec_tokens is None else (tokens, dec_tokens)
  return _JITTED[key][1]({'params': params}, *args, **arrays)


def build(c, **peft_fields):
  c.peft.update(peft_fields)
  adapters = peft.from_config(c.peft)
  model = models.get_model(c.model, c.runtime, Kernels(adapters=adapters))
  return model, adapters


def init(model, seed=0, noise=0.0):
  params = nn.unbox(jax.device_get(models.init_params(model, jax.random.PRNGKey(seed))))
  if noise:  # adapters away from their zero init, so they change the function
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + noise * jax.random.normal(k, x.shape) if x.dtype == jnp.float32 else x
              for x, k in zip(leaves, keys)]
    params = jax.tree.unflatten(tree, leaves)
  return params


TOKENS = jnp.array([[5, 9, 77, 3, 41, 41, 8, 100, 2, 7]])


def test_lora_is_the_base_at_step_zero_and_merges_exactly():
  c = model_config()
  model, adapters = build(c, method='lora', rank=4, alpha=8.0,
                          targets=r'attn/(query|value)$|mlp/wo$')
  plain = models.get_model(c.model, c.runtime)
  params = init(model)
  trained, base = peft.partition(params)
  assert {k.rsplit('/', 1)[-1] for k in peft._flat(trained)} == {'lora_a', 'lora_b'}
  assert len(peft._flat(trained)) == 2 * 3  # query, value, wo x (a, b)
  np.testing.assert_allclose(apply(model, params, TOKENS), apply(plain, base, TOKENS),
                             atol=1e-6)  # B = 0 (XLA may order the sums differently)
  params = init(model, noise=0.05)
  adapted = apply(model, params, TOKENS)
  base = peft.partition(params)[1]
  assert np.abs(adapted - apply(plain, base, TOKENS)).max() > 1e-3
  merged = peft.merge(params, adapters)
  np.testing.assert_allclose(apply(plain, merged, TOKENS), adapted, atol=2e-5)
  unmerged = peft.partition(peft.unmerge(merged, peft.partition(params)[0], adapters))[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), unmerged, base)
  # rsLoRA scales by alpha / sqrt(rank)
  assert build(model_config(), method='lora', rank=4, alpha=8.0, rslora=True)[1].scale == 4.0


def test_qlora_base_is_nf4_and_quarter_size():
  c = model_config()
  targets = r'attn/(query|value)$|mlp/wo$'  # the LoRA test's: its init compile is reused
  model, adapters = build(c, method='qlora', rank=4, alpha=8.0, targets=targets)
  plain = models.get_model(c.model, c.runtime)
  base = init(plain)
  lora_model, _ = build(model_config(), method='lora', rank=4, alpha=8.0, targets=targets)
  fresh = init(lora_model, noise=0.05)  # adapters: the same shapes as QLoRA's
  full = peft.quantize_base(peft.combine(peft.partition(fresh)[0], base), adapters)
  flat = peft._flat(full)
  assert not any(k.endswith('query/kernel') for k in flat)
  assert flat['layers_0/attn/query/nf4_codes'].dtype == jnp.uint8
  kernels = sum(v.size * 4 for k, v in peft._flat(base).items() if re.search(
      r'(query|value|wo)/kernel$', k))
  nf4_bytes = sum(v.size * v.dtype.itemsize for k, v in flat.items() if '/nf4_' in k)
  assert 0.12 < nf4_bytes / kernels < 0.14  # 4.13 of 32 bits
  # The adapted model computes with the dequantised kernels: the merge (which dequantises)
  # gives the plain model the same function.
  np.testing.assert_allclose(apply(plain, peft.merge(full, adapters), TOKENS),
                             apply(model, full, TOKENS), atol=2e-5)
  unquantized = peft.merge(peft.combine(peft.partition(fresh)[0], base), adapters)
  err = np.abs(apply(plain, peft.merge(full, adapters), TOKENS)
               - apply(plain, unquantized, TOKENS)).max()
  assert 0 < err < 0.1  # NF4 rounding, small


@pytest.mark.parametrize('method,scan', [('prompt', False), ('prefix', True)])
def test_prompt_and_prefix_decode_as_the_full_forward(method, scan):
  c = model_config(pos_embedding='rope' if scan else 'learned')
  c.runtime.scan_layers = scan
  model, adapters = build(c, method=method, num_virtual_tokens=5, prompt_init='random')
  params = init(model, noise=0.05)
  prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]
  out = sampling.generate(model, params, prompts, max_new_tokens=5, temperature=0.0)
  # The full forward's greedy choices (no cache; right padding changes no earlier logit).
  seqs = [p + list(n) for p, n in zip(prompts, out)]
  width = max(map(len, seqs))
  padded = jnp.array([s + [0] * (width - len(s)) for s in seqs])
  logits = apply(model, params, padded)
  for row, (prompt, new) in enumerate(zip(prompts, out)):
    assert list(np.argmax(logits[row, len(prompt) - 1:len(prompt) + 4], -1)) == list(new)
  # Packed examples each see the prompt / prefix: the second equals itself alone.
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 2]])
  pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]])
  packed = apply(model, params, TOKENS, positions_BT=pos, segment_ids_BT=seg)
  np.testing.assert_allclose(packed[:, 3:], apply(model, params, TOKENS[:, 3:]), atol=1e-5)
  if method == 'prefix':  # the reparameterisation folds away
    folded = models.get_model(c.model, c.runtime, Kernels(
        adapters=dataclasses.replace(adapters, folded=True)))
    np.testing.assert_allclose(
        apply(folded, peft.fold_prefix(params, model.cfg), TOKENS),
        apply(model, params, TOKENS), atol=1e-5)


def test_adapters_shard_like_their_base():
  c = model_config(d_model=64, n_heads=4, n_kv_heads=4)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.peft.update(method='qlora', rank=4, targets=r'attn/query$|mlp/wi$')
  c.task.name = 'causal_lm'
  setup = trainer.build(c)
  spec = lambda tree, path: peft._flat(tree)[path].spec
  sh = setup.state_shardings
  q = 'layers_0/attn/query/'
  assert spec(sh['params'], q + 'lora_a') == jax.sharding.PartitionSpec('fsdp', None)
  assert spec(sh['params'], q + 'lora_b')[1] == 'tensor'  # heads, as the kernel's
  assert spec(sh['frozen'], q + 'nf4_codes')[0] == 'fsdp'
  assert 'layers_0/attn/key/kernel' in peft._flat(sh['frozen'])
  # Only the adapters have optimizer state.
  assert {p.size for p in jax.tree.leaves(setup.abstract_state['opt_state'])} <= {
      1, *(x.size for x in jax.tree.leaves(setup.abstract_state['params']))}


def train_config(workdir_base, steps, **peft_fields):
  c = model_config()
  c.model.vocab_size = 0
  c.init_from = str(workdir_base)
  c.data.update(dataset='text_files', tokenizer='bytes')
  c.train.update(batch_size=4, steps=steps, log_every=1, eval_every=0, seed=1)
  c.optimizer.update(lr=1e-2, warmup_steps=1, decay_steps=4)
  c.checkpoint.update(every_steps=2, keep=2, async_save=False)
  c.peft.update(peft_fields)
  return c


@pytest.fixture(scope='module')
def lora_runs(tmp_path_factory):
  """A random base (params-only run) and LoRA runs from it: 4 steps, and 2 + resume to 4."""
  tmp = tmp_path_factory.mktemp('peft')
  text = tmp / 'corpus.txt'
  text.write_text('def add(a, b):\n  return a + b\n' * 200)
  c = model_config()
  base = init(models.get_model(c.model, c.runtime))
  checkpoint.save_inference_run(tmp / 'base', base, c, ByteTokenizer())
  one = jax.devices()[:1]
  runs = {}
  for name, steps in (('once', 4), ('twice', 2), ('twice', 4)):
    c = train_config(tmp / 'base', steps, method='lora', rank=4, targets=r'attn/(query|value)$')
    c.data.path = str(text)
    runs[name] = trainer.train(c, tmp / name, log=lambda s: None, devices=one)
  return tmp, base, runs


def test_lora_run_trains_adapters_only_and_resumes_bitwise(lora_runs):
  tmp, base, runs = lora_runs
  state = runs['once']['state']
  assert {k.rsplit('/', 1)[-1] for k in peft._flat(state['params'])} == {'lora_a', 'lora_b'}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['frozen']), base)
  assert np.abs(np.asarray(peft._flat(state['params'])['layers_0/attn/query/lora_b'])).max() > 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state['params']),
               jax.device_get(runs['twice']['state']['params']))
  # The checkpoint holds the adapters, not the base.
  meta = (tmp / 'once' / 'checkpoints' / '4' / 'state' / '_METADATA').read_text()
  assert 'lora_a' in meta and 'frozen' not in meta and 'kernel' not in meta


def test_lora_run_loads_merged_and_travels_through_peft(lora_runs):
  tmp, _, runs = lora_runs
  setup, state = runs['once']['setup'], runs['once']['state']
  want = apply(setup.model, trainer.full_params(state), TOKENS)
  model, params, _, _ = load_run(tmp / 'once')  # merged: the plain model
  assert model.cfg.kernels.adapters is None
  np.testing.assert_allclose(apply(model, params, TOKENS), want, atol=2e-5)
  pytest.importorskip('safetensors')
  from lm.convert import peft as peft_io
  out = peft_io.export_run(tmp / 'once', tmp / 'peft_out')
  assert out['r'] == 4 and json.loads((tmp / 'peft_out' / 'adapter_config.json').read_text())
  peft_io.import_run(tmp / 'peft_out', tmp / 'base', tmp / 'from_peft')
  model, params, _, _ = load_run(tmp / 'from_peft')
  np.testing.assert_allclose(apply(model, params, TOKENS), want, atol=2e-5)


def test_bad_targets_and_mismatched_base_are_named(lora_runs, tmp_path):
  tmp, _, _ = lora_runs
  c = train_config(tmp / 'base', 2, method='lora', targets=r'attn/nothing$')
  c.model.vocab_size = V
  with pytest.raises(ValueError, match=r"peft.targets='attn/nothing\$' matches no projection"):
    trainer.build(c)
  # The adapter run's base replaced by another architecture: named, not a shape error.
  other = model_config(d_model=64)
  checkpoint.save_inference_run(
      tmp_path / 'other', init(models.get_model(other.model, other.runtime)), other,
      ByteTokenizer())
  saved = json.loads((tmp / 'once' / 'config.json').read_text())
  saved['init_from'] = str(tmp_path / 'other')
  run = tmp_path / 'moved'
  import shutil
  shutil.copytree(tmp / 'once', run)
  (run / 'config.json').write_text(json.dumps(saved))
  with pytest.raises(ValueError, match='does not match the model these adapters'):
    load_run(run)


def test_classifier_head_from_init_from_trains_beside_lora(lora_runs, tmp_path):
  """A new head (model.num_labels) survives init_from's architecture and trains with the
  adapters (peft.train_also)."""
  tmp, _, _ = lora_runs
  c = train_config(tmp / 'base', 2, method='lora', targets=r'attn/query$')
  c.task.name = 'classification'
  c.model.num_labels = 3
  c, _, load = trainer.init_source(c, log=lambda s: None)
  assert c.model.num_labels == 3 and c.model.d_model == 32
  setup = trainer.build(c)
  trained = peft._flat(setup.abstract_state['params'])
  assert 'classifier/kernel' in trained and 'layers_0/attn/query/lora_a' in trained
  assert 'embed' in peft._flat(setup.abstract_state['frozen'])
  # The source's own params lack the new head (which stays as initialised).
  source = peft._flat(load(setup, None))
  assert 'embed' in source and not any(k.startswith('classifier') for k in source)


@pytest.mark.parametrize('family,method', [('encdec', 'lora')])  # (BERT: the same Linear)
def test_lora_adapts_t5(family, method):
  """Every family's projections go through Linear (BERT's and T5's too): adapted and
  merged models agree."""
  c = base_config(family)
  c.model.update(vocab_size=V, d_model=32, n_layers=1, n_heads=2)
  model, adapters = build(c, method=method, targets=r'attn/(query|value)$')
  params = init(model, noise=0.05)
  # (a, b) x query, value; T5: its decoder's self and cross attention too
  assert len(peft._flat(peft.partition(params)[0])) == {'encoder': 4, 'encdec': 12}[family]
  inputs = tuple(jnp.full_like(x, 7) for x in models.example_inputs(model, 2, 12))
  run = lambda m, p: jax.jit(m.apply)({'params': p}, *inputs)
  plain = models.get_model(c.model, c.runtime)
  np.testing.assert_allclose(run(plain, peft.merge(params, adapters)), run(model, params),
                             atol=2e-5)


@pytest.mark.parametrize('family,method', [('encoder', 'prompt'), ('encoder', 'prefix'),
                                           ('encdec', 'prompt'), ('encdec', 'prefix')])
def test_prompt_and_prefix_tune_bert_and_t5(family, method):
  """BERT and T5 take a soft prompt / per-layer prefixes: they change the function, packed
  examples each see them as if alone, the prefix folds away, and T5's cached greedy decode
  (the prefix before its self-attention cache) equals the full forward's choices."""
  c = base_config(family)
  c.model.update(vocab_size=V, d_model=32, n_layers=1, n_heads=2,
                 **({'num_labels': 3} if family == 'encoder' else {}))
  model, adapters = build(c, method=method, num_virtual_tokens=3, prompt_init='random')
  params = init(model, noise=0.05)
  trained = set(peft._flat(peft.partition(params)[0]))
  want = ({'soft_prompt'} if method == 'prompt' else
          {f'{stack}prefix_{n}' for stack in ({'encoder': ('',), 'encdec': (
              'encoder/', 'decoder/')}[family]) for n in ('embed', 'in/kernel', 'in/bias',
                                                          'out/kernel', 'out/bias')})
  assert trained == want
  plain = models.get_model(c.model, c.runtime)
  base = peft.partition(params)[1]
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2, 2, 2]])
  if family == 'encoder':
    run = lambda m, p, t, **kw: apply(m, p, t, head='classify', **kw)
    assert np.abs(run(model, params, TOKENS) - run(plain, base, TOKENS)).max() > 1e-4
    packed = apply(model, params, TOKENS, head='hidden', segment_ids_BT=seg,
                   positions_BT=jnp.array([[0, 1, 2, 0, 1, 2, 3, 4, 5, 6]]))
    np.testing.assert_allclose(packed[:, 3:], apply(model, params, TOKENS[:, 3:],
                                                    head='hidden'), atol=1e-5)
  else:
    dec = jnp.array([[0, 5, 9, 77]])
    run = lambda m, p, t, **kw: apply(m, p, t, dec_tokens=dec, **kw)
    assert np.abs(run(model, params, TOKENS) - run(plain, base, TOKENS)).max() > 1e-4
    packed = apply(model, params, TOKENS, dec_tokens=dec, encoder_segment_ids_BS=seg,
                   decoder_segment_ids_BT=jnp.full_like(dec, 2))
    np.testing.assert_allclose(packed, run(model, params, TOKENS[:, 3:]), atol=1e-5)
    prompts = [[5, 9, 77, 3], [41, 8]]
    out = sampling.generate(model, params, prompts, max_new_tokens=4, temperature=0.0)
    for prompt, new in zip(prompts, out):
      teacher = jnp.array([[c.model.decoder_start_id] + list(new)[:-1]])
      logits = apply(model, params, jnp.array([prompt]), dec_tokens=teacher)
      assert list(np.argmax(logits[0], -1)) == list(new)
  if method == 'prefix':
    folded = models.get_model(c.model, c.runtime, Kernels(
        adapters=dataclasses.replace(adapters, folded=True)))
    np.testing.assert_allclose(run(folded, peft.fold_prefix(params), TOKENS),
                               run(model, params, TOKENS), atol=1e-5)


def test_rows_shorter_than_the_context_and_a_soft_prompt_fit_max_len():
  """train.seq_len cuts causal_lm / sft rows below model.max_len (a long-context source);
  prompt tuning's rows leave room for the soft prompt."""
  from lm import config as lm_config  # pylint: disable=import-outside-toplevel
  from lm.train import tasks  # pylint: disable=import-outside-toplevel
  c = model_config(max_len=64)
  c.task.name = 'sft'
  assert tasks.get_task(c).batch_spec()['inputs'][0] == (c.train.batch_size, 64)
  c.train.seq_len = 32
  assert tasks.get_task(c).batch_spec()['inputs'][0][1] == 32
  c.peft.update(method='prompt', num_virtual_tokens=8)
  assert lm_config.row_length(c) == 32  # 32 + 8 fit 64
  c.train.seq_len = 0
  assert lm_config.row_length(c) == 56
  c.train.seq_len = 65
  with pytest.raises(ValueError, match='train.seq_len=65 exceeds model.max_len=64'):
    lm_config.row_length(c)
