"""LoRA adapters <-> Hugging Face PEFT (lm/convert/peft.py): PEFT loads ours onto our --to_hf
export with our logits, ours import PEFT's, round trips are exact, bad adapters are named.

Tiny random models; our side computes LoRA by merging (kernel + scale * a @ b) into a
plain model.
"""
import functools
import json
import math
import pathlib
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')
peft = pytest.importorskip('peft')

from lm.config import base_config, gpt2_model, llama_model  # noqa: E402
from lm.convert import hf  # noqa: E402
from lm.convert import peft as lm_peft  # noqa: E402
from lm.convert import safetensors_io as st  # noqa: E402
from lm.models import get_model, param_table, relayout  # noqa: E402
from lm.train import checkpoint  # noqa: E402

TMP = tempfile.TemporaryDirectory(prefix='test_peft_export_')
V = 128
# name: (model fields, LoRA targets (regex over module paths), rank, alpha, rslora)
CASES = {
    'llama': (llama_model(vocab_size=V, max_len=32, d_model=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, head_dim=16, d_ff=96, init_std=0.1),
              r'attn/(query|key|value|out)$|mlp/', 4, 8.0, False),
    # q and v only (GPT-2 fuses q, k, v), and the MLP's c_proj but not attention's.
    'gpt2': (gpt2_model(vocab_size=V, max_len=32, d_model=64, n_layers=2, n_heads=4,
                        init_std=0.1), r'attn/(query|value)$|mlp/wo$', 4, 6.0, True),
}
IDS = np.random.default_rng(0).integers(0, V, (2, 10))


def make_config(name, scan=False, **model):
  fields, targets, rank, alpha, rslora = CASES[name]
  config = base_config('decoder')
  config.model = hf.model_config(dict(fields, **model))
  config.runtime.scan_layers = scan
  config.peft.update(method='lora', rank=rank, alpha=alpha, rslora=rslora, targets=targets)
  return config


def scale_of(peft_config):
  p = peft_config
  return p.alpha / (math.sqrt(p.rank) if p.rslora else p.rank)


def merge(params, scale):
  """Params of the plain model: kernel + scale * lora_a @ lora_b (contracting r), adapters
  dropped."""
  if not isinstance(params, dict):
    return params
  if 'lora_a' in params:
    out = {k: v for k, v in params.items() if k not in ('lora_a', 'lora_b')}
    out['kernel'] = params['kernel'] + scale * jnp.tensordot(params['lora_a'],
                                                             params['lora_b'], axes=1)
    return out
  return {k: merge(v, scale) for k, v in params.items()}


def with_adapters(params, adapters):
  """params with the adapter tree's leaves added beside them."""
  if not isinstance(adapters, dict):
    return adapters
  out = dict(params)
  for k, v in adapters.items():
    out[k] = with_adapters(params.get(k, {}), v)
  return out


@functools.lru_cache(maxsize=None)
def base(name):
  """(config, params, model, jitted apply, HF export directory) of a random tiny model."""
  config = make_config(name)
  model = get_model(config.model)
  # Random params from the shapes alone: model.init compiles for seconds on CPU.
  rng, flat = np.random.default_rng(1), {}
  for path, shape, _ in param_table(model):
    flat[path] = (path.endswith('scale') + rng.normal(0, 0.1, shape)).astype(np.float32)
  params = hf._nest(flat)
  run = pathlib.Path(TMP.name) / f'run_{name}'
  checkpoint.save_inference_run(run, params, config, None)
  hf.export_hf(run, pathlib.Path(TMP.name) / f'hf_{name}')
  return config, params, model, jax.jit(model.apply)


def hf_dir(name):
  base(name)
  return pathlib.Path(TMP.name) / f'hf_{name}'


def our_logits(name, params):
  return np.asarray(base(name)[3]({'params': params}, jnp.asarray(IDS)))


def peft_logits(name, adapter_dir):
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(name))
  model = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
  with torch.no_grad():
    return model(torch.tensor(IDS)).logits.numpy()


@functools.lru_cache(maxsize=None)
def adapters(name):
  """A random non-zero adapter tree (unscanned) on the case's targets."""
  config, params, _, _ = base(name)
  rng = np.random.default_rng(2)
  r, flat = config.peft.rank, {}
  for path, shape, _ in _kernels(config):
    module = path[:-len('/kernel')]
    if re.search(config.peft.targets, module):
      in_dims = 2 if module.endswith('attn/out') else 1
      flat[module + '/lora_a'] = rng.normal(0, 0.1, shape[:in_dims] + (r,)).astype(np.float32)
      flat[module + '/lora_b'] = rng.normal(0, 0.1, (r,) + shape[in_dims:]).astype(np.float32)
  return hf._nest(flat)


def _kernels(config):
  return [row for row in param_table(get_model(config.model)) if row[0].endswith('/kernel')
          and row[0] != 'lm_head/kernel']


@functools.lru_cache(maxsize=None)
def exported(name):
  config = base(name)[0]
  out = pathlib.Path(TMP.name) / f'peft_{name}'
  cfg = lm_peft.export_peft(with_adapters(base(name)[1], adapters(name)), config, out,
                            base_name_or_path=str(hf_dir(name)))
  return out, cfg


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# -- Export: PEFT loads our adapters ------------------------------------------------------------

@pytest.mark.parametrize('name', list(CASES))
def test_peft_loads_our_adapter_with_our_logits(name):
  config, params = base(name)[:2]
  out, cfg = exported(name)
  saved = json.loads((out / 'adapter_config.json').read_text())
  assert saved == cfg and saved['peft_type'] == 'LORA' and saved['task_type'] == 'CAUSAL_LM'
  assert (saved['r'], saved['lora_alpha'], saved['use_rslora']) == (
      config.peft.rank, config.peft.alpha, config.peft.rslora)
  if name == 'llama':
    assert saved['target_modules'] == ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj',
                                       'up_proj', 'v_proj']
  else:  # c_attn holds q and v: rank 2r; only the MLP's c_proj: full module names
    assert saved['fan_in_fan_out'] and saved['rank_pattern'] == {
        re.escape(f'transformer.h.{i}.attn.c_attn'): 8 for i in range(2)}
    assert saved['target_modules'] == sorted(
        [f'transformer.h.{i}.attn.c_attn' for i in range(2)] +
        [f'transformer.h.{i}.mlp.c_proj' for i in range(2)])
  want = our_logits(name, merge(with_adapters(params, adapters(name)), scale_of(config.peft)))
  assert np.abs(want - our_logits(name, params)).max() > 1e-2  # the adapter matters
  np.testing.assert_allclose(peft_logits(name, out), want, atol=1e-4, rtol=0)


# -- Import ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(CASES))
def test_round_trip_is_exact(name, tmp_path):
  config = base(name)[0]
  out, _ = exported(name)
  got, fields = lm_peft.import_peft(out, config)
  assert_trees_equal(got, adapters(name))
  assert fields == dict(rank=config.peft.rank, alpha=config.peft.alpha,
                        rslora=config.peft.rslora, dropout=0.0, targets=fields['targets'],
                        base_model_name_or_path=str(hf_dir(name)))
  modules = [p[:-len('/kernel')] for p, _, _ in _kernels(config)]
  assert ([m for m in modules if re.search(fields['targets'], m)] ==
          [m for m in modules if re.search(config.peft.targets, m)])
  if name != 'llama':
    return
  # Scanned layers: the same files; the import comes back scanned.
  scanned = make_config(name, scan=True)
  tree = relayout(adapters(name), scanned=True)
  lm_peft.export_peft(tree, scanned, tmp_path)
  for k, info in st.read_header(tmp_path / lm_peft.WEIGHTS_FILE).items():
    np.testing.assert_array_equal(st.read_tensor(info), st.read_tensor(
        st.read_header(out / lm_peft.WEIGHTS_FILE)[k]))
  got, _ = lm_peft.import_peft(tmp_path, scanned)
  assert 'layers' in got and re.search(fields['targets'], 'layers/attn/query')
  assert_trees_equal(got, tree)


# PEFT's own adapters: ranks that differ by module (padded on import), a fused c_attn LoRA
# (each of q, k, v shares its A).
MADE_BY_PEFT = {'llama': dict(target_modules=['q_proj', 'v_proj', 'down_proj'],
                              rank_pattern={'down_proj': 3}),
                'gpt2': dict(target_modules=['c_attn', 'c_fc'], fan_in_fan_out=True)}


@pytest.mark.parametrize('name', list(CASES))
def test_imports_an_adapter_made_by_peft(name, tmp_path):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir(name))
  lora = peft.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, task_type='CAUSAL_LM',
                         **MADE_BY_PEFT[name])
  model = peft.get_peft_model(model, lora).eval()
  with torch.no_grad():
    for n, w in model.named_parameters():
      if 'lora_' in n:
        w.normal_(0, 0.2)
    want = model(torch.tensor(IDS)).logits.numpy()
  model.save_pretrained(tmp_path)
  config, params = make_config(name), base(name)[1]
  got, fields = lm_peft.import_peft(tmp_path, config)
  assert fields['rank'] == (3 if name == 'llama' else 2)
  config.peft.update({k: v for k, v in fields.items() if k in config.peft})
  logits = our_logits(name, merge(with_adapters(params, got), scale_of(config.peft)))
  np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)


# -- Bad input ------------------------------------------------------------------------------------

def copy_export(name, tmp_path, **changes):
  import shutil
  d = tmp_path / 'adapter'
  shutil.copytree(exported(name)[0], d)
  cfg = json.loads((d / 'adapter_config.json').read_text())
  (d / 'adapter_config.json').write_text(json.dumps(dict(cfg, **changes)))
  return d


def test_bad_adapters_are_named(tmp_path):
  config = base('llama')[0]
  with pytest.raises(ValueError, match="peft_type='PREFIX_TUNING'.*only LORA"):
    lm_peft.import_peft(copy_export('llama', tmp_path, peft_type='PREFIX_TUNING'), config)
  with pytest.raises(ValueError, match='use_dora'):
    lm_peft.import_peft(copy_export('llama', tmp_path / 'b', use_dora=True), config)
  with pytest.raises(ValueError, match=r'transformer\.h\.0\.attn\.c_attn.*another architecture'):
    lm_peft.import_peft(exported('gpt2')[0], config)
  with pytest.raises(ValueError, match=r'model\.layers\.0\.mlp\.down_proj\.lora_A\.weight has '
                                       r'shape \[4, 96\].*\[4, 128\]'):
    lm_peft.import_peft(exported('llama')[0], make_config('llama', d_ff=128))
  with pytest.raises(FileNotFoundError, match='adapter_config.json'):
    lm_peft.import_peft(tmp_path, config)


def test_bad_exports_are_named(tmp_path):
  config, params = make_config('llama'), base('llama')[1]
  with pytest.raises(ValueError, match='no LoRA adapters'):
    lm_peft.export_peft(params, config, tmp_path)
  with pytest.raises(ValueError, match='embed has a LoRA adapter.*no linear module'):
    lm_peft.export_peft({'embed': {'lora_a': np.zeros((V, 4)), 'lora_b': np.zeros((4, 64))}},
                        config, tmp_path)
  config.peft.rank = 8
  with pytest.raises(ValueError, match=r'rank \[4\] but config.peft.rank is 8'):
    lm_peft.export_peft(adapters('llama'), config, tmp_path)
