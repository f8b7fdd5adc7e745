"""Shared layers: projections, norms, RoPE, attention (MHA/GQA/MQA, masks, KV cache), MLPs.

Every parameter carries logical axis names (resolved onto the mesh by the rules in
lm/train/partitioning.py); big activations get logical constraints. Which kernels run
(C++ on one CPU device, splash on TPU, cuDNN on GPU, XLA) is decided once per run by
lm/ops/backend.py and arrives here as a `Kernels` value: layers never look at devices.
Dimension letters:
B batch, T query time, S key time, D model, N query heads, K kv heads, H head dim,
F mlp, V vocab.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lm.ops import accel_attention
from lm.ops import attention as attention_ops
from lm.ops import cpu_attention, cpu_linear
from lm.ops.backend import Kernels
from lm.ops import activations as activation_ops
from lm.ops import dropout as dropout_ops
from lm.ops import norms as norm_ops

Array = jax.Array
constrain = nn.with_logical_constraint

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block in the backward pass
    'save_dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig:
  """What every family's config carries besides its architecture: config.runtime's fields
  (lm/config.py; free to change between runs and on resume) and the run's kernel choices
  (lm/ops/backend.py). Subclasses add the architecture fields and call __post_init__."""
  embed_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = False
  kernels: Kernels = Kernels()

  def __post_init__(self):
    if self.vocab_size <= 0:
      raise ValueError('model.vocab_size must be positive (0 is resolved from the tokenizer '
                       'by the trainer; set it when building a model by hand).')
    if self.remat not in ('none', *REMAT_POLICIES):
      raise ValueError(f"runtime.remat must be none, full or save_dots, got {self.remat!r}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def param_dtype_(self):
    return jnp.dtype(self.param_dtype)

  @classmethod
  def from_config(cls, model_config, runtime=None, kernels: Kernels = Kernels()):
    """From config.model (architecture), config.runtime (None: defaults) and kernels."""
    fields = dict(model_config)
    names = {f.name for f in dataclasses.fields(cls)}
    fields.update({k: v for k, v in dict(runtime or {}).items() if k in names})
    return cls(**fields, kernels=kernels)


class Dropout(nn.Module):
  """Dropout with a hashed mask (lm/ops/dropout.py): threefry bits are slow on CPU."""
  rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    if self.deterministic or self.rate == 0.0:
      return x
    return dropout_ops.dropout(x, self.rate, self.make_rng('dropout'))


def normal_init(std: float, axes: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def contract(x: Array, w: Array, in_dims: int = 1, bias: Array | None = None,
             gelu: bool = False, cpu: bool = False) -> Array:
  """x's last `in_dims` axes against w's first `in_dims` axes, as one [M, K] @ [K, N] matmul
  (+ bias, then GELU if asked).

  With cpu (Kernels.cpu_ops: one CPU device), float32 with K and N multiples of 16 and x
  within L2, the forward and the weight gradient are C++ kernels (lm/ops/cpu_linear.py: 1.2-2x XLA:CPU's rate at the
  small model's shapes, the bias, GELU and bias gradient folded in); dy @ w^T is XLA's.
  Past L2 the matmuls are XLA's and only GELU's backward is C++.
  """
  k = math.prod(w.shape[:in_dims])
  x_MK, w_KN = x.reshape(-1, k), w.reshape(k, -1)
  bias_N = None if bias is None else bias.reshape(-1)
  if cpu and cpu_linear.supports(x_MK, w_KN):
    y_MN = (cpu_linear.linear_gelu if gelu else cpu_linear.linear)(x_MK, w_KN, bias_N)
  else:
    y_MN = x_MK @ w_KN
    if bias_N is not None:
      y_MN = y_MN + bias_N.astype(y_MN.dtype)
    if gelu:
      cpu_gelu = cpu and cpu_linear.supports_gelu(y_MN)
      y_MN = (cpu_linear.gelu if cpu_gelu else activation_ops.gelu_tanh)(y_MN)
  return y_MN.reshape(x.shape[:x.ndim - in_dims] + w.shape[in_dims:])


class Linear(nn.Module):
  """y = act(x @ kernel (+ bias)), contracting the last `in_dims` axes of x.

  The one path every projection goes through, so adapters (LoRA deltas) and quantized
  kernels hook in here. The only bypass is `fused_projections` (several projections as
  one matmul), which the kernel seam switches off when adapters are on.
  """
  features: tuple[int, ...]
  axes: tuple[str, ...]  # logical names of the kernel's axes (inputs then outputs)
  in_dims: int = 1
  use_bias: bool = False
  init_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  activation: str = 'none'  # none | gelu (GELU fused into the matmul where a kernel can)
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: Array, weights_only: bool = False):
    """act(x @ kernel (+ bias)); with weights_only, (kernel, bias or None) for x's shape.

    With LoRA on this module (Kernels.adapters, lm/peft.py): + scale * x @ lora_a @ lora_b,
    and with QLoRA the kernel is stored in NF4 and dequantised here."""
    in_shape = x.shape[x.ndim - self.in_dims:]
    shape = in_shape + tuple(self.features)
    adapters = self.kernels.adapters
    lora = adapters is not None and adapters.targets_module(self.scope.path)
    quant, w8a8 = self.kernels.quant, None
    if lora and adapters.method == 'qlora':
      kernel = self._nf4_kernel(shape, adapters.nf4_block)
    elif quant is not None and quant.targets_module(self.scope.path):
      kernel, w8a8 = self._quantized_kernel(shape, quant)
    else:
      kernel = self.param('kernel', normal_init(self.init_std, self.axes), shape,
                          self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros, self.axes[self.in_dims:]),
          tuple(self.features), self.param_dtype)
    if weights_only:
      return kernel, bias
    if self.activation not in ('none', 'gelu'):
      raise ValueError(f"Linear.activation must be 'none' or 'gelu', got {self.activation!r}")
    if w8a8 is not None:  # int8 x int8 -> int32 matmul, rescaled (quant.activations)
      from lm.compress import quantize
      y = quantize.int8_matmul(x, w8a8['q_codes'], w8a8['q_scale'], self.in_dims, self.dtype)
      y = y if bias is None else y + bias.astype(y.dtype)
      return activation_ops.gelu_tanh(y) if self.activation == 'gelu' else y
    if not lora:
      return contract(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims,
                      None if bias is None else bias.astype(self.dtype),
                      gelu=self.activation == 'gelu', cpu=self.kernels.cpu_ops)
    y = contract(x.astype(self.dtype), kernel.astype(self.dtype), self.in_dims,
                 None if bias is None else bias.astype(self.dtype), cpu=self.kernels.cpu_ops)
    r, n_in = adapters.rank, self.in_dims
    # A as LoRA's reference code (kaiming-uniform, a=sqrt(5): bound 1/sqrt(fan_in)), B zero.
    a = self.param('lora_a', nn.with_logical_partitioning(
        nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=tuple(
            range(n_in)), out_axis=n_in), self.axes[:n_in] + (None,)),
        in_shape + (r,), self.param_dtype)
    b = self.param('lora_b', nn.with_logical_partitioning(
        nn.initializers.zeros, (None,) + self.axes[n_in:]), (r,) + tuple(self.features),
        self.param_dtype)
    # LoRA dropout where the step passes a dropout rng (training; lm/train/trainer.py).
    h = Dropout(adapters.dropout, not self.has_rng('dropout'))(x).astype(self.dtype)
    delta = contract(contract(h, a.astype(self.dtype), n_in), b.astype(self.dtype), 1)
    y = y + (adapters.scale * delta).astype(y.dtype)
    return activation_ops.gelu_tanh(y) if self.activation == 'gelu' else y

  def _quantized_kernel(self, shape, quant):
    """(the kernel from its post-training quantized params (lm/compress/quantize.py) in
    the compute dtype, the params themselves when the activations are quantized too: w8a8).
    The params are created from a random kernel at init (scripts/quantize.py writes the
    real ones)."""
    if quant.method == 'nf4':
      return self._nf4_kernel(shape, quant.block_size), None
    from lm.compress import quantize
    make = lambda rng: quantize.quantize(
        nn.initializers.normal(self.init_std)(rng, shape), self.in_dims, quant)
    q = {}
    for name, (s, dtype) in quantize.param_shapes(shape, self.in_dims, quant).items():
      axes = self.axes if s == tuple(shape) else (
          self.axes[self.in_dims:] if s == tuple(shape[self.in_dims:]) else (None,) * len(s))
      q[name] = self.param(name, nn.with_logical_partitioning(
          lambda rng, *_, name=name: make(rng)[name], axes), s, dtype)
    return (quantize.dequantize(q, shape, self.in_dims, quant, self.dtype),
            q if quant.activations == 'int8' else None)

  def _nf4_kernel(self, shape, block: int) -> Array:
    """The kernel from its NF4 params (lm/ops/nf4.py), in the compute dtype. The params are
    created from a random kernel at init; QLoRA runs load them from the base
    (peft.quantize_base). Codes and absmax shard over fsdp by blocks."""
    from lm.ops import nf4
    specs = nf4.quantized_shapes(shape, block)
    make = lambda rng: nf4.quantize(nn.initializers.normal(self.init_std)(rng, shape), block)
    q = {}
    for name, (s, dtype) in specs.items():
      axes = ('nf4_blocks',) + (None,) * (len(s) - 1) if name in ('codes', 'absmax_q') else (
          (None,) * len(s))
      q[name] = self.param(f'nf4_{name}', nn.with_logical_partitioning(
          lambda rng, *_, name=name: make(rng)[name], axes), s, dtype)
    return nf4.dequantize(q, shape, self.dtype)


def soft_prompt(module: nn.Module, embed_VD: Array, std: float, param_dtype) -> Array:
  """Prompt tuning's `soft_prompt` [P, D] param of `module` (Kernels.adapters, lm/peft.py):
  embeddings of random vocabulary tokens (prompt_init='vocab', as Lester et al.) or
  normal(std)."""
  ad = module.cfg.kernels.adapters
  def init(rng, shape, dtype):
    if ad.prompt_init == 'vocab':
      ids = jax.random.randint(rng, shape[:1], 0, embed_VD.shape[0])
      return jnp.take(embed_VD, ids, axis=0).astype(dtype)
    return nn.initializers.normal(std)(rng, shape, dtype)
  return module.param('soft_prompt', nn.with_logical_partitioning(init, (None, 'embed')),
                      (ad.num_virtual_tokens, embed_VD.shape[1]), param_dtype)


def prefix_keys_values(module: nn.Module, n_layers: int, kv_heads: int, head_dim: int,
                       std: float) -> Array:
  """Prefix tuning's keys and values [L, 2, P, K, H] for `module`'s attention layers: from
  `prefix_embed` [P, D] through a tanh MLP (`prefix_in`, `prefix_out`: the paper's
  reparameterisation, which steadies training), or, folded (lm/peft.py fold_prefix), the
  `prefix_kv` [P, L * 2 * K * H] that MLP produced. Called inside module's compact method,
  so the params and Linears are module's own."""
  cfg = module.cfg
  ad = cfg.kernels.adapters
  p, e = ad.num_virtual_tokens, n_layers * 2 * kv_heads * head_dim
  if ad.folded:
    kv_PE = module.param('prefix_kv', nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None)), (p, e), cfg.param_dtype_)
  else:
    embed_PD = module.param('prefix_embed', normal_init(std, (None, 'embed')),
                            (p, cfg.d_model), cfg.param_dtype_)
    dense = lambda f, axes, name: Linear((f,), axes, 1, True, std, cfg.compute_dtype,
                                         cfg.param_dtype_, kernels=cfg.kernels, name=name)
    h_PF = jnp.tanh(dense(ad.prefix_hidden or cfg.d_model, ('embed', 'mlp'), 'prefix_in')(
        embed_PD))
    kv_PE = dense(e, ('mlp', None), 'prefix_out')(h_PF)
  kv_PE = kv_PE.astype(cfg.compute_dtype)
  return kv_PE.reshape(p, n_layers, 2, kv_heads, head_dim).transpose(1, 2, 0, 3, 4)


def with_prefix(prefix_2PKH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array):
  """Prefix keys and values before the row's: (keys, values, mask) with P more keys that
  every query attends to."""
  b, t = mask_B1TS.shape[0], mask_B1TS.shape[2]
  pk_BPKH, pv_BPKH = (jnp.broadcast_to(x.astype(k_BSKH.dtype), (b,) + x.shape)
                      for x in prefix_2PKH)
  p = pk_BPKH.shape[1]
  mask_B1TS = jnp.concatenate([jnp.ones((b, 1, t, p), bool), mask_B1TS], axis=-1)
  return (jnp.concatenate([pk_BPKH, k_BSKH], axis=1),
          jnp.concatenate([pv_BPKH, v_BSKH.astype(k_BSKH.dtype)], axis=1), mask_B1TS)


def fused_projections(x_BTD: Array, linears: list[Linear], dtype, cpu: bool):
  """x against several Linears' kernels side by side, as one matmul: ([B, T, E], bias [E]
  or None) with E the sum of their outputs.

  Fewer, larger matmuls (-4% step time on shakespeare_char, 2 CPU cores). Only where
  Kernels.fused_qkv holds (one CPU device, no adapters): sharded over heads the
  concatenation would gather the kernels, and adapters need each projection's own path.
  Biases are left to the caller (the packed attention kernel adds them as it reads).
  """
  ws = [linear(x_BTD, weights_only=True) for linear in linears]
  d = x_BTD.shape[-1]
  w_DE = jnp.concatenate([w.reshape(d, -1) for w, _ in ws], axis=-1)
  bias_E = (None if ws[0][1] is None else
            jnp.concatenate([bias.reshape(-1) for _, bias in ws]).astype(dtype))
  return contract(x_BTD.astype(dtype), w_DE.astype(dtype), cpu=cpu), bias_E


class Norm(nn.Module):
  """LayerNorm (GPT-2) or RMSNorm (LLaMA); statistics in float32."""
  kind: str = 'layernorm'
  eps: float = 1e-5
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  kernels: Kernels = Kernels()

  @nn.compact
  def __call__(self, x: Array, residual: Array | None = None):
    """norm(x); given residual: (h, norm(h)) for h = x + residual (on one CPU device one
    C++ pass each way, the add folded into the norm's)."""
    d = x.shape[-1]
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('norm',)),
                       (d,), self.param_dtype)
    if self.kind not in ('layernorm', 'rmsnorm'):
      raise ValueError(f"model.norm must be 'layernorm' or 'rmsnorm', got {self.kind!r}")
    bias = None
    if self.kind == 'layernorm' and self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('norm',)),
                        (d,), self.param_dtype)
    # A hand-written VJP (lm/ops/norms.py): XLA's CPU autodiff of the norm is ~2x slower;
    # on one CPU device the C++ kernels are 4-5x faster again (no sharding rule: one device).
    scale = scale.astype(jnp.float32)
    bias = None if bias is None else bias.astype(jnp.float32)
    cpu = self.kernels.cpu_ops and norm_ops.cpu_supports(x)
    centered = self.kind == 'layernorm'
    if residual is not None:
      add_norm = norm_ops.cpu_add_norm if cpu and residual.dtype == x.dtype else norm_ops.add_norm
      h, y = add_norm(x, residual, scale, bias, centered, self.eps)
      return h, y.astype(self.dtype)
    fn = norm_ops.cpu_norm if cpu else norm_ops.norm
    return fn(x, scale, bias, centered, self.eps).astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> Array:
  """Inverse frequencies [H/2], with the linear and Llama-3 scalings of HF transformers."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = 'none' if scaling is None else scaling['type']
  if kind == 'linear':
    inv_freq = inv_freq / scaling['factor']
  elif kind == 'llama3':
    factor, lo, hi = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_len']
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = jnp.where(wavelen > old_len / lo, inv_freq / factor,
                         jnp.where(wavelen < old_len / hi, inv_freq, smoothed))
  elif kind != 'none':
    raise ValueError(f"model.rope_scaling.type must be none, linear or llama3, got {kind!r}")
  return inv_freq


def apply_rope(x_BTNH: Array, positions_BT: Array, inv_freq: Array) -> Array:
  """Rotates halves (x1, x2) of each head by position * freq (HF 'rotate_half' layout)."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angles_BTh)[:, :, None, :], jnp.cos(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


def attention_mask(q_pos_BT: Array, k_pos_BS: Array, q_seg_BT: Array, k_seg_BS: Array,
                   sliding_window: int = 0) -> Array:
  """Causal + same-segment (+ sliding window) mask [B, 1, T, S], True = attend.

  Positions here are indices in the packed row (or the cache), not RoPE positions.
  Padding has segment 0 and only attends to padding, so no row is fully masked. Keys of
  segment -1 (a soft prompt or prefix, lm/peft.py) are seen by every query after them.
  """
  mask = (q_pos_BT[:, :, None] >= k_pos_BS[:, None, :])
  mask &= (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) | (k_seg_BS[:, None, :] == -1)
  if sliding_window:
    mask &= q_pos_BT[:, :, None] - k_pos_BS[:, None, :] < sliding_window
  return mask[:, None]


def _kernel_seed(rng) -> Array:
  """The C++ attention kernel's dropout seed: hashed from rng, zeros when dropout is off."""
  return jnp.zeros((2,), jnp.uint32) if rng is None else dropout_ops.seed_from_key(rng)


def dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, *, is_causal: bool,
                          kernels: Kernels = Kernels(), dropout_rate: float = 0.0,
                          dropout_rng=None, segment_ids_BT=None, sliding_window: int = 0,
                          lean: bool = False) -> Array:
  """softmax(q k / sqrt(H), masked) v; GQA/MQA native (K divides N).

  By kernels.attention (resolved once per run in lm/ops/backend.py), each falling back to
  'xla' where its kernel does not apply:
  - 'splash': TPU Pallas splash attention (lm/ops/accel_attention.py) for self-attention
    whose mask is causal + same segment_ids_BT (+ sliding_window); no dropout.
  - 'cudnn': cuDNN flash attention through jax.nn.dot_product_attention; no dropout.
  - 'cpu': the fused C++ kernel (lm/ops/cpu_attention.py), float32, causal + segments.
  - 'xla': lm/ops/attention.py (a hand-written VJP that saves the probabilities, hashed
    dropout, causal blocks that skip the upper triangle); with `lean` (accelerators
    under remat) the probabilities are recomputed in the backward pass instead.
  segment_ids_BT: given when mask_B1TS is exactly causal + same segment (+ the window),
  so kernels that build their own mask may replace it. is_causal: keys after each query
  are masked too (they may also be masked in mask_B1TS).
  """
  impl = kernels.attention
  use_dropout = dropout_rate > 0.0 and dropout_rng is not None
  self_attention = segment_ids_BT is not None and is_causal
  if impl == 'splash' and self_attention and not use_dropout and accel_attention.splash_supports(
      q_BTNH, k_BSKH, kernels.mesh):
    return accel_attention.splash_attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT,
                                            causal=True, sliding_window=sliding_window,
                                            mesh=kernels.mesh)
  if impl == 'cudnn' and not use_dropout and accel_attention.cudnn_supported(
      q_BTNH, k_BSKH, v_BSKH, causal=is_causal, backend=kernels.platform):
    return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                        is_causal=is_causal, implementation='cudnn')
  seed = _kernel_seed(dropout_rng if use_dropout else None)
  rate = dropout_rate if use_dropout else 0.0
  if (impl == 'cpu' and self_attention and not sliding_window
      and cpu_attention.supports(q_BTNH, k_BSKH)):
    return cpu_attention.attention(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, seed, True, rate)
  if lean and not use_dropout:
    return accel_attention.lean_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal=is_causal)
  return attention_ops.attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS,
                                 seed if use_dropout else None, is_causal, rate)


class Attention(nn.Module):
  """Multi-head attention with grouped KV heads, RoPE, packed-segment masks and a KV cache."""
  cfg: 'lm.models.decoder.DecoderConfig'  # noqa: F821
  resid_std: float
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, positions_BT: Array, segment_ids_BT: Array | None,
               prefix_2PKH: Array | None = None) -> Array:
    """prefix_2PKH: prefix tuning's keys and values, before the row's (or the cache's)."""
    cfg = self.cfg
    dtype = cfg.compute_dtype
    b, t = x_BTD.shape[:2]
    seg_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    kernels = cfg.kernels
    heads = ((cfg.n_heads, ('heads', 'head_dim'), 'query'),
             (cfg.kv_heads, ('kv_heads', 'head_dim'), 'key'),
             (cfg.kv_heads, ('kv_heads', 'head_dim'), 'value'))
    projs = [Linear((n, cfg.head_dim_), ('embed',) + axes, 1, cfg.use_bias, cfg.init_std, dtype,
                    cfg.param_dtype_, kernels=kernels, name=name) for n, axes, name in heads]
    if kernels.fused_qkv:  # E = (N + 2K) H
      y_BTE, bias_E = fused_projections(x_BTD, projs, dtype, kernels.cpu_ops)
      if (not self.decode and cfg.pos_embedding != 'rope' and not cfg.sliding_window
          and kernels.attention == 'cpu'
          and cpu_attention.supports_packed(y_BTE, cfg.n_heads, cfg.kv_heads)):
        # The C++ kernel reads q, k, v where the projection wrote them, adds their bias as
        # it reads, and writes their gradient the same way: no split or bias pass here, no
        # concatenation in the backward.
        rng = self._dropout_rng()
        out_BTNH = cpu_attention.packed_attention(
            y_BTE, bias_E, seg_BT, _kernel_seed(rng), cfg.n_heads, cfg.kv_heads, True,
            cfg.attn_dropout if rng is not None else 0.0)
        return self._out(out_BTNH)
      if bias_E is not None:
        y_BTE = y_BTE + bias_E
      splits = np.cumsum([n * cfg.head_dim_ for n, _, _ in heads])[:-1]
      q_BTNH, k_BTKH, v_BTKH = (
          part.reshape(part.shape[:-1] + (n, cfg.head_dim_))
          for part, (n, _, _) in zip(jnp.split(y_BTE, splits, axis=-1), heads))
    else:
      q_BTNH, k_BTKH, v_BTKH = (proj(x_BTD) for proj in projs)
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    if cfg.pos_embedding == 'rope':
      inv_freq = rope_inv_freq(cfg.head_dim_, cfg.rope_theta, cfg.rope_scaling_dict)
      q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
      k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    if self.is_mutable_collection('intermediates') and not self.decode:  # lm/interpret
      idx_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask_B1TT = attention_mask(idx_BT, idx_BT, seg_BT, seg_BT, cfg.sliding_window)
      k_BTNH = jnp.repeat(k_BTKH, cfg.n_heads // cfg.kv_heads, axis=2)
      scores_BNTT = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BTNH).astype(jnp.float32)
      scores_BNTT = jnp.where(mask_B1TT, scores_BNTT / np.sqrt(cfg.head_dim_), -1e30)
      self.sow('intermediates', 'attention_probs', jax.nn.softmax(scores_BNTT, axis=-1))

    kernel_seg_BT = None  # segment ids, when causal + same segment (+ window) is the whole mask
    if prefix_2PKH is not None:  # keys/values every token attends to, before its own
      if self.decode:
        k_BSKH, v_BSKH, mask_B1TS = self._update_cache(k_BTKH, v_BTKH, seg_BT)
      else:
        k_BSKH, v_BSKH = k_BTKH, v_BTKH
        idx_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask_B1TS = attention_mask(idx_BT, idx_BT, seg_BT, seg_BT, cfg.sliding_window)
      k_BSKH, v_BSKH, mask_B1TS = with_prefix(prefix_2PKH, k_BSKH.astype(k_BTKH.dtype),
                                              v_BSKH, mask_B1TS)
      is_causal = False
    elif self.decode:
      k_BSKH, v_BSKH, mask_B1TS = self._update_cache(k_BTKH, v_BTKH, seg_BT)
      is_causal = False
    else:
      k_BSKH, v_BSKH = k_BTKH, v_BTKH
      if segment_ids_BT is None and not cfg.sliding_window:
        mask_B1TS, is_causal = None, True
      else:
        idx_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask_B1TS = attention_mask(idx_BT, idx_BT, seg_BT, seg_BT, cfg.sliding_window)
        is_causal = True  # already in the mask; lets attention skip the upper triangle
      if cfg.kernels.adapters is None or not cfg.kernels.adapters.num_prefix:
        kernel_seg_BT = seg_BT  # (a soft prompt's segment -1 is not the kernels' mask)

    rng = self._dropout_rng()
    out_BTNH = dot_product_attention(
        q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask_B1TS, is_causal=is_causal,
        kernels=cfg.kernels, dropout_rate=cfg.attn_dropout if rng is not None else 0.0,
        dropout_rng=rng, segment_ids_BT=kernel_seg_BT, sliding_window=cfg.sliding_window,
        lean=cfg.kernels.platform != 'cpu' and cfg.remat != 'none')
    return self._out(out_BTNH)

  def _dropout_rng(self):
    """The key for attention dropout, or None when it is off."""
    if self.cfg.attn_dropout > 0.0 and not self.deterministic:
      return self.make_rng('dropout')
    return None

  def _out(self, out_BTNH: Array) -> Array:
    cfg = self.cfg
    out_BTNH = constrain(out_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    return Linear((cfg.d_model,), ('heads', 'head_dim', 'embed'), 2, cfg.use_bias,
                  self.resid_std, cfg.compute_dtype, cfg.param_dtype_, kernels=cfg.kernels,
                  name='out')(out_BTNH)

  def _update_cache(self, k_BTKH, v_BTKH, seg_BT):
    """Writes T new keys/values at cache_index; returns the whole cache and its mask.

    The cache's length S is the length of the input it was initialised with
    (see lm.models.init_cache). Left-padded prompts work: padding has segment 0.
    """
    b, t, k, h = k_BTKH.shape
    initialized = self.has_variable('cache', 'cached_key')
    key = self.variable('cache', 'cached_key', jnp.zeros, (b, t, k, h), k_BTKH.dtype)
    value = self.variable('cache', 'cached_value', jnp.zeros, (b, t, k, h), v_BTKH.dtype)
    seg = self.variable('cache', 'segment_ids', jnp.zeros, (b, t), jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init call: shapes only
      idx_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
      return k_BTKH, v_BTKH, attention_mask(idx_BT, idx_BT, seg_BT, seg_BT,
                                            self.cfg.sliding_window)
    i = index.value
    key.value = lax.dynamic_update_slice(key.value, k_BTKH.astype(key.value.dtype), (0, i, 0, 0))
    value.value = lax.dynamic_update_slice(value.value, v_BTKH.astype(value.value.dtype),
                                           (0, i, 0, 0))
    seg.value = lax.dynamic_update_slice(seg.value, seg_BT, (0, i))
    index.value = i + t
    s = key.value.shape[1]
    q_idx_BT = jnp.broadcast_to(i + jnp.arange(t), (b, t))
    k_idx_BS = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = attention_mask(q_idx_BT, k_idx_BS, seg_BT, seg.value, self.cfg.sliding_window)
    return key.value, value.value, mask


class Mlp(nn.Module):
  """GELU (GPT-2, tanh approximation as in the original) or SwiGLU (LLaMA) MLP."""
  cfg: 'lm.models.decoder.DecoderConfig'  # noqa: F821
  resid_std: float

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    dense = lambda f, axes, std, name, act='none': Linear(
        (f,), axes, 1, cfg.use_bias, std, cfg.compute_dtype, cfg.param_dtype_, act,
        cfg.kernels, name=name)
    if cfg.mlp == 'swiglu':
      gate_BTF = dense(cfg.d_ff_, ('embed', 'mlp'), cfg.init_std, 'wi_0')(x_BTD)
      up_BTF = dense(cfg.d_ff_, ('embed', 'mlp'), cfg.init_std, 'wi_1')(x_BTD)
      h_BTF = jax.nn.silu(gate_BTF) * up_BTF
    elif cfg.mlp == 'gelu':  # GELU inside the projection: one C++ pass where it can
      h_BTF = dense(cfg.d_ff_, ('embed', 'mlp'), cfg.init_std, 'wi', 'gelu')(x_BTD)
    else:
      raise ValueError(f"model.mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
    h_BTF = constrain(h_BTF, ('batch', 'length', 'act_mlp'))
    return dense(cfg.d_model, ('mlp', 'embed'), self.resid_std, 'wo')(h_BTF)
