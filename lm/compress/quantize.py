"""Weight-only post-training quantization of the projections: int8, int4 (groups), NF4.

A quantized run's config has `quant.method` set; its Linears (lm/models/layers.py) whose
module path matches `quant.targets` hold their kernel as codes plus scales and dequantize it
in the compute dtype inside the matmul, so the checkpoint on disk and the params in memory
shrink and everything that loads a run (sample.py, score.py, evaluate.py, the server) runs it
unchanged. Formats, for a kernel of input dims K (flattened) and output dims N:
  int8  per output channel: q_codes int8 [kernel shape] = round(w / s), q_scale [N...] =
        max|w| / 127 over the inputs; asymmetric: uint8 codes, scale (max - min) / 255 and
        q_zero = min, w = codes * scale + zero.
  int4  groups of group_size consecutive inputs: q_codes uint8 [K/g, g/2, N] (two codes a
        byte, the even input in the low nibble), q_scale [K/g, N...] = max|w| / 7 (codes
        -7..7, stored + 8); asymmetric: codes 0..15, scale (max - min) / 15, q_zero = min.
  nf4   QLoRA's NormalFloat4 (lm/ops/nf4.py): blocks of 64, double-quantized absmaxes.
The embeddings (and a tied head) stay in the float dtype. With quant.activations='int8'
(w8a8, int8 weights) each projection also quantizes its input per token on the fly and
multiplies int8 by int8 into int32 (the backends' int8 matmuls) before rescaling.

qwix was the first choice: its PTQ finds weights by intercepting the model's dot_generals,
which our Linear may send to a C++ kernel instead, and it has no NF4; our Linear already
dequantizes NF4 for QLoRA, so the three formats share that one path.
"""
from __future__ import annotations

import dataclasses
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('int8', 'int4', 'nf4')
NAMES = ('q_codes', 'q_scale', 'q_zero')


@dataclasses.dataclass(frozen=True)
class Quant:
  """config.quant, resolved (hashable: it sits in the model's Kernels)."""
  method: str
  group_size: int = 128
  block_size: int = 64  # nf4
  asymmetric: bool = False
  targets: str = ''  # regex over module paths ('' : every projection)
  activations: str = 'none'  # 'int8': dynamic per-token int8 activations, int8 matmuls (w8a8)

  def targets_module(self, path) -> bool:
    return re.search(self.targets, '/'.join(str(p) for p in path)) is not None


def from_config(quant) -> Quant | None:
  if quant is None or quant.method == 'none':
    return None
  if quant.method not in METHODS:
    raise ValueError(f"quant.method must be none or one of {', '.join(METHODS)}; got "
                     f'{quant.method!r}.')
  if quant.method == 'int4' and (quant.group_size <= 0 or quant.group_size % 2):
    raise ValueError(f'quant.group_size must be a positive even number, got {quant.group_size}.')
  try:
    re.compile(quant.targets)
  except re.error as e:
    raise ValueError(f'quant.targets={quant.targets!r} is not a regex: {e}.') from None
  activations = quant.get('activations', 'none')
  if activations not in ('none', 'int8'):
    raise ValueError(f"quant.activations must be 'none' or 'int8'; got {activations!r}.")
  if activations == 'int8' and (quant.method != 'int8' or quant.asymmetric):
    raise ValueError('quant.activations=int8 (w8a8) needs symmetric int8 weights '
                     '(--method=int8 without --asymmetric).')
  return Quant(method=quant.method, group_size=quant.group_size, block_size=quant.block_size,
               asymmetric=bool(quant.asymmetric), targets=quant.targets,
               activations=activations)


def param_shapes(shape, in_dims: int, q: Quant) -> dict[str, tuple[tuple[int, ...], object]]:
  """{name: (shape, dtype)} of a kernel's int8/int4 params."""
  in_shape, out_shape = tuple(shape[:in_dims]), tuple(shape[in_dims:])
  k = math.prod(in_shape)
  out = {}
  if q.method == 'int8':
    out['q_codes'] = (tuple(shape), jnp.uint8 if q.asymmetric else jnp.int8)
    out['q_scale'] = (out_shape, jnp.float32)
  elif q.method == 'int4':
    if k % q.group_size:
      raise ValueError(f'quant.group_size={q.group_size} does not divide the {k} inputs of a '
                       f'kernel of shape {tuple(shape)}; pick a divisor of the model width.')
    g = k // q.group_size
    out['q_codes'] = ((g, q.group_size // 2) + out_shape, jnp.uint8)
    out['q_scale'] = ((g,) + out_shape, jnp.float32)
  else:
    raise ValueError(f'param_shapes is for int8/int4, not {q.method}.')
  if q.asymmetric:
    out['q_zero'] = (out['q_scale'][0], jnp.float32)
  return out


def quantize(w, in_dims: int, q: Quant) -> dict:
  """A float kernel -> its params (param_shapes' names and shapes)."""
  w = jnp.asarray(w, jnp.float32)
  shape = w.shape
  out_shape = shape[in_dims:]
  if q.method == 'int8':
    axes = tuple(range(in_dims))
    if q.asymmetric:
      lo, hi = w.min(axes), w.max(axes)
      scale = jnp.maximum(hi - lo, 1e-12) / 255
      codes = jnp.clip(jnp.round((w - lo) / scale), 0, 255).astype(jnp.uint8)
      return dict(q_codes=codes, q_scale=scale, q_zero=lo)
    scale = jnp.maximum(jnp.abs(w).max(axes), 1e-12) / 127
    return dict(q_codes=jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8),
                q_scale=scale)
  g = q.group_size
  shapes = param_shapes(shape, in_dims, q)
  w_GgN = w.reshape((-1, g) + out_shape)
  if q.asymmetric:
    lo, hi = w_GgN.min(1), w_GgN.max(1)
    scale = jnp.maximum(hi - lo, 1e-12) / 15
    codes = jnp.clip(jnp.round((w_GgN - lo[:, None]) / scale[:, None]), 0, 15)
    extra = dict(q_zero=lo)
  else:
    scale = jnp.maximum(jnp.abs(w_GgN).max(1), 1e-12) / 7
    codes = jnp.clip(jnp.round(w_GgN / scale[:, None]), -7, 7) + 8
    extra = {}
  codes = codes.astype(jnp.uint8)
  packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
  assert packed.shape == shapes['q_codes'][0]
  return dict(q_codes=packed, q_scale=scale, **extra)


def dequantize(params: dict, shape, in_dims: int, q: Quant, dtype=jnp.float32):
  """The kernel (in `dtype`) from its params; elementwise, so XLA fuses it into the matmul."""
  out_shape = tuple(shape[in_dims:])
  codes, scale = params['q_codes'], params['q_scale'].astype(jnp.float32)
  zero = params.get('q_zero')
  if q.method == 'int8':
    w = codes.astype(jnp.float32) * scale
    return (w + zero if zero is not None else w).astype(dtype)
  low, high = codes & 0xF, codes >> 4
  c_GgN = jnp.stack([low, high], axis=2).reshape((codes.shape[0], -1) + out_shape)
  c_GgN = c_GgN.astype(jnp.float32) - (0.0 if zero is not None else 8.0)
  w_GgN = c_GgN * scale[:, None]
  if zero is not None:
    w_GgN = w_GgN + zero[:, None]
  return w_GgN.reshape(shape).astype(dtype)


def int8_matmul(x, codes, w_scale, in_dims: int, dtype=jnp.float32):
  """x @ (codes * w_scale) with x quantized on the fly: per token (row), symmetric int8 at
  absmax / 127, an int8 x int8 matmul accumulating in int32, then both scales."""
  x32 = x.astype(jnp.float32)
  contract = tuple(range(x.ndim - in_dims, x.ndim))
  x_scale = jnp.maximum(jnp.abs(x32).max(contract, keepdims=True), 1e-12) / 127
  xq = jnp.clip(jnp.round(x32 / x_scale), -127, 127).astype(jnp.int8)
  y = jax.lax.dot_general(xq, codes, ((contract, tuple(range(in_dims))), ((), ())),
                          preferred_element_type=jnp.int32)
  out_dims = codes.ndim - in_dims
  x_scale = x_scale.reshape(x.shape[:x.ndim - in_dims] + (1,) * out_dims)
  return (y.astype(jnp.float32) * x_scale * w_scale.astype(jnp.float32)).astype(dtype)


def _flat(tree):
  return flax.traverse_util.flatten_dict(tree, sep='/')


def quantize_params(params, abstract, q: Quant):
  """Float params -> the quantized model's (`abstract`: its param shapes, which say which
  kernels are quantized and, by their scales' rank, how many input dims each has)."""
  from lm.ops import nf4
  flat, want = dict(_flat(params)), _flat(abstract)
  if any(k.split('/')[-1] in NAMES or '/nf4_' in k for k in flat):
    raise ValueError('These params are quantized already (q_* / nf4_* leaves); quantize the '
                     'float run they came from.')
  modules = sorted({k.rsplit('/', 1)[0] for k in want
                    if k.endswith('/q_codes') or k.endswith('/nf4_codes')})
  for mod in modules:
    kernel = flat.pop(f'{mod}/kernel')
    scanned = 'layers' in mod.split('/')
    if q.method == 'nf4':
      fn = lambda w: nf4.quantize(w, q.block_size)
      prefix = 'nf4_'
    else:
      # (a scanned stack's layer axis is on both, so it cancels)
      in_dims = kernel.ndim - want[f'{mod}/q_scale'].ndim + (1 if q.method == 'int4' else 0)
      fn = lambda w, in_dims=in_dims: quantize(w, in_dims, q)
      prefix = ''
    out = jax.jit(jax.vmap(fn) if scanned else fn)(kernel)
    flat.update({f'{mod}/{prefix}{n}': v for n, v in out.items()})
  missing = sorted(set(want) - set(flat))
  if missing:
    raise ValueError(f'The quantized model expects params these do not have: {missing[:5]}.')
  for k, s in want.items():
    if tuple(flat[k].shape) != tuple(s.shape):
      raise ValueError(f'{k}: quantized to {tuple(flat[k].shape)}, the model expects '
                       f'{tuple(s.shape)}.')
  return flax.traverse_util.unflatten_dict({k: flat[k] for k in want}, sep='/')


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def quantize_run(workdir, out, method: str, *, group_size: int = 128, asymmetric: bool = False,
                 targets: str = '', activations: str = 'none', step: int | None = None) -> dict:
  """Writes `out`: the run in `workdir` (LoRA merged) with its kernels quantized (method
  'none': the float params alone). Checks everything before writing anything. Returns
  sizes: params bytes before and after, the checkpoint's bytes on disk."""
  import pathlib
  import flax.linen as nn
  from lm import models
  from lm.infer.load import build_model, load_run
  from lm.train import checkpoint
  out = pathlib.Path(out)
  new = checkpoint.derived_run_config(workdir, out, 'quantize')
  new.quant.update(method=method, group_size=group_size, asymmetric=asymmetric,
                   targets=targets, activations=activations)
  q = from_config(new.quant)
  abstract = nn.unbox(models.param_shapes(build_model(new))) if q else None  # checks shapes
  _, params, config, tokenizer = load_run(workdir, step=step)
  qparams = quantize_params(params, abstract, q) if q else params
  checkpoint.save_inference_run(out, qparams, new, tokenizer)
  return dict(method=method, group_size=group_size, asymmetric=asymmetric,
              activations=activations,
              quantized_kernels=sum(1 for k in _flat(qparams) if k.endswith('codes')),
              params_bytes=nbytes(params), quantized_bytes=nbytes(qparams),
              checkpoint_bytes=sum(f.stat().st_size for f in (out / 'checkpoints').rglob('*')
                                   if f.is_file()), out=str(out))
