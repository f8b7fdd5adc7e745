"""Decoder-only Transformers: GPT-2 and LLaMA styles in one module, switched by config.

GPT-2: pos_embedding=learned, norm=layernorm, mlp=gelu, use_bias, tie_embeddings.
LLaMA: pos_embedding=rope, norm=rmsnorm, mlp=swiglu, no biases, untied head, GQA.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.ops.backend import Kernels
from lm.models.layers import (REMAT_POLICIES, Attention, Dropout, Linear, Mlp, Norm,
                              RuntimeConfig, constrain, normal_init, prefix_keys_values,
                              soft_prompt)

Array = jax.Array

@dataclasses.dataclass(frozen=True)
class DecoderConfig(RuntimeConfig):
  """Fields mirror config.model (architecture) and config.runtime (lm/config.py), where each
  is documented, plus the run's kernel choices (lm/ops/backend.py)."""
  vocab_size: int
  max_len: int = 1024
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  n_kv_heads: int = 0
  head_dim: int = 0
  d_ff: int = 0
  pos_embedding: str = 'learned'
  rope_theta: float = 10000.0
  rope_scaling: tuple = ()  # sorted (key, value) pairs, hashable for Linen
  norm: str = 'layernorm'
  norm_eps: float = 1e-5
  mlp: str = 'gelu'
  use_bias: bool = True
  tie_embeddings: bool = True
  sliding_window: int = 0
  init_std: float = 0.02
  num_labels: int = 0
  family: str = 'decoder'

  def __post_init__(self):
    super().__post_init__()
    if self.d_model % self.n_heads and not self.head_dim:
      raise ValueError(f'model.d_model={self.d_model} is not divisible by model.n_heads='
                       f'{self.n_heads}; change one of them or set model.head_dim.')
    if self.n_heads % self.kv_heads:
      raise ValueError(f'model.n_kv_heads={self.kv_heads} must divide model.n_heads='
                       f'{self.n_heads} (1 for MQA, n_heads for MHA).')
    if self.pos_embedding not in ('learned', 'rope'):
      raise ValueError(f"model.pos_embedding must be 'learned' or 'rope', got "
                       f'{self.pos_embedding!r}')

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_dim_(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def d_ff_(self) -> int:
    return self.d_ff or 4 * self.d_model

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    d = dict(self.rope_scaling)
    return None if d.get('type', 'none') == 'none' else d

  @classmethod
  def from_config(cls, model_config, runtime=None, kernels: Kernels = Kernels()
                  ) -> 'DecoderConfig':
    fields = dict(model_config)  # rope_scaling as sorted pairs: hashable for Linen
    fields['rope_scaling'] = tuple(sorted(dict(fields.get('rope_scaling') or {}).items()))
    return super().from_config(fields, runtime, kernels)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)); x + mlp(norm(x))."""
  cfg: DecoderConfig
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False  # nn.scan wants (carry, output)

  @nn.compact
  def __call__(self, x_BTD, positions_BT, segment_ids_BT, prefix_2PKH=None):
    cfg = self.cfg
    resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)  # GPT-2's residual scaling
    norm = lambda name: Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype,
                             cfg.param_dtype_, cfg.kernels, name=name)
    drop = Dropout(cfg.resid_dropout, self.deterministic)
    h = Attention(cfg, resid_std, self.deterministic, self.decode, name='attn')(
        norm('attn_norm')(x_BTD), positions_BT, segment_ids_BT, prefix_2PKH)
    x_BTD, y_BTD = norm('mlp_norm')(x_BTD, residual=drop(h))  # x + drop(h), its norm
    x_BTD = x_BTD + drop(Mlp(cfg, resid_std, name='mlp')(y_BTD))
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))
    return (x_BTD, None) if self.scanned else x_BTD


class Decoder(nn.Module):
  cfg: DecoderConfig

  @staticmethod
  def example_inputs(cfg: DecoderConfig, batch_size: int, seq_len: int) -> tuple:
    del cfg
    return (jnp.zeros((batch_size, seq_len), jnp.int32),)

  @nn.compact
  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None,
               segment_ids_BT: Array | None = None, deterministic: bool = True,
               decode: bool = False, return_hidden: bool = False, head: str = 'lm',
               prime: bool = False, lm_rows: slice | None = None) -> Array:
    """Returns float32 logits [B, T, V] (or the final hidden states [B, T, D]).

    segment_ids_BT: packed documents (0 = padding); attention never crosses them.
    positions_BT: positions restarting at each document; defaults to 0..T-1, or in
      decode mode to the running count of tokens already in the cache.
    decode: read and extend the KV cache ('cache' collection, made by init_cache).
    head: 'lm' (logits), 'hidden' (= return_hidden), 'classify': float32 logits
      [B, num_labels] of the 'classifier' on the last non-pad token (segment id > 0) of
      each row (needs model.num_labels > 0; created at init only then), or
      'token_classify': the same classifier on every token, [B, T, num_labels] (a
      value head per position for PPO, lm/train/rl.py); 'lm_classify': (logits,
      classify's) from one pass (a reward model with a language-model loss beside);
      lm_rows (a slice of the batch) limits its logits to those rows (the chosen answers:
      the vocabulary projection of the rest would be thrown away).
    prime: prompt tuning at decode time: runs the soft prompt alone into the fresh cache
      (lm/infer/sampling.py does, before the prefill); tokens_BT gives the batch size.

    Prompt tuning (Kernels.adapters, lm/peft.py) puts P soft-prompt embeddings before the
    tokens of every row (segment -1, which every example may attend to; the examples'
    positions shift by P); prefix tuning gives each layer's attention P learned keys and
    values before the row's. Logits are the tokens' alone.
    """
    if head not in ('lm', 'hidden', 'classify', 'token_classify', 'lm_classify'):
      raise ValueError(f'Unknown decoder head {head!r}; choose lm, hidden, classify, '
                       'token_classify or lm_classify.')
    if head in ('classify', 'token_classify', 'lm_classify') and not self.cfg.num_labels:
      raise ValueError(f'head={head!r} needs model.num_labels > 0; this model has no '
                       'classifier.')
    cfg = self.cfg
    b, t = tokens_BT.shape
    positions_given = positions_BT is not None
    if positions_BT is None:
      start = 0
      if decode:
        counter = self.variable('cache', 'position', lambda: jnp.array(0, jnp.int32))
        start = counter.value
        if self.has_variable('cache', 'position') and not self.is_initializing():
          counter.value = start + t
      positions_BT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))

    embed = self.param('embed', normal_init(cfg.init_std, ('vocab', 'embed')),
                       (cfg.vocab_size, cfg.d_model), cfg.param_dtype_)
    x_BTD = jnp.take(embed, tokens_BT, axis=0).astype(cfg.compute_dtype)
    # A no-op unless a 'perturbations' collection is passed: attributions (lm/interpret).
    x_BTD = self.perturb('token_embeddings', x_BTD)
    adapters = cfg.kernels.adapters
    method = adapters.method if adapters is not None else 'none'
    p = adapters.num_prefix if adapters is not None else 0
    if method == 'prompt':
      soft_PD = soft_prompt(self, embed, cfg.init_std, cfg.param_dtype_)
      soft_BPD = jnp.broadcast_to(soft_PD.astype(cfg.compute_dtype), (b, p, cfg.d_model))
      if prime:  # the soft prompt alone into the cache (positions 0..P-1 from the counter)
        if t != p:
          raise ValueError(f'prime takes tokens of shape [B, {p}] (the soft prompt length).')
        x_BTD, segment_ids_BT = soft_BPD, jnp.full((b, p), -1, jnp.int32)
      else:
        if positions_given or not decode:  # (the cache counter already counts the prompt)
          positions_BT = positions_BT + p
        if not decode or self.is_initializing():  # (init: a cache that holds P more)
          seg_BT = jnp.ones((b, t), jnp.int32) if segment_ids_BT is None else segment_ids_BT
          x_BTD = jnp.concatenate([soft_BPD, x_BTD], axis=1)
          positions_BT = jnp.concatenate(
              [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)), positions_BT], axis=1)
          segment_ids_BT = jnp.concatenate([jnp.full((b, p), -1, jnp.int32), seg_BT], axis=1)
    prefix_L2PKH = None
    if method == 'prefix':
      prefix_L2PKH = prefix_keys_values(self, cfg.n_layers, cfg.kv_heads, cfg.head_dim_,
                                        cfg.init_std)
    if cfg.pos_embedding == 'learned':
      pos_embed = self.param('pos_embed', normal_init(cfg.init_std, ('length', 'embed')),
                             (cfg.max_len, cfg.d_model), cfg.param_dtype_)
      x_BTD = x_BTD + jnp.take(pos_embed, positions_BT, axis=0).astype(cfg.compute_dtype)
    x_BTD = Dropout(cfg.embed_dropout, deterministic)(x_BTD)
    x_BTD = constrain(x_BTD, ('batch', 'length', 'act_embed'))

    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    extra = () if prefix_L2PKH is None else (prefix_L2PKH,)  # each layer's prefix
    if cfg.scan_layers:
      layers = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                       split_rngs={'params': True, 'dropout': True},
                       in_axes=(nn.broadcast, nn.broadcast) + (0,) * len(extra),
                       length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
      x_BTD, _ = layers(cfg, deterministic, decode, scanned=True, name='layers')(
          x_BTD, positions_BT, segment_ids_BT, *extra)
    else:
      for i in range(cfg.n_layers):
        x_BTD = block(cfg, deterministic, decode, name=f'layers_{i}')(
            x_BTD, positions_BT, segment_ids_BT, *(e[i] for e in extra))
        self.sow('intermediates', 'residual', x_BTD)  # the logit lens (lm/interpret)
    if x_BTD.shape[1] != t:  # the soft prompt's positions carry no logits
      x_BTD, segment_ids_BT = x_BTD[:, -t:], segment_ids_BT[:, -t:]

    x_BTD = Norm(cfg.norm, cfg.norm_eps, cfg.use_bias, cfg.compute_dtype, cfg.param_dtype_,
                 cfg.kernels, name='final_norm')(x_BTD)
    label_logits_BL = None
    if cfg.num_labels and (head in ('classify', 'token_classify', 'lm_classify')
                           or self.is_initializing()):
      classifier = Linear((cfg.num_labels,), ('embed', None), 1, True, cfg.init_std,
                          cfg.compute_dtype, cfg.param_dtype_, kernels=cfg.kernels,
                          name='classifier')
      if head == 'token_classify':
        return classifier(x_BTD).astype(jnp.float32)
      # The last non-pad token has seen the whole (causal) sequence.
      last_B = (t - 1 if segment_ids_BT is None else
                jnp.max(jnp.where(segment_ids_BT > 0, jnp.arange(t), 0), axis=1))
      last_BD = jnp.take_along_axis(x_BTD, jnp.broadcast_to(last_B, (b,))[:, None, None],
                                    axis=1)[:, 0]
      label_logits_BL = classifier(last_BD).astype(jnp.float32)
      if head == 'classify':
        return label_logits_BL
    if return_hidden or head == 'hidden':
      return x_BTD
    if head == 'lm_classify' and lm_rows is not None:
      x_BTD = x_BTD[lm_rows]
    if cfg.tie_embeddings:
      logits_BTV = jnp.einsum('btd,vd->btv', x_BTD, embed.astype(cfg.compute_dtype),
                              preferred_element_type=jnp.float32)
    else:
      logits_BTV = Linear((cfg.vocab_size,), ('embed', 'vocab'), 1, False, cfg.init_std,
                          cfg.compute_dtype, cfg.param_dtype_, kernels=cfg.kernels,
                          name='lm_head')(x_BTD).astype(jnp.float32)
    logits_BTV = constrain(logits_BTV, ('batch', 'length', 'act_vocab'))
    return (logits_BTV, label_logits_BL) if head == 'lm_classify' else logits_BTV
