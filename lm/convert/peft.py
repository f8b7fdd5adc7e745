"""LoRA adapters <-> Hugging Face PEFT (adapter_config.json + adapter_model.safetensors).

lm's LoRA: a Linear with `kernel` [*in, *out] carries `lora_a` [*in, r] and `lora_b`
[r, *out] and adds scale * (x @ lora_a) @ lora_b, scale = alpha / r (rsLoRA: alpha /
sqrt(r)). PEFT's: `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight`
[out, r] on the Hugging Face module, the same scale from adapter_config.json.

Which HF module a projection is, and how its axes map, comes from lm.convert.hf's rule
tables (no second table): each kernel rule's to_hf transform is probed with an array of
element indices, which tells the HF tensor's input and output axes, the order of its
columns and rows (heads flattened, GPT-2's fused c_attn) and whether it is stored
[in, out] (GPT-2's Conv1D: PEFT's fan_in_fan_out). LoRAs on several lm projections that
HF fuses into one module (GPT-2's q, k, v in c_attn) export as one LoRA of the summed rank:
the A matrices stacked, B block-diagonal, the rank (and alpha, so the scale stays) in
PEFT's rank_pattern and alpha_pattern. Import splits such a block-diagonal B back, and
gives a general fused LoRA to each part with A shared (the same product).

Every architecture of lm.convert.hf works: Llama/Mistral/Qwen2, GPT-2, BERT/RoBERTa, T5.
Not covered: LoRA on embeddings, DoRA, trained biases, PEFT's modules_to_save (a
classification head trained beside the adapter travels with the merged --to_hf export).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import re
import shutil
import tempfile

import numpy as np

from lm.convert import hf
from lm.convert import safetensors_io as st

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
_PREFIX = 'base_model.model.'
_KEY = re.compile(r'base_model\.model\.(.+?)\.lora_([AB])(?:\.[\w-]+)?\.weight')
_LAYER = re.compile(r'layers_\d+(?=/)')
_TASK_TYPES = {'decoder': 'CAUSAL_LM', 'encdec': 'SEQ_2_SEQ_LM'}


@dataclasses.dataclass(frozen=True)
class _Module:
  """One HF linear module and the lm projections it holds."""
  name: str  # HF module path, 'model.layers.0.self_attn.q_proj'
  paths: tuple[str, ...]  # lm module paths (unscanned), one per fused part
  in_shape: tuple[int, ...]  # the lm kernel's input axes (its lora_a: in_shape + (r,))
  out_shape: tuple[int, ...]  # its output axes (lora_b: (r,) + out_shape)
  in_perm: np.ndarray  # HF input column -> flat lm input index
  out_part: np.ndarray  # HF output row -> which part
  out_index: np.ndarray  # HF output row -> flat lm output index in that part
  fan_in_fan_out: bool  # the HF weight is [in, out] (GPT-2's Conv1D)


def _module_name(tensor: str, path: str) -> str:
  if not tensor.endswith('.weight'):
    raise AssertionError(f'{tensor} (for {path}) is not a weight')  # a rule table bug
  return tensor[:-len('.weight')]


def _probe(rule: hf.Rule, shapes: dict) -> _Module:
  """How rule.to_hf lays out its lm kernels' elements: numbered, transformed, read back."""
  kernel_shapes = [shapes[p] for p in rule.lm]
  sizes = [math.prod(s) for s in kernel_shapes]
  starts = np.cumsum([0] + sizes)
  itype = np.int32 if starts[-1] < 2**31 else np.int64
  xs = [np.arange(s0, s0 + n, dtype=itype).reshape(s)
        for s0, n, s in zip(starts, sizes, kernel_shapes)]
  (w,) = rule.to_hf(*xs)
  w = np.asarray(w)
  name = _module_name(rule.hf[0], rule.lm[0])
  paths = tuple(p[:-len('/kernel')] for p in rule.lm)
  shape = kernel_shapes[0]
  if w.ndim == 2 and all(s == shape for s in kernel_shapes):
    for transposed in (False, True):  # nn.Linear [out, in]; Conv1D [in, out]
      w_OI = w.T if transposed else w
      for k in range(1, len(shape)):  # which leading kernel axes are inputs
        in_size, out_size = math.prod(shape[:k]), math.prod(shape[k:])
        if w_OI.shape[1] != in_size:
          continue
        part_O = np.searchsorted(starts, w_OI[:, 0], side='right') - 1
        local_O = w_OI[:, 0] - starts[part_O]
        in_perm = (w_OI[0] - starts[part_O[0]]) // out_size
        row_O = starts[part_O] + local_O % out_size
        rows = max(1, (1 << 24) // in_size)  # a few rows at a time: 7B kernels are big
        if all(np.array_equal(w_OI[i:i + rows], row_O[i:i + rows, None] + in_perm * out_size)
               for i in range(0, len(row_O), rows)):
          return _Module(name, paths, tuple(shape[:k]), tuple(shape[k:]), in_perm,
                         part_O, local_O % out_size, transposed)
  raise NotImplementedError(f'{name}: its Hugging Face weight is not a plain linear layout '
                            f'of {", ".join(rule.lm)}; LoRA export does not support it.')


class _Layout:
  """lm projections <-> HF modules for one model config, probed on demand."""

  def __init__(self, m: dict, arch: str):
    self.arch, self.family = arch, hf.ARCHS[arch]
    self.shapes = hf.lm_shapes(m)
    rules = self.family.rules(m, self.family.to_hf(m, {}))
    self.rules = {}  # lm module path -> kernel rule
    self.by_name = {}  # HF module name -> kernel rule
    for r in rules:
      if len(r.hf) == 1 and r.lm and all(p.endswith('/kernel') for p in r.lm):
        for p in r.lm:
          self.rules[p[:-len('/kernel')]] = r
        self.by_name[_module_name(r.hf[0], r.lm[0])] = r
    self._probed = {}

  def module(self, rule: hf.Rule) -> _Module:
    # The layers differ only by their index: probe one, rename for the others.
    key = (_LAYER.sub('#', rule.lm[0]), re.sub(r'\.\d+\.', '.#.', rule.hf[0]))
    if key not in self._probed:
      self._probed[key] = _probe(rule, self.shapes)
    mod = self._probed[key]
    return dataclasses.replace(mod, name=_module_name(rule.hf[0], rule.lm[0]),
                               paths=tuple(p[:-len('/kernel')] for p in rule.lm))


def _scale(alpha: float, r: int, rslora: bool) -> float:
  return alpha / math.sqrt(r) if rslora else alpha / r


def _architecture(config, arch: str | None) -> str:
  arch = arch or hf.infer_architecture(config.model.to_dict())
  if arch not in hf.ARCHS:
    raise ValueError(f'Unsupported architecture {arch!r}; supported: {", ".join(hf.ARCHS)}.')
  return arch


def _adapters(params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{unscanned lm module path: (lora_a, lora_b)} from a full or adapter-only tree."""
  if isinstance(params, dict) and set(params) == {'params'}:
    params = params['params']
  found = {}

  def walk(node, path):
    if not isinstance(node, dict):
      return
    if 'lora_a' in node or 'lora_b' in node:
      if not ('lora_a' in node and 'lora_b' in node):
        raise ValueError(f'{path} has only one of lora_a and lora_b.')
      found[path] = (node['lora_a'], node['lora_b'])
    for k, v in node.items():
      walk(v, f'{path}/{k}' if path else str(k))

  walk(params, '')
  out = {}
  for path, (a, b) in found.items():
    a, b = (np.asarray(getattr(x, 'value', x), np.float32) for x in (a, b))  # (unboxed)
    parts = path.split('/')
    if 'layers' in parts:  # scanned: a leading layer axis
      i = parts.index('layers')
      for layer in range(a.shape[0]):
        out['/'.join(parts[:i] + [f'layers_{layer}'] + parts[i + 1:])] = (a[layer], b[layer])
    else:
      out[path] = (a, b)
  return out


def export_peft(params, config, out_dir, base_name_or_path: str = '',
                arch: str | None = None) -> dict:
  """Writes the LoRA adapters in `params` (a full or adapter-only tree, scanned or not) as
  a PEFT adapter directory; returns its adapter_config.json.

  config: the run's config (config.model, and config.peft's alpha, rslora, dropout, rank).
  base_name_or_path: what PEFT records as the base (the --to_hf export's directory or a
  Hub name). arch: the HF architecture (default: the one lm.convert.hf exports to).
  """
  arch = _architecture(config, arch)
  m, p = config.model.to_dict(), config.peft
  adapters = _adapters(params)
  if not adapters:
    raise ValueError('The params hold no LoRA adapters (lora_a/lora_b beside a kernel); '
                     'train with config.peft.method=lora or qlora first.')
  ranks = {a.shape[-1] for a, _ in adapters.values()}
  if ranks != {p.rank}:
    raise ValueError(f'The adapters have rank {sorted(ranks)} but config.peft.rank is '
                     f'{p.rank}; pass the config they were trained with.')
  r, alpha, rslora = int(p.rank), float(p.alpha), bool(p.rslora)
  layout = _Layout(m, arch)

  modules = {}  # HF module name -> (_Module, [present part indices])
  for path in sorted(adapters):
    rule = layout.rules.get(path)
    if rule is None:
      raise ValueError(f'{path} has a LoRA adapter, but {arch} has no linear module for it '
                       '(LoRA on embeddings and norms does not export to PEFT).')
    mod = layout.module(rule)
    a, b = adapters[path]
    if a.shape != mod.in_shape + (r,) or b.shape != (r,) + mod.out_shape:
      raise ValueError(f'{path}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not '
                       f'fit its kernel {list(mod.in_shape + mod.out_shape)} at rank {r}.')
    modules.setdefault(mod.name, (mod, []))[1].append(mod.paths.index(path))

  tensors, rank_pattern, alpha_pattern = {}, {}, {}
  for name, (mod, parts) in modules.items():
    parts = sorted(parts)
    n = len(parts)
    a_RI = np.concatenate([adapters[mod.paths[j]][0].reshape(-1, r).T for j in parts])
    b_OR = np.zeros((len(mod.out_part), n * r), np.float32)
    for k, j in enumerate(parts):
      rows = np.nonzero(mod.out_part == j)[0]
      b_OR[rows, k * r:(k + 1) * r] = adapters[mod.paths[j]][1].reshape(r, -1).T[
          mod.out_index[rows]]
    tensors[f'{_PREFIX}{name}.lora_A.weight'] = a_RI[:, mod.in_perm]
    tensors[f'{_PREFIX}{name}.lora_B.weight'] = b_OR
    if n > 1:  # a fused module: rank n*r, with alpha scaled to keep alpha / r's scale
      key = re.escape(name)
      rank_pattern[key] = n * r
      alpha_pattern[key] = alpha * (math.sqrt(n) if rslora else n)

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  writer = st.Writer(out / WEIGHTS_FILE, {k: (v.shape, np.float32) for k, v in tensors.items()})
  for k, v in tensors.items():
    writer.write(k, np.ascontiguousarray(v))
  writer.close()
  fan_in = {mod.fan_in_fan_out for mod, _ in modules.values()}
  family = m.get('family', 'decoder')
  task = _TASK_TYPES.get(family) or ('SEQ_CLS' if m.get('num_labels') else 'FEATURE_EXTRACTION')
  peft_config = dict(
      peft_type='LORA', task_type=task, base_model_name_or_path=str(base_name_or_path),
      revision=None, inference_mode=True, r=r, lora_alpha=alpha, lora_dropout=float(p.dropout),
      use_rslora=rslora, target_modules=_target_modules(layout, set(modules)), bias='none',
      fan_in_fan_out=fan_in == {True}, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
      modules_to_save=None, init_lora_weights=True, layers_to_transform=None,
      layers_pattern=None, use_dora=False)
  (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))
  return peft_config


def _target_modules(layout: _Layout, names: set[str]) -> list[str]:
  """PEFT's target_modules: the modules' last names ('q_proj') where those pick exactly
  these modules, else their full names."""
  short = {n.rsplit('.', 1)[-1] for n in names}
  picked = {n for n in layout.by_name if n.rsplit('.', 1)[-1] in short}
  return sorted(short) if picked == names else sorted(names)


# -- Import ----------------------------------------------------------------------------------

def _pattern_value(pattern: dict, name: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
  for key, value in (pattern or {}).items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _targets_regex(paths: set[str], all_paths: set[str]) -> str:
  """A regex (re.search over lm module paths, scanned or not) that picks exactly `paths`."""
  kinds = {}
  for p in all_paths:
    kinds.setdefault(_LAYER.sub('layers_#', p), set()).add(p)
  alternatives = set()
  for kind, members in kinds.items():
    chosen = members & paths
    if chosen == members:
      alternatives.add(r'layers(_\d+)?'.join(re.escape(x) for x in kind.split('layers_#')))
    else:
      alternatives.update(re.escape(c) for c in chosen)
  return '^(' + '|'.join(sorted(alternatives)) + ')$'


def _read_config(d: pathlib.Path) -> dict:
  if not (d / CONFIG_FILE).exists():
    raise FileNotFoundError(f'{d} has no {CONFIG_FILE}; expected a PEFT adapter directory '
                            f'({CONFIG_FILE} and {WEIGHTS_FILE}, as save_pretrained writes).')
  cfg = json.loads((d / CONFIG_FILE).read_text())
  if cfg.get('peft_type') != 'LORA':
    raise ValueError(f'{d / CONFIG_FILE} has peft_type={cfg.get("peft_type")!r}; only LORA '
                     'adapters import (prompt and prefix tuning are lm-only).')
  unsupported = [k for k in ('use_dora', 'lora_bias', 'target_parameters', 'modules_to_save',
                             'trainable_token_indices') if cfg.get(k)]
  if cfg.get('bias', 'none') != 'none':
    unsupported.append(f'bias={cfg["bias"]!r}')
  if unsupported:
    raise ValueError(f'{d / CONFIG_FILE} uses {", ".join(unsupported)}, which lm\'s LoRA does '
                     'not have; merge the adapter into the model in PEFT and import that.')
  if not (d / WEIGHTS_FILE).exists():
    raise FileNotFoundError(f'{d} has no {WEIGHTS_FILE} (an adapter_model.bin? save it with '
                            'safe_serialization=True).')
  return cfg


def _split(mod: _Module, a_RI: np.ndarray, b_OR: np.ndarray) -> dict[int, tuple]:
  """{part: (a [in, r'], b [r', out])} of one HF module's LoRA: a block-diagonal B (as
  export writes a fused module) splits into its blocks, else each part shares A."""
  n_parts = len(mod.paths)
  rows = [np.nonzero(mod.out_part == j)[0] for j in range(n_parts)]
  a_IR = np.zeros((len(mod.in_perm), a_RI.shape[0]), np.float32)
  a_IR[mod.in_perm] = a_RI.T

  def part_b(j, cols):  # [r', flat out] in lm's output order
    b = np.zeros((len(cols), len(rows[j])), np.float32)
    b[:, mod.out_index[rows[j]]] = b_OR[np.ix_(rows[j], cols)].T
    return b

  used = [np.nonzero(np.any(b_OR[rows[j]] != 0, axis=0))[0] for j in range(n_parts)]
  present = [j for j in range(n_parts) if len(used[j])]
  r = a_RI.shape[0]
  if n_parts > 1 and present and r % len(present) == 0:
    s = r // len(present)
    if all(np.all((used[j] >= k * s) & (used[j] < (k + 1) * s)) for k, j in enumerate(present)):
      return {j: (a_IR[:, k * s:(k + 1) * s], part_b(j, np.arange(k * s, (k + 1) * s)))
              for k, j in enumerate(present)}
  return {j: (a_IR, part_b(j, np.arange(r))) for j in range(n_parts)}


def import_peft(peft_dir, config, arch: str | None = None) -> tuple[dict, dict]:
  """(adapter params, peft fields) from a PEFT LoRA adapter directory for config.model.

  The params are lm's layout: {..: {'lora_a', 'lora_b'}} at each adapted module's path,
  scanned when config.runtime.scan_layers. The fields are config.peft's (rank, alpha,
  rslora, dropout, targets: a regex over lm module paths) plus base_model_name_or_path.
  Modules of different ranks are zero-padded to the largest, and a module whose scale
  differs from the adapter's has it folded into lora_b, so the adapted model is the same.
  """
  from lm.models import relayout
  d = pathlib.Path(peft_dir)
  cfg = _read_config(d)
  arch = _architecture(config, arch)
  layout = _Layout(config.model.to_dict(), arch)
  infos = st.read_header(d / WEIGHTS_FILE)
  pairs = {}
  for key in infos:
    match = _KEY.fullmatch(key)
    if not match:
      raise ValueError(f'{d / WEIGHTS_FILE}: tensor {key} is not a LoRA weight '
                       '(base_model.model.<module>.lora_A.weight / lora_B.weight).')
    name = layout.family.rename(match[1] + '.weight')[:-len('.weight')]
    if name not in layout.by_name:
      raise ValueError(f'{d / WEIGHTS_FILE}: tensor {key} adapts {match[1]}, which {arch} '
                       'with this config has no linear module for: an adapter for another '
                       'architecture or model size?')
    pairs.setdefault(name, {})[match[2]] = infos[key]

  rslora = bool(cfg.get('use_rslora', False))
  r_cfg, alpha_cfg = int(cfg['r']), float(cfg['lora_alpha'])
  scale = _scale(alpha_cfg, r_cfg, rslora)
  found = {}  # lm path -> (a [in, r'], b [r', out], module scale)
  for name, ab in sorted(pairs.items()):
    if set(ab) != {'A', 'B'}:
      raise ValueError(f'{d / WEIGHTS_FILE}: {name} has lora_{"".join(ab)} but not the other.')
    mod = layout.module(layout.by_name[name])
    r = int(_pattern_value(cfg.get('rank_pattern'), name, r_cfg))
    want = {'A': (r, len(mod.in_perm)), 'B': (len(mod.out_part), r)}
    for x in 'AB':
      if tuple(ab[x].shape) != want[x]:
        raise ValueError(f'{d / WEIGHTS_FILE}: {_PREFIX}{name}.lora_{x}.weight has shape '
                         f'{list(ab[x].shape)}, but {arch} with this config (and rank {r}) '
                         f'needs {list(want[x])}: the adapter belongs to another base model.')
    alpha = float(_pattern_value(cfg.get('alpha_pattern'), name, alpha_cfg))
    a_RI, b_OR = (st.read_tensor(ab[x]).astype(np.float32) for x in 'AB')
    for j, (a, b) in _split(mod, a_RI, b_OR).items():
      found[mod.paths[j]] = (a, b, _scale(alpha, r, rslora), mod)

  rank = max(a.shape[1] for a, *_ in found.values())
  # The adapter's own (alpha, r) where the rank stays; else the alpha that keeps its scale.
  alpha_out = alpha_cfg if rank == r_cfg else scale * (math.sqrt(rank) if rslora else rank)
  ours = _scale(alpha_out, rank, rslora)
  flat = {}
  for path, (a, b, s, mod) in found.items():
    pad = rank - a.shape[1]
    if s != ours:
      b = b * np.float32(s / ours)
    flat[path + '/lora_a'] = np.pad(a, ((0, 0), (0, pad))).reshape(mod.in_shape + (rank,))
    flat[path + '/lora_b'] = np.pad(b, ((0, pad), (0, 0))).reshape((rank,) + mod.out_shape)
  params = hf._nest(flat)
  if config.runtime.get('scan_layers', False):
    try:
      params = relayout(params, scanned=True)
    except ValueError as e:
      raise ValueError(f'{d}: the adapter does not adapt the same modules in every layer, '
                       'which scanned layers need; import with runtime.scan_layers=False.') from e
  fields = dict(rank=rank, alpha=alpha_out, rslora=rslora,
                dropout=float(cfg.get('lora_dropout', 0.0)),
                targets=_targets_regex(set(found), set(layout.rules)),
                base_model_name_or_path=cfg.get('base_model_name_or_path') or '')
  return params, fields


# -- run directories (scripts/convert_checkpoint.py) -------------------------------------

def _base_arch(base) -> str | None:
  """The HF architecture a base came from (its kept config.json), else None (inferred)."""
  for name in (hf.HF_CONFIG, 'config.json'):
    f = pathlib.Path(base) / name
    if f.exists():
      cfg = json.loads(f.read_text())
      if 'architectures' in cfg:
        return hf.architecture(cfg)
  return None


def export_run(workdir, out_dir) -> dict:
  """An adapter run's LoRA as a PEFT directory, naming its base (config.init_from)."""
  from lm.infer.load import load_run
  _, params, config, _ = load_run(workdir, merge_adapters=False)
  if config.peft.method not in ('lora', 'qlora'):
    raise ValueError(f'{workdir} is not a LoRA run (peft.method={config.peft.method!r}); '
                     'only LoRA adapters have a PEFT format here.')
  return export_peft(jax_to_numpy(params), config, out_dir,
                     base_name_or_path=config.init_from, arch=_base_arch(config.init_from))


def jax_to_numpy(tree):
  import jax
  return jax.tree.map(np.asarray, jax.device_get(tree))


def import_run(peft_dir, base, workdir):
  """An adapter run in workdir (params-only checkpoint of the adapters) over `base` (an lm
  run directory or a Hugging Face model directory) from a PEFT LoRA directory."""
  from lm.config import base_config
  from lm.convert import hf_tokenizers
  from lm.train import checkpoint
  base = pathlib.Path(base).absolute()
  if (base / 'checkpoints').is_dir():
    config, tokenizer = checkpoint.read_config(base), checkpoint.read_tokenizer(base)
  else:
    m, _, hf_config = hf.import_hf(base)
    tokenizer = hf_tokenizers.from_hf_dir(base, hf_config)
    config = base_config(m.get('family', 'decoder'))
    config.model = hf.model_config(m)
    config.data.tokenizer = tokenizer.kind
  params, fields = import_peft(peft_dir, config, arch=_base_arch(base))
  with config.unlocked():
    config.init_from = str(base)
    config.peft.method = 'lora'
    config.peft.update({k: v for k, v in fields.items() if k in config.peft})
  checkpoint.save_inference_run(workdir, params, config, tokenizer)
  return config


@contextlib.contextmanager
def merged_run(workdir):
  """workdir itself, or for an adapter run a temporary params-only run of the merged model
  (LoRA folded into the base; the base's Hugging Face config kept for a faithful export)."""
  from lm.infer.load import load_run
  from lm.train import checkpoint
  config = checkpoint.read_config(workdir)
  if config.peft.method == 'none':
    yield workdir
    return
  if config.peft.method not in ('lora', 'qlora'):
    raise ValueError(f'{workdir} is a {config.peft.method}-tuning run: its soft prompt or '
                     'prefix has no place in a Hugging Face model; export the base.')
  _, params, config, tokenizer = load_run(workdir)  # merged
  with config.unlocked():
    config.peft.method, config.init_from = 'none', ''
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint.save_inference_run(tmp, params, config, tokenizer)
    source = checkpoint.read_config(workdir).init_from
    for f in (pathlib.Path(source) / hf.HF_CONFIG, pathlib.Path(source) / 'config.json'):
      if f.exists() and 'architectures' in json.loads(f.read_text()):
        shutil.copy(f, pathlib.Path(tmp) / hf.HF_CONFIG)
        break
    yield tmp
