"""T5-style encoder-decoder (T5 v1.0 and v1.1 / Flan-T5, switched by config).

As in the T5 paper and transformers' T5ForConditionalGeneration: one token embedding
shared by encoder, decoder and (v1.0) the head; pre-norm blocks with T5's RMS norm (no
mean, no bias, statistics in float32); no biases anywhere; no 1/sqrt(d) attention
scaling (T5 folds it into the query's init); relative position buckets added to the
attention logits, one table per stack ('relative_bias', shared by its layers;
bidirectional in the encoder, causal in the decoder, none in cross-attention).
v1.0: mlp=relu, tie_embeddings (the head is the embedding, the decoder output scaled by
d_model**-0.5). v1.1: mlp=gated_gelu (GELU tanh approximation), an untied 'lm_head'.

Decoding (decode=True) reads and extends the 'cache' collection made by
lm.models.init_cache(model, batch, max_len, encoder_len):
  decoder/index, decoder/positions [B, S], decoder/segment_ids [B, S],
  decoder/encoder_segment_ids [B, S_enc];
  decoder/layers_i/{attn,cross_attn}/{cached_key,cached_value} [B, S or S_enc, N, H]
  (with scan_layers: decoder/layers/... with a leading layer axis).
Cross-attention keys/values are computed on the decode call that passes encoded_BSD and
read from the cache on the calls that pass None.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lm.models.layers import (REMAT_POLICIES, Dropout, Linear, Norm, RuntimeConfig,
                              constrain, normal_init, prefix_keys_values, soft_prompt,
                              with_prefix)
from lm.ops import dropout as dropout_ops

Array = jax.Array
MLPS = ('relu', 'gated_gelu')
_NEG = float(jnp.finfo(jnp.float32).min)  # finite: a fully masked row stays NaN-free


@dataclasses.dataclass(frozen=True)
class EncDecConfig(RuntimeConfig):
  """Fields mirror config.model (lm/config.py MODEL_SCHEMAS['encdec'], documented there)
  and config.runtime, plus the run's kernel choices."""
  vocab_size: int
  max_len: int = 128
  max_target_len: int = 32
  d_model: int = 128
  n_layers: int = 2
  n_decoder_layers: int = 0
  n_heads: int = 4
  head_dim: int = 0
  d_ff: int = 0
  mlp: str = 'relu'
  relative_buckets: int = 32
  relative_max_distance: int = 128
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  decoder_start_id: int = 0
  init_std: float = 1.0
  family: str = 'encdec'

  def __post_init__(self):
    super().__post_init__()
    if self.d_model % self.n_heads and not self.head_dim:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.n_heads='
                       f'{self.n_heads}; change one of them or set model.head_dim (d_kv).')
    if self.mlp not in MLPS:
      raise ValueError(f'model.mlp must be one of {MLPS} for the encdec family, got '
                       f'{self.mlp!r}')

  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def d_ff_(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def n_decoder_layers_(self) -> int:
    return self.n_decoder_layers or self.n_layers


def relative_bucket(rel: Array, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> Array:
  """T5's bucket of a relative position (key - query): exact below num_buckets / 4
  (bidirectional) or / 2 (causal), logarithmic up to max_distance, the last bucket past it.
  The float32 ops are transformers' own, so the buckets match it bit for bit."""
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = (rel > 0).astype(rel.dtype) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  safe = jnp.maximum(rel, 1).astype(jnp.float32)  # log(0) is masked out below anyway
  large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                       * (num_buckets - max_exact)).astype(rel.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(rel < max_exact, rel, large)


class T5Attention(nn.Module):
  """Multi-head attention with an additive position bias and no logit scaling.

  Self-attention in decode mode writes its keys/values at cache_index; cross-attention in
  decode mode caches the encoder's keys/values (computed when kv_BSD is given)."""
  cfg: EncDecConfig
  deterministic: bool = True
  decode: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x_BTD: Array, kv_BSD: Array | None, bias_BNTS: Array | None,
               mask_B1TS: Array, cache_index: Array | None = None,
               prefix_2PNH: Array | None = None) -> Array:
    """prefix_2PNH: prefix tuning's keys and values before the others (no position bias)."""
    cfg = self.cfg
    n, h, d, dtype = cfg.n_heads, cfg.head_dim_, cfg.d_model, cfg.compute_dtype
    f = cfg.init_std
    proj = lambda name, std: Linear((n, h), ('embed', 'heads', 'head_dim'), 1, False, std,
                                    dtype, cfg.param_dtype_, kernels=cfg.kernels, name=name)
    q_BTNH = proj('query', f * (d * h) ** -0.5)(x_BTD)  # T5's init carries 1/sqrt(h)
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    k_BSNH = v_BSNH = None
    if kv_BSD is not None:
      k_BSNH = proj('key', f * d ** -0.5)(kv_BSD)
      v_BSNH = proj('value', f * d ** -0.5)(kv_BSD)
    if self.decode:
      if kv_BSD is None and not self.has_variable('cache', 'cached_key'):
        raise ValueError('Cross-attention has no cached keys: pass encoded_BSD on the first '
                         'decode call (and make the cache with init_cache(..., encoder_len)).')
      initialized = self.has_variable('cache', 'cached_key')
      # the initialisers run (and read k, v's shapes) only when the cache is made
      key = self.variable('cache', 'cached_key', lambda: jnp.zeros_like(k_BSNH))
      value = self.variable('cache', 'cached_value', lambda: jnp.zeros_like(v_BSNH))
      if initialized:
        if not self.cross:  # append T new positions at cache_index
          idx = (0, cache_index, 0, 0)
          key.value = lax.dynamic_update_slice(key.value, k_BSNH.astype(key.value.dtype), idx)
          value.value = lax.dynamic_update_slice(value.value,
                                                 v_BSNH.astype(value.value.dtype), idx)
        elif kv_BSD is not None:  # a new encoder output: computed once, read later
          key.value, value.value = k_BSNH, v_BSNH
        k_BSNH, v_BSNH = key.value, value.value

    if prefix_2PNH is not None:
      p = prefix_2PNH.shape[1]
      k_BSNH, v_BSNH, mask_B1TS = with_prefix(prefix_2PNH, k_BSNH.astype(dtype), v_BSNH,
                                              mask_B1TS)
      if bias_BNTS is not None:
        bias_BNTS = jnp.pad(bias_BNTS, ((0, 0),) * 3 + ((p, 0),))
    logits_BNTS = jnp.einsum('btnh,bsnh->bnts', q_BTNH, k_BSNH.astype(dtype),
                             preferred_element_type=jnp.float32)
    if bias_BNTS is not None:
      logits_BNTS = logits_BNTS + bias_BNTS
    logits_BNTS = jnp.where(mask_B1TS, logits_BNTS, _NEG)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1).astype(dtype)
    if cfg.attn_dropout > 0.0 and not self.deterministic:
      probs_BNTS = dropout_ops.dropout(probs_BNTS, cfg.attn_dropout, self.make_rng('dropout'))
    out_BTNH = jnp.einsum('bnts,bsnh->btnh', probs_BNTS, v_BSNH.astype(dtype))
    out_BTNH = constrain(out_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    return Linear((d,), ('heads', 'head_dim', 'embed'), 2, False, f * (n * h) ** -0.5, dtype,
                  cfg.param_dtype_, kernels=cfg.kernels, name='out')(out_BTNH)


class T5Mlp(nn.Module):
  """ReLU (v1.0: wi, wo) or gated GELU (v1.1: gelu_tanh(wi_0) * wi_1, wo) MLP."""
  cfg: EncDecConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    f, d, ff = cfg.init_std, cfg.d_model, cfg.d_ff_
    dense = lambda feat, axes, std, name, act='none': Linear(
        (feat,), axes, 1, False, std, cfg.compute_dtype, cfg.param_dtype_, act, cfg.kernels,
        name=name)
    if cfg.mlp == 'gated_gelu':
      h_BTF = (dense(ff, ('embed', 'mlp'), f * d ** -0.5, 'wi_0', 'gelu')(x_BTD)
               * dense(ff, ('embed', 'mlp'), f * d ** -0.5, 'wi_1')(x_BTD))
    else:
      h_BTF = jax.nn.relu(dense(ff, ('embed', 'mlp'), f * d ** -0.5, 'wi')(x_BTD))
    h_BTF = constrain(h_BTF, ('batch', 'length', 'act_mlp'))
    h_BTF = Dropout(cfg.resid_dropout, self.deterministic)(h_BTF)
    return dense(d, ('mlp', 'embed'), f * ff ** -0.5, 'wo')(h_BTF)


class Layer(nn.Module):
  """Pre-norm T5 block: self-attention, (decoder) cross-attention, MLP; each residual."""
  cfg: EncDecConfig
  is_decoder: bool = False
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False  # nn.scan wants (carry, output)

  @nn.compact
  def __call__(self, x_BTD, bias_BNTS, mask_B1TS, encoded_BSD, cross_mask_B1TS, cache_index,
               prefix_2PNH=None):
    cfg = self.cfg
    norm = lambda name: Norm('rmsnorm', cfg.norm_eps, False, cfg.compute_dtype,
                             cfg.param_dtype_, cfg.kernels, name=name)
    drop = Dropout(cfg.resid_dropout, self.deterministic)
    attn = lambda name, cross: T5Attention(cfg, self.deterministic, self.decode, cross,
                                           name=name)
    y_BTD = norm('attn_norm')(x_BTD)
    h_BTD = attn('attn', False)(y_BTD, y_BTD, bias_BNTS, mask_B1TS, cache_index, prefix_2PNH)
    if self.is_decoder:
      x_BTD, y_BTD = norm('cross_attn_norm')(x_BTD, residual=drop(h_BTD))
      h_BTD = attn('cross_attn', True)(y_BTD, encoded_BSD, None, cross_mask_B1TS)
    x_BTD, y_BTD = norm('mlp_norm')(x_BTD, residual=drop(h_BTD))
    x_BTD = x_BTD + drop(T5Mlp(cfg, self.deterministic, name='mlp')(y_BTD))
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
    return (x_BTD, None) if self.scanned else x_BTD


def _mask(q_idx_BT, k_idx_BS, q_seg_BT, k_seg_BS, causal: bool) -> Array:
  """[B, 1, T, S], True = attend: same segment (and key not after query when causal).
  Keys of segment -1 (prompt tuning's soft prompt) are seen by every query."""
  mask = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) | (k_seg_BS[:, None, :] == -1)
  if causal:
    mask &= q_idx_BT[:, :, None] >= k_idx_BS[:, None, :]
  return mask[:, None]


class Stack(nn.Module):
  """The encoder or the decoder stack over embedded tokens, with its relative bias table."""
  cfg: EncDecConfig
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x_BTD, segment_ids_BT, positions_BT, encoded_BSD, encoder_segment_ids_BS,
               deterministic: bool = True, decode: bool = False):
    cfg = self.cfg
    b, t = x_BTD.shape[:2]
    seg_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
    if encoded_BSD is not None and encoder_segment_ids_BS is None:
      encoder_segment_ids_BS = jnp.ones(encoded_BSD.shape[:2], jnp.int32)
    q_idx_BT = jnp.arange(t, dtype=jnp.int32)[None]
    q_pos_BT = q_idx_BT if positions_BT is None else positions_BT
    k_idx_BS, k_pos_BS, k_seg_BS = q_idx_BT, q_pos_BT, seg_BT
    enc_seg_BS, cache_index = encoder_segment_ids_BS, None
    if decode and self.is_decoder:
      initialized = self.has_variable('cache', 'index')
      index = self.variable('cache', 'index', lambda: jnp.array(0, jnp.int32))
      pos = self.variable('cache', 'positions', jnp.zeros, (b, t), jnp.int32)
      seg = self.variable('cache', 'segment_ids', jnp.zeros, (b, t), jnp.int32)
      s_enc = (1,) if encoded_BSD is None else encoded_BSD.shape[1:2]
      enc_seg = self.variable('cache', 'encoder_segment_ids', jnp.zeros, (b, *s_enc), jnp.int32)
      if initialized:
        cache_index = i = index.value
        q_idx_BT = i + q_idx_BT
        q_pos_BT = q_idx_BT if positions_BT is None else positions_BT
        pos.value = lax.dynamic_update_slice(pos.value, jnp.broadcast_to(q_pos_BT, (b, t)),
                                             (0, i))
        seg.value = lax.dynamic_update_slice(seg.value, seg_BT, (0, i))
        index.value = i + t
        if encoded_BSD is not None:
          enc_seg.value = encoder_segment_ids_BS
        k_idx_BS = jnp.arange(seg.value.shape[1], dtype=jnp.int32)[None]
        k_pos_BS, k_seg_BS, enc_seg_BS = pos.value, seg.value, enc_seg.value

    causal = self.is_decoder
    mask_B1TS = _mask(q_idx_BT, k_idx_BS, seg_BT, k_seg_BS, causal)
    table = self.param('relative_bias',
                       normal_init(cfg.init_std * cfg.d_model ** -0.5,
                                   ('relative_buckets', 'heads')),
                       (cfg.relative_buckets, cfg.n_heads), cfg.param_dtype_)
    buckets_BTS = relative_bucket(k_pos_BS[:, None, :] - q_pos_BT[:, :, None], not causal,
                                  cfg.relative_buckets, cfg.relative_max_distance)
    bias_BNTS = jnp.take(table.astype(jnp.float32), buckets_BTS, axis=0).transpose(0, 3, 1, 2)
    adapters = cfg.kernels.adapters
    if adapters is not None and adapters.method == 'prompt' and not self.is_decoder:
      # The soft prompt has no place relative to a token (no bias between them): a packed
      # example sees it as it would alone.
      apart_BTS = (seg_BT[:, :, None] == -1) != (k_seg_BS[:, None, :] == -1)
      bias_BNTS = jnp.where(apart_BTS[:, None], 0.0, bias_BNTS)
    cross_mask_B1TS = None
    if self.is_decoder:
      cross_mask_B1TS = _mask(None, None, seg_BT, enc_seg_BS, causal=False)

    x_BTD = Dropout(cfg.embed_dropout, deterministic)(x_BTD)
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
    n = cfg.n_decoder_layers_ if self.is_decoder else cfg.n_layers
    block = Layer
    if cfg.remat != 'none':
      block = nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    args = (bias_BNTS, mask_B1TS, encoded_BSD, cross_mask_B1TS, cache_index)
    extra = ()  # prefix tuning: each self-attention's keys and values [L, 2, P, N, H]
    if adapters is not None and adapters.method == 'prefix':
      extra = (prefix_keys_values(self, n, cfg.n_heads, cfg.head_dim_,
                                  cfg.init_std * cfg.d_model ** -0.5),)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                       split_rngs={'params': True, 'dropout': True},
                       in_axes=(nn.broadcast,) * len(args) + (0,) * len(extra), length=n,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = layers(cfg, self.is_decoder, deterministic, decode, scanned=True,
                        name='layers')(x_BTD, *args, *extra)
    else:
      for i in range(n):
        x_BTD = block(cfg, self.is_decoder, deterministic, decode, name=f'layers_{i}')(
            x_BTD, *args, *(e[i] for e in extra))
    x_BTD = Norm('rmsnorm', cfg.norm_eps, False, cfg.compute_dtype, cfg.param_dtype_,
                 cfg.kernels, name='final_norm')(x_BTD)
    return Dropout(cfg.resid_dropout, deterministic)(x_BTD)


class EncDec(nn.Module):
  cfg: EncDecConfig

  @staticmethod
  def example_inputs(cfg: EncDecConfig, batch_size: int, seq_len: int) -> tuple:
    """(encoder_tokens [B, seq_len], decoder_tokens [B, min(seq_len, max_target_len)])."""
    t = max(1, min(seq_len, cfg.max_target_len))
    return (jnp.zeros((batch_size, seq_len), jnp.int32), jnp.zeros((batch_size, t), jnp.int32))

  def setup(self):
    cfg = self.cfg
    self.embed = self.param('embed', normal_init(cfg.init_std, ('vocab', 'embed')),
                            (cfg.vocab_size, cfg.d_model), cfg.param_dtype_)
    adapters = cfg.kernels.adapters
    if adapters is not None and adapters.method == 'prompt':
      self.soft_prompt = soft_prompt(self, self.embed, cfg.init_std * cfg.d_model ** -0.5,
                                     cfg.param_dtype_)
    self.encoder = Stack(cfg, is_decoder=False)
    self.decoder = Stack(cfg, is_decoder=True)
    if not cfg.tie_embeddings:  # t5x's init for the untied head: fan-in scaled
      self.lm_head = Linear((cfg.vocab_size,), ('embed', 'vocab'), 1, False,
                            cfg.init_std * cfg.d_model ** -0.5, cfg.compute_dtype,
                            cfg.param_dtype_, kernels=cfg.kernels)

  def _embed(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embed, tokens_BT, axis=0).astype(self.cfg.compute_dtype)

  def __call__(self, encoder_tokens_BS: Array, decoder_tokens_BT: Array,
               encoder_segment_ids_BS: Array | None = None,
               decoder_segment_ids_BT: Array | None = None,
               decoder_positions_BT: Array | None = None, deterministic: bool = True) -> Array:
    """Teacher-forced float32 logits [B, T, V]; decoder_tokens are the targets shifted
    right (starting with decoder_start_id). Segment ids: 0 = padding, 1, 2, ... packed
    documents; decoder segment k attends to encoder segment k."""
    encoded_BSD = self.encode(encoder_tokens_BS, encoder_segment_ids_BS, deterministic)
    return self.decode(decoder_tokens_BT, encoded_BSD, encoder_segment_ids_BS,
                       decoder_segment_ids_BT, decoder_positions_BT, deterministic)

  def encode(self, encoder_tokens_BS: Array, encoder_segment_ids_BS: Array | None = None,
             deterministic: bool = True) -> Array:
    """The encoder's final hidden states [B, S, D].

    Prompt tuning (Kernels.adapters, lm/peft.py) puts P soft-prompt embeddings before the
    input (Lester et al.), as segment -1: every token attends to them, they attend to each
    other only (packed examples stay apart), and their outputs are dropped here, so the
    decoder reads the tokens' encodings (which saw the prompt)."""
    x_BSD = self._embed(encoder_tokens_BS)
    if not hasattr(self, 'soft_prompt'):
      return self.encoder(x_BSD, encoder_segment_ids_BS, None, None, None, deterministic)
    b, s = encoder_tokens_BS.shape
    p = self.soft_prompt.shape[0]
    seg_BS = (jnp.ones((b, s), jnp.int32) if encoder_segment_ids_BS is None
              else encoder_segment_ids_BS)
    x_BSD = jnp.concatenate([jnp.broadcast_to(self.soft_prompt.astype(x_BSD.dtype),
                                              (b, p, x_BSD.shape[-1])), x_BSD], axis=1)
    seg_BS = jnp.concatenate([jnp.full((b, p), -1, jnp.int32), seg_BS], axis=1)
    return self.encoder(x_BSD, seg_BS, None, None, None, deterministic)[:, p:]

  def decode(self, decoder_tokens_BT: Array, encoded_BSD: Array | None,
             encoder_segment_ids_BS: Array | None = None,
             decoder_segment_ids_BT: Array | None = None,
             decoder_positions_BT: Array | None = None, deterministic: bool = True,
             decode: bool = False) -> Array:
    """Float32 logits [B, T, V] of the decoder over encoded_BSD (see the module docstring
    for decode=True; encoded_BSD=None reads the cross-attention cache)."""
    cfg = self.cfg
    if encoded_BSD is None and not decode:
      raise ValueError('EncDec.decode needs encoded_BSD (EncDec.encode\'s output) unless '
                       'decode=True with a cache that already holds it.')
    x_BTD = self.decoder(self._embed(decoder_tokens_BT), decoder_segment_ids_BT,
                         decoder_positions_BT, encoded_BSD, encoder_segment_ids_BS,
                         deterministic, decode)
    if cfg.tie_embeddings:  # v1.0: the embedding as head, on outputs scaled by d**-0.5
      x_BTD = x_BTD * jnp.asarray(cfg.d_model ** -0.5, x_BTD.dtype)
      logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, self.embed.astype(cfg.compute_dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = self.lm_head(x_BTD).astype(jnp.float32)
    return constrain(logits_BTV, ('batch', 'length', 'act_vocab'))
