"""Parameter-efficient fine-tuning: LoRA, QLoRA, prompt tuning and prefix tuning.

config.peft (lm/config.py) becomes an `Adapters` value that rides in the run's `Kernels`
(lm/ops/backend.py), so every family's modules see it without new arguments:
- lora / qlora: each `Linear` (lm/models/layers.py) whose module path matches
  peft.targets gets `lora_a` [in..., r] (random, as the LoRA paper's A) and `lora_b`
  [r, out...] (zeros: the adapted model equals the base at step 0) and adds
  scale * dropout(x) @ lora_a @ lora_b, scale = alpha / r (rsLoRA: alpha / sqrt(r)).
  qlora stores those Linears' kernels in NF4 (lm/ops/nf4.py: blocks of 64, absmax
  double-quantised per 256 blocks), dequantised inside the matmul in the compute dtype.
- prompt: `soft_prompt` [P, D] embeddings before every packed example (the decoder).
- prefix: per-layer key/value prefixes from `prefix_embed` [P, D] through a two-layer
  tanh MLP (the paper's reparameterisation); `fold_prefix` replaces them by the keys and
  values they produce (`prefix_kv`), which the KV cache is primed with at decode time.

The train state then holds only the trainable params (adapters, plus peft.train_also:
new heads) with their optimizer state; the frozen base is `state['frozen']`, loaded from
config.init_from and never written to checkpoints (adapter-only checkpoints: megabytes).
qwix (Google's JAX LoRA/quantization library) was the first choice; it finds weights by
intercepting dot_general on the very param array, which our Linear casts, reshapes and
may send to a C++ kernel first, it has no NF4 double quantisation, and its adapters do
not carry our logical axes for the mesh; so LoRA lives in Linear, with qwix's arithmetic.
"""
from __future__ import annotations

import dataclasses
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np

# config.model fields a fine-tuning run sets itself (new heads): kept when init_from gives
# the run the source's architecture, and ignored when an adapter run's base is checked.
HEAD_FIELDS = ('num_labels',)
METHODS = ('none', 'lora', 'qlora', 'prompt', 'prefix')
@dataclasses.dataclass(frozen=True)
class Adapters:
  """config.peft, resolved (hashable: it sits in the models' configs via Kernels)."""
  method: str
  rank: int = 8
  scale: float = 2.0
  dropout: float = 0.0
  targets: str = ''
  num_virtual_tokens: int = 16
  prompt_init: str = 'vocab'
  prefix_hidden: int = 0
  nf4_block: int = 64
  folded: bool = False  # prefix: prefix_kv params instead of the reparameterisation

  @property
  def lora(self) -> bool:
    return self.method in ('lora', 'qlora')

  @property
  def num_prefix(self) -> int:
    """Positions every example sees before its own tokens (prompt/prefix), else 0."""
    return self.num_virtual_tokens if self.method in ('prompt', 'prefix') else 0

  def targets_module(self, path: tuple[str, ...]) -> bool:
    return self.lora and re.search(self.targets, module_path(path)) is not None


def module_path(path) -> str:
  """'layers_0/attn/query' for a Linen scope path (scan's 'layers' kept as it is)."""
  return '/'.join(str(p) for p in path)


def from_config(peft) -> Adapters | None:
  """config.peft -> Adapters, or None for full fine-tuning; checks the fields."""
  if peft is None or peft.method == 'none':
    return None
  if peft.method not in METHODS:
    raise ValueError(f"peft.method must be one of {', '.join(METHODS)}; got {peft.method!r}.")
  if peft.method in ('lora', 'qlora'):
    if peft.rank <= 0:
      raise ValueError(f'peft.rank must be positive, got {peft.rank}.')
    try:
      re.compile(peft.targets)
    except re.error as e:
      raise ValueError(f'peft.targets={peft.targets!r} is not a regex: {e}.') from None
  if peft.method in ('prompt', 'prefix') and peft.num_virtual_tokens <= 0:
    raise ValueError('peft.num_virtual_tokens must be positive for prompt/prefix tuning.')
  if peft.prompt_init not in ('vocab', 'random'):
    raise ValueError(f"peft.prompt_init must be 'vocab' or 'random', got {peft.prompt_init!r}")
  scale = peft.alpha / (math.sqrt(peft.rank) if peft.rslora else peft.rank)
  return Adapters(method=peft.method, rank=peft.rank, scale=scale, dropout=peft.dropout,
                  targets=peft.targets, num_virtual_tokens=peft.num_virtual_tokens,
                  prompt_init=peft.prompt_init, prefix_hidden=peft.prefix_hidden,
                  nf4_block=peft.nf4_block, folded=bool(peft.get('folded', False)))


# -- trees ------------------------------------------------------------------------------

def _flat(tree) -> dict[str, object]:
  return flax.traverse_util.flatten_dict(tree, sep='/')


def _unflat(flat: dict[str, object]):
  return flax.traverse_util.unflatten_dict(flat, sep='/')


def is_trainable(path: str, train_also: str = '') -> bool:
  """Adapter params (lora_a/lora_b, soft_prompt, prefix_*, at any depth: T5 keeps a prefix
  per stack) and those train_also matches."""
  parts = path.split('/')
  return (parts[-1] in ('lora_a', 'lora_b') or 'soft_prompt' in parts
          or any(p.startswith('prefix_') for p in parts)
          or bool(train_also and re.search(train_also, path)))


def partition(params, train_also: str = ''):
  """(trainable, frozen) nested dicts that together hold every leaf of params."""
  flat = _flat(params)
  train = {k: v for k, v in flat.items() if is_trainable(k, train_also)}
  frozen = {k: v for k, v in flat.items() if k not in train}
  return _unflat(train), _unflat(frozen)


def combine(trainable, frozen):
  """The inverse of partition."""
  return _unflat({**_flat(frozen), **_flat(trainable)})


def check_targets(params, adapters: Adapters | None) -> None:
  """A target regex that adapts nothing is a mistake: one error naming the paths."""
  if adapters is None or not adapters.lora:
    return
  flat = _flat(params)
  if not any(k.endswith('/lora_a') for k in flat):
    linears = sorted({k.rsplit('/', 1)[0] for k in flat
                      if k.endswith('/kernel') or k.endswith('/nf4_codes')})
    raise ValueError(f'peft.targets={adapters.targets!r} matches no projection; module paths '
                     f'look like {linears[:6]} (regex searched in each).')


# -- LoRA merge -------------------------------------------------------------------------

def _scanned(path: str) -> bool:
  """Whether a param path is in a scanned stack (a leading layer axis on its leaves)."""
  return 'layers' in path.split('/')


def lora_delta(a, b, scale: float, scanned: bool = False):
  """scale * a @ b in the kernel's shape: a [in..., r], b [r, out...] (float32; with
  scanned, a leading layer axis on both)."""
  if scanned:
    return jax.vmap(lambda x, y: lora_delta(x, y, scale))(a, b)
  r = a.shape[-1]
  d = (a.reshape(-1, r).astype(jnp.float32) @ b.reshape(r, -1).astype(jnp.float32)) * scale
  return d.reshape(a.shape[:-1] + b.shape[1:])


def merge(params, adapters: Adapters, sign: float = 1.0):
  """kernel + sign * scale * a @ b for every adapted Linear (dequantising NF4 kernels),
  adapters dropped: the plain model's params. sign=-1 with the adapters kept unmerges."""
  from lm.ops import nf4  # lazy: only LoRA runs need it
  flat = dict(_flat(params))
  for key in [k for k in flat if k.endswith('/lora_a')]:
    mod = key[:-len('/lora_a')]
    a, b = flat.pop(key), flat.pop(mod + '/lora_b')
    delta = lora_delta(a, b, adapters.scale, _scanned(mod))
    if mod + '/kernel' in flat:
      kernel = flat[mod + '/kernel']
    else:  # NF4: dequantised (per layer when scanned)
      q = {n: flat.pop(f'{mod}/nf4_{n}') for n in nf4.NAMES}
      deq = lambda q, shape: nf4.dequantize(q, shape, jnp.float32)
      kernel = (jax.vmap(lambda q: deq(q, delta.shape[1:]))(q) if _scanned(mod)
                else deq(q, delta.shape))
    dtype = jnp.asarray(kernel).dtype
    flat[mod + '/kernel'] = (kernel.astype(jnp.float32) + sign * delta).astype(dtype)
    if sign < 0:  # unmerge keeps the adapters, to be merged again
      flat[key], flat[mod + '/lora_b'] = a, b
  return _unflat(flat)


def adapters_off(params):
  """The params with every lora_b zero: a LoRA-adapted model is then exactly its base (the
  reference model of DPO and RL runs, with no second copy of the weights)."""
  return _unflat({k: jnp.zeros_like(v) if k.endswith('/lora_b') else v
                  for k, v in _flat(params).items()})


def unmerge(merged, adapters_params, adapters: Adapters):
  """The base kernels back from merged ones: merged - scale * a @ b, for the given
  adapters (their lora_a/lora_b leaves at the same paths)."""
  return merge(combine(adapters_params, merged), adapters, sign=-1.0)


def quantize_base(params, adapters: Adapters):
  """The frozen base for QLoRA: the kernels of the adapted Linears in NF4 (nf4_* leaves,
  as Linear declares them), everything else as it was."""
  from lm.ops import nf4
  flat = dict(_flat(params))
  adapted = {k[:-len('/lora_a')] for k in flat if k.endswith('/lora_a')}
  for mod in sorted(adapted):
    if mod + '/kernel' not in flat:
      continue
    kernel = flat.pop(mod + '/kernel')
    qfn = lambda w: nf4.quantize(w, adapters.nf4_block)
    q = jax.jit(jax.vmap(qfn) if _scanned(mod) else qfn)(kernel)
    flat.update({f'{mod}/nf4_{n}': v for n, v in q.items()})
  return _unflat(flat)


def fold_prefix(params, cfg=None):
  """Prefix tuning's reparameterisation folded away, wherever a module has one (the
  decoder; BERT; T5's encoder and decoder stacks): prefix_embed and the prefix_in /
  prefix_out MLP replaced by the keys and values they make, prefix_kv [P, L * 2 * K * H],
  for a model whose Adapters have folded=True. (cfg: unused, kept for callers.)"""
  del cfg
  if not isinstance(params, dict):
    return params
  params = {k: fold_prefix(v) for k, v in params.items()}
  if 'prefix_embed' in params:
    embed_PD = params.pop('prefix_embed')
    w_in, w_out = params.pop('prefix_in'), params.pop('prefix_out')
    h_PF = jnp.tanh(embed_PD.astype(jnp.float32) @ w_in['kernel'] + w_in['bias'])
    params['prefix_kv'] = (h_PF @ w_out['kernel'] + w_out['bias']).astype(embed_PD.dtype)
  return params


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
