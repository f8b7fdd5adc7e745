"""Encoder-only Transformers: BERT and RoBERTa in one module, switched by config.

BERT: learned absolute positions plus token-type embeddings, an embedding LayerNorm,
post-LayerNorm blocks (x = norm(x + attn(x)); x = norm(x + mlp(x)), eps 1e-12), exact
(erf) GELU, bidirectional attention within a segment (padding is segment 0), biases on
every projection. Heads: the pooler (tanh dense on the first token), the MLM head (dense
+ GELU + LayerNorm, then the tied word embeddings plus an output bias) and a
sequence-classification head on the pooled output.
RoBERTa: pos_offset=2 (positions start after the padding index), type_vocab_size=1,
norm_eps=1e-5, no pooler in RobertaForMaskedLM.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import (REMAT_POLICIES, Dropout, Linear, Norm, RuntimeConfig,
                              constrain, dot_product_attention, normal_init,
                              prefix_keys_values, soft_prompt, with_prefix)

Array = jax.Array
HEADS = ('mlm', 'hidden', 'pooled', 'classify')


@dataclasses.dataclass(frozen=True)
class EncoderConfig(RuntimeConfig):
  """Fields mirror config.model (MODEL_SCHEMAS['encoder'] in lm/config.py, where each is
  documented) and config.runtime, plus the run's kernel choices (lm/ops/backend.py)."""
  vocab_size: int
  max_len: int = 128
  max_positions: int = 512
  pos_offset: int = 0
  type_vocab_size: int = 2
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  d_ff: int = 0
  norm_eps: float = 1e-12
  pooler: bool = True
  mlm_head: bool = True
  num_labels: int = 0
  init_std: float = 0.02
  family: str = 'encoder'

  def __post_init__(self):
    super().__post_init__()
    if self.d_model % self.n_heads:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.n_heads='
                       f'{self.n_heads}; change one of them.')
    if self.max_len + self.pos_offset > self.max_positions:
      raise ValueError(f'model.max_len={self.max_len} plus model.pos_offset={self.pos_offset} '
                       f'exceeds model.max_positions={self.max_positions} (the position '
                       'table); lower max_len or raise max_positions.')
    if self.num_labels < 0 or self.type_vocab_size < 0:
      raise ValueError('model.num_labels and model.type_vocab_size must be >= 0.')
    if self.num_labels and not self.pooler:
      raise ValueError(f'model.num_labels={self.num_labels} needs the pooler (the classifier '
                       'reads the pooled first token): set model.pooler=True.')

  @property
  def head_dim_(self) -> int:
    return self.d_model // self.n_heads

  @property
  def d_ff_(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def tie_embeddings(self) -> bool:  # the MLM decoder is always the word embeddings
    return True


def gelu(x: Array) -> Array:
  return jax.nn.gelu(x, approximate=False)  # BERT's exact (erf) GELU


def _dense(cfg: EncoderConfig, features, axes, name, in_dims=1) -> Linear:
  return Linear(features, axes, in_dims, True, cfg.init_std, cfg.compute_dtype,
                cfg.param_dtype_, kernels=cfg.kernels, name=name)


def _norm(cfg: EncoderConfig, name: str) -> Norm:
  return Norm('layernorm', cfg.norm_eps, True, cfg.compute_dtype, cfg.param_dtype_, cfg.kernels,
              name=name)


class SelfAttention(nn.Module):
  """Bidirectional multi-head attention under a [B, 1, T, T] mask (True = attend)."""
  cfg: EncoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD: Array, mask_B1TS: Array, prefix_2PNH: Array | None = None) -> Array:
    """prefix_2PNH: prefix tuning's keys and values, seen by every query."""
    cfg = self.cfg
    n, h = cfg.n_heads, cfg.head_dim_
    q_BTNH, k_BTNH, v_BTNH = (
        _dense(cfg, (n, h), ('embed', 'heads', 'head_dim'), name)(x_BTD)
        for name in ('query', 'key', 'value'))
    q_BTNH = constrain(q_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    if prefix_2PNH is not None:
      k_BTNH, v_BTNH, mask_B1TS = with_prefix(prefix_2PNH, k_BTNH, v_BTNH, mask_B1TS)
    rng = None
    if cfg.attn_dropout > 0.0 and not self.deterministic:
      rng = self.make_rng('dropout')
    out_BTNH = dot_product_attention(
        q_BTNH, k_BTNH, v_BTNH, mask_B1TS, is_causal=False, kernels=cfg.kernels,
        dropout_rate=cfg.attn_dropout if rng is not None else 0.0, dropout_rng=rng,
        lean=cfg.kernels.platform != 'cpu' and cfg.remat != 'none')
    out_BTNH = constrain(out_BTNH, ('batch', 'length', 'act_heads', 'head_dim'))
    return _dense(cfg, (cfg.d_model,), ('heads', 'head_dim', 'embed'), 'out', 2)(out_BTNH)


class Mlp(nn.Module):
  """wo(GELU(wi(x))), both with biases."""
  cfg: EncoderConfig

  @nn.compact
  def __call__(self, x_BTD: Array) -> Array:
    cfg = self.cfg
    h_BTF = gelu(_dense(cfg, (cfg.d_ff_,), ('embed', 'mlp'), 'wi')(x_BTD))
    h_BTF = constrain(h_BTF, ('batch', 'length', 'act_mlp'))
    return _dense(cfg, (cfg.d_model,), ('mlp', 'embed'), 'wo')(h_BTF)


class Block(nn.Module):
  """Post-norm residual block: x = norm(x + attn(x)); x = norm(x + mlp(x))."""
  cfg: EncoderConfig
  deterministic: bool = True
  scanned: bool = False  # nn.scan wants (carry, output)

  @nn.compact
  def __call__(self, x_BTD, mask_B1TS, prefix_2PNH=None):
    cfg = self.cfg
    drop = Dropout(cfg.resid_dropout, self.deterministic)
    h_BTD = SelfAttention(cfg, self.deterministic, name='attn')(x_BTD, mask_B1TS, prefix_2PNH)
    _, x_BTD = _norm(cfg, 'attn_norm')(x_BTD, residual=drop(h_BTD))
    h_BTD = Mlp(cfg, name='mlp')(x_BTD)
    _, x_BTD = _norm(cfg, 'mlp_norm')(x_BTD, residual=drop(h_BTD))
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
    return (x_BTD, None) if self.scanned else x_BTD


class Encoder(nn.Module):
  cfg: EncoderConfig

  @staticmethod
  def example_inputs(cfg: EncoderConfig, batch_size: int, seq_len: int) -> tuple:
    del cfg
    return (jnp.zeros((batch_size, seq_len), jnp.int32),)

  @nn.compact
  def __call__(self, tokens_BT: Array, token_types_BT: Array | None = None,
               segment_ids_BT: Array | None = None, positions_BT: Array | None = None,
               deterministic: bool = True, head: str = 'mlm') -> Array:
    """One of the heads (see HEADS) on the encoded tokens.

    segment_ids_BT: 0 = padding, 1, 2, ... packed documents; attention stays within a
      segment (None: all tokens one segment).
    token_types_BT: BERT's sentence A/B ids (None: all 0).
    positions_BT: positions restarting at each document (None: 0..T-1); pos_offset is
      added here.
    head: 'mlm' float32 logits [B, T, V]; 'hidden' [B, T, D]; 'pooled' [B, D];
      'classify' float32 logits [B, num_labels]. At init every configured head is built.

    Prompt tuning (Kernels.adapters, lm/peft.py) adds P soft-prompt embeddings after the
    tokens (no position or type embedding: they are learned), which every token attends
    to and which attend to each other only (packed examples stay apart); their outputs
    are dropped. Prefix tuning gives each layer's attention P learned keys and values.
    """
    cfg = self.cfg
    if head not in HEADS:
      raise ValueError(f'Unknown encoder head {head!r}; choose one of {", ".join(HEADS)}.')
    needs = dict(mlm=('mlm_head', cfg.mlm_head), pooled=('pooler', cfg.pooler),
                 classify=('num_labels', cfg.num_labels > 0))
    initializing = self.is_initializing()
    if head in needs and not needs[head][1] and not initializing:
      field = needs[head][0]
      want = '> 0' if field == 'num_labels' else '=True'
      raise ValueError(f'head={head!r} needs model.{field}{want}; this model has no such head.')
    b, t = tokens_BT.shape
    if t > cfg.max_positions - cfg.pos_offset:
      raise ValueError(f'{t} tokens do not fit the position table (model.max_positions='
                       f'{cfg.max_positions}, pos_offset={cfg.pos_offset}).')
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    seg_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT

    dtype = cfg.compute_dtype
    embed = self.param('embed', normal_init(cfg.init_std, ('vocab', 'embed')),
                       (cfg.vocab_size, cfg.d_model), cfg.param_dtype_)
    pos_embed = self.param('pos_embed', normal_init(cfg.init_std, ('length', 'embed')),
                           (cfg.max_positions, cfg.d_model), cfg.param_dtype_)
    x_BTD = (jnp.take(embed, tokens_BT, axis=0).astype(dtype)
             + jnp.take(pos_embed, positions_BT + cfg.pos_offset, axis=0).astype(dtype))
    if cfg.type_vocab_size:
      type_embed = self.param('type_embed', normal_init(cfg.init_std, (None, 'embed')),
                              (cfg.type_vocab_size, cfg.d_model), cfg.param_dtype_)
      types_BT = jnp.zeros((b, t), jnp.int32) if token_types_BT is None else token_types_BT
      x_BTD = x_BTD + jnp.take(type_embed, types_BT, axis=0).astype(dtype)
    elif token_types_BT is not None:
      raise ValueError('token_types_BT given but model.type_vocab_size=0 (no type table).')
    adapters = cfg.kernels.adapters
    method = adapters.method if adapters is not None else 'none'
    if method == 'prompt':  # after the tokens, so [CLS] stays first and positions stay
      soft_PD = soft_prompt(self, embed, cfg.init_std, cfg.param_dtype_)
      p = soft_PD.shape[0]
      x_BTD = jnp.concatenate(
          [x_BTD, jnp.broadcast_to(soft_PD.astype(dtype), (b, p, cfg.d_model))], axis=1)
      seg_BT = jnp.concatenate([seg_BT, jnp.full((b, p), -1, jnp.int32)], axis=1)
    # Same segment; the soft prompt (segment -1) is seen by every token and sees itself.
    mask_B1TS = ((seg_BT[:, :, None] == seg_BT[:, None, :]) | (seg_BT[:, None, :] == -1))[:, None]
    x_BTD = _norm(cfg, 'embed_norm')(x_BTD)
    x_BTD = Dropout(cfg.embed_dropout, deterministic)(x_BTD)
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))

    extra = ()  # prefix tuning: each layer's keys and values [L, 2, P, N, H]
    if method == 'prefix':
      extra = (prefix_keys_values(self, cfg.n_layers, cfg.n_heads, cfg.head_dim_,
                                  cfg.init_std),)
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                       'dropout': True},
                       in_axes=(nn.broadcast,) + (0,) * len(extra), length=cfg.n_layers,
                       metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = layers(cfg, deterministic, scanned=True, name='layers')(x_BTD, mask_B1TS,
                                                                          *extra)
    else:
      for i in range(cfg.n_layers):
        x_BTD = block(cfg, deterministic, name=f'layers_{i}')(x_BTD, mask_B1TS,
                                                              *(e[i] for e in extra))
    x_BTD = x_BTD[:, :t]  # the soft prompt's outputs are dropped

    out = {'hidden': x_BTD}
    if cfg.pooler and (initializing or head in ('pooled', 'classify')):
      pooled_BD = jnp.tanh(_dense(cfg, (cfg.d_model,), ('embed', 'mlp'), 'pooler')(x_BTD[:, 0]))
      out['pooled'] = pooled_BD = constrain(pooled_BD, ('batch', 'act_embed'))
      if cfg.num_labels:
        h_BD = Dropout(cfg.resid_dropout, deterministic)(pooled_BD)
        out['classify'] = _dense(cfg, (cfg.num_labels,), ('embed', None), 'classifier')(
            h_BD).astype(jnp.float32)
    if cfg.mlm_head and (initializing or head == 'mlm'):
      out['mlm'] = self._mlm(x_BTD, embed)
    return out[head] if head in out else x_BTD  # init without the default head: hidden

  def _mlm(self, x_BTD: Array, embed: Array) -> Array:
    """BERT's MLM head: dense + GELU + LayerNorm, then the tied embeddings + a bias."""
    cfg = self.cfg
    h_BTD = gelu(_dense(cfg, (cfg.d_model,), ('embed', 'mlp'), 'mlm_dense')(x_BTD))
    h_BTD = _norm(cfg, 'mlm_norm')(h_BTD)
    bias_V = self.param('mlm_bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ('vocab',)),
                        (cfg.vocab_size,), cfg.param_dtype_)
    logits_BTV = jnp.einsum('btd,vd->btv', h_BTD, embed.astype(cfg.compute_dtype),
                            preferred_element_type=jnp.float32)
    logits_BTV = logits_BTV + bias_V.astype(jnp.float32)
    return constrain(logits_BTV, ('batch', 'length', 'act_vocab'))
