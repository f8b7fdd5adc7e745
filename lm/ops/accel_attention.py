"""Attention for accelerators: TPU splash attention, cuDNN flash attention, and a lean XLA path.

Same semantics as lm/ops/attention.py and lm.models.layers.attention_mask: q [B, T, N, H],
k/v [B, S, K, H] with K dividing N (GQA: query head n reads kv head n // (N / K)),
softmax(q k / sqrt(H)) v; causal means key j is visible to query i when
j <= i + (S - T); sliding_window w keeps keys with i + (S - T) - j < w; segment ids [B, T]
(self-attention) restrict attention to the same segment, and padding (segment 0) attends
only to padding, so no row is fully masked.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

Array = jax.Array

# The kernel's kv compute block must be a multiple of the 128 TPU lanes; we use the same
# rule for queries so that any length a caller passes tiles into whole blocks.
SPLASH_ALIGN = 128


def _splash_block(n: int) -> int:
  """The largest of 512, 256, 128 that divides n (512: MaxText's default, good on v4-v6)."""
  return next(b for b in (512, 256, SPLASH_ALIGN) if n % b == 0)


def _splash_kernel(n_heads: int, t: int, s: int, causal: bool, sliding_window: int,
                   interpret: bool):
  """A splash kernel for one batch element: q [N, T, H], k/v [K, S, H] (K divides N)."""
  if sliding_window:  # keys i + (S - T) - w < j (<= i + (S - T) when causal)
    mask = splash_mask.LocalMask((t, s), (sliding_window - 1, 0 if causal else None),
                                 offset=s - t)
  elif causal:
    mask = splash_mask.CausalMask((t, s), offset=s - t)
  else:
    mask = splash_mask.FullMask((t, s))
  bq, bkv = _splash_block(t), _splash_block(s)
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                             block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                             block_q_dq=bq, block_kv_dq=bkv)
  # The MHA kernel is GQA-native (q head h reads kv head h // (N / K)): keys and values
  # are never repeated. The mask is static: blocks it fully masks are skipped.
  return splash.make_splash_mha(splash_mask.MultiHeadMask([mask] * n_heads),
                                block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def splash_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                     segment_ids_BT: Array | None = None, *, causal: bool = True,
                     sliding_window: int = 0, mesh: jax.sharding.Mesh | None = None,
                     interpret: bool = False) -> Array:
  """TPU splash (block-sparse flash) attention; out [B, T, N, H] in q's dtype.

  T and S must be multiples of 128. segment_ids_BT (int32, 0 = padding) needs T == S.
  mesh (axes 'data', 'fsdp', 'tensor'): the Pallas call has no sharding rule, so it runs
  under shard_map with batch split over ('data', 'fsdp') and heads over 'tensor' (which
  must divide B, N and K). interpret: run the kernel with the Pallas interpreter (CPU).
  """
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  if t % SPLASH_ALIGN or s % SPLASH_ALIGN:
    raise ValueError(f'splash attention needs query and key lengths that are multiples of '
                     f'{SPLASH_ALIGN}, got T={t}, S={s}')
  if n % kv:
    raise ValueError(f'kv heads ({kv}) must divide query heads ({n})')
  if segment_ids_BT is not None and s != t:
    raise ValueError(f'segment ids need self-attention (T == S), got T={t}, S={s}')

  def attend(q_BTNH, k_BSKH, v_BSKH, *seg_BT):
    kernel = _splash_kernel(q_BTNH.shape[2], t, s, causal, sliding_window, interpret)
    # The kernel does not scale the logits; its layout is heads-major [N, T, H].
    q_BNTH = (q_BTNH * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BKSH, v_BKSH = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
    if seg_BT:  # same-id masking: padding (0) meets only padding, as in attention_mask
      ids = splash.SegmentIds(q=seg_BT[0], kv=seg_BT[0])
      out_BNTH = jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=i))(
          q_BNTH, k_BKSH, v_BKSH, ids)
    else:
      out_BNTH = jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH)
    return out_BNTH.transpose(0, 2, 1, 3)

  args = (q_BTNH, k_BSKH, v_BSKH) + (() if segment_ids_BT is None else (segment_ids_BT,))
  if mesh is None:
    return attend(*args)
  batch, heads = ('data', 'fsdp'), 'tensor'
  dp, tp = mesh.shape['data'] * mesh.shape['fsdp'], mesh.shape[heads]
  if b % dp or n % tp or kv % tp:
    raise ValueError(f'splash attention shards batch {b} over {dp} devices and heads '
                     f'(N={n}, K={kv}) over {tp}: each must divide evenly')
  qkv_spec = P(batch, None, heads, None)  # contiguous head shards keep whole GQA groups
  in_specs = (qkv_spec,) * 3 + (() if segment_ids_BT is None else (P(batch, None),))
  # check_vma=False: pallas_call does not track which mesh axes its outputs vary over.
  return jax.shard_map(attend, mesh=mesh, in_specs=in_specs, out_specs=qkv_spec,
                       check_vma=False)(*args)


def splash_supports(q_BTNH: Array, k_BSKH: Array, mesh: jax.sharding.Mesh | None = None
                    ) -> bool:
  """Whether splash_attention takes these shapes (else the caller falls back)."""
  (b, t, n, _), (_, s, kv, _) = q_BTNH.shape, k_BSKH.shape
  if t % SPLASH_ALIGN or s % SPLASH_ALIGN or n % kv:
    return False
  if mesh is None:
    return True
  dp, tp = mesh.shape['data'] * mesh.shape['fsdp'], mesh.shape['tensor']
  return not (b % dp or n % tp or kv % tp)


def uses_splash(hlo_text: str) -> bool:
  """Whether compiled HLO text calls a Mosaic (Pallas TPU) kernel, as splash lowers to."""
  return 'tpu_custom_call' in hlo_text


def _segment_mask(segment_ids_BT: Array) -> Array:
  """[B, 1, T, T], True = same segment (padding, 0, meets only padding)."""
  return (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]


def cudnn_supported(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array | None = None, *,
                    causal: bool = True, backend: str | None = None) -> bool:
  """Whether cudnn_attention takes these operands; otherwise fall back (e.g. to 'xla').

  cuDNN flash attention wants a GPU, fp16/bf16 q, k, v of one dtype, head dim a multiple
  of 8 and <= 128 (256 on Hopper; 128 is the portable bound), and K dividing N. Our causal
  mask is bottom-right aligned, cuDNN's top-left, so causal needs T == S. The dense
  segment mask travels as a bias, with which training needs even T and S.
  """
  v_BSKH = k_BSKH if v_BSKH is None else v_BSKH
  (_, t, n, h), (_, s, kv, hk) = q_BTNH.shape, k_BSKH.shape
  return ((backend or jax.default_backend()) == 'gpu'
          and q_BTNH.dtype in (jnp.bfloat16, jnp.float16)
          and q_BTNH.dtype == k_BSKH.dtype == v_BSKH.dtype
          and h == hk == v_BSKH.shape[-1] and h % 8 == 0 and h <= 128
          and n % kv == 0 and (t == s or not causal) and t % 2 == 0 and s % 2 == 0)


def cudnn_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array,
                    segment_ids_BT: Array | None = None, *, causal: bool = True,
                    sliding_window: int = 0, implementation: str = 'cudnn') -> Array:
  """cuDNN flash attention through jax.nn.dot_product_attention (check cudnn_supported).

  Causal and the sliding window are cuDNN's own masks (it skips the masked blocks); the
  segment mask is dense: jax.nn.dot_product_attention exposes no packed-segment offsets,
  and its padding lengths would zero padding rows instead of letting them attend to
  padding. implementation='xla' runs the same arguments through XLA (for tests).
  """
  mask_B1TS = None if segment_ids_BT is None else _segment_mask(segment_ids_BT)
  window = (sliding_window - 1, 0) if sliding_window else None  # keys i - w < j <= i
  return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask_B1TS,
                                      is_causal=causal, local_window_size=window,
                                      implementation=implementation)


def _softmax_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal):
  b, t, n, h = q_BTNH.shape
  s, kv = k_BSKH.shape[1], k_BSKH.shape[2]
  q_BTKGH = (q_BTNH * jnp.asarray(1.0 / math.sqrt(h), q_BTNH.dtype)).reshape(
      b, t, kv, n // kv, h)  # the G = N / K heads of a group share their kv head
  scores = jnp.einsum('btkgh,bskh->bkgts', q_BTKGH, k_BSKH,
                      preferred_element_type=jnp.float32)
  allowed = None
  if causal:  # query i sees keys up to i + (S - T)
    allowed = (lax.broadcasted_iota(jnp.int32, (t, s), 1)
               <= lax.broadcasted_iota(jnp.int32, (t, s), 0) + (s - t))
  if mask_B1TS is not None:
    m = mask_B1TS[:, :, None]  # [B, 1, 1, T, S]
    allowed = m if allowed is None else allowed & m
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(scores, axis=-1).astype(v_BSKH.dtype)
  return jnp.einsum('bkgts,bskh->btkgh', p, v_BSKH).reshape(b, t, n, h)


# Saving nothing, the backward reruns the forward from q, k, v (and the mask): one more
# q k^T, softmax and p v, but no [B, N, T, S] probabilities or scores held per layer.
_lean = jax.checkpoint(_softmax_attention, policy=jax.checkpoint_policies.nothing_saveable,
                       static_argnums=(4,))


def lean_attention(q_BTNH: Array, k_BSKH: Array, v_BSKH: Array, mask_B1TS: Array | None, *,
                   causal: bool) -> Array:
  """softmax(q k / sqrt(H), masked) v whose backward recomputes the probabilities.

  mask_B1TS: bool (True = attend) or None. The price is one extra forward per backward;
  the gain is that nothing T x S wide per head lives between forward and backward.
  """
  return _lean(q_BTNH, k_BSKH, v_BSKH, mask_B1TS, causal)
