"""Hugging Face checkpoints <-> lm run directories: GPT-2, Llama 2/3, Mistral, Qwen2,
BERT and RoBERTa (encoder), T5 (v1.0 and v1.1).

Each architecture is a table of rules. A rule ties HF tensors to lm params (paths in
the unscanned tree, 'layers_3/attn/query/kernel') with a transform each way: most are
a transpose and a reshape to heads; GPT-2's fused c_attn is one HF tensor for three lm
params. A rule with no HF tensor is an lm param that the architecture lacks (a zero
bias, because lm's use_bias covers all projections at once): it imports as zeros and
must still be zero to export. An encoder's optional heads (pooler, MLM head) import when
the checkpoint holds them and export when the model has them.

Both directions stream: import reads one safetensors tensor per lm param as Orbax
writes it (lm.convert.lazy); export restores a few params at a time and writes each
HF tensor at its planned offset. Peak memory is the libraries plus a few tensors.
transformers is not needed for either (only the tests use it).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lm.convert import safetensors_io as st
from lm.convert.lazy import LazyTensor
from lm.config import base_config, gpt2_model, llama_model, resolve, t5_model
from lm.convert import hf_tokenizers, lazy
from lm.models import get_model, param_table
from lm.train import checkpoint

HF_CONFIG = 'hf_config.json'  # the imported config.json, kept in the run for a faithful export
F32 = np.dtype(np.float32)


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: tuple[str, ...]  # HF tensor names; () for an lm param the architecture lacks
  lm: tuple[str, ...]  # lm param paths, unscanned
  to_lm: Callable | None = None  # (*hf arrays) -> tuple of lm arrays
  to_hf: Callable | None = None  # (*lm arrays) -> tuple of hf arrays


def _one(hf, lm, to_lm=lambda x: x, to_hf=lambda x: x) -> Rule:
  return Rule((hf,), (lm,), lambda x: (to_lm(x),), lambda x: (to_hf(x),))


def _xp(x):  # numpy for real arrays, jax.numpy when jax.eval_shape traces a rule
  return np if isinstance(x, np.ndarray) else jnp


def _dims(m):
  n = m['n_heads']
  return m['d_model'], n, m['n_kv_heads'] or n, m['head_dim'] or m['d_model'] // n


# -- GPT-2 ---------------------------------------------------------------------------------

def _gpt2_to_lm(hf: dict) -> dict:
  _check(hf, 'activation_function', ('gelu_new', 'gelu_pytorch_tanh'), 'gelu_new',
         "lm's GELU is the tanh approximation")
  _check(hf, 'scale_attn_weights', (True,), True, 'attention scores are scaled by 1/sqrt(H)')
  _check(hf, 'scale_attn_by_inverse_layer_idx', (False,), False, 'no per-layer score scaling')
  _check(hf, 'add_cross_attention', (False,), False, 'decoder-only')
  d = hf['n_embd']
  return gpt2_model(vocab_size=hf['vocab_size'], max_len=hf['n_positions'], d_model=d,
                    n_layers=hf['n_layer'], n_heads=hf['n_head'], d_ff=hf.get('n_inner') or 4 * d,
                    norm_eps=hf.get('layer_norm_epsilon', 1e-5),
                    tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def _gpt2_to_hf(m: dict, base: dict) -> dict:
  d, n, k, h = _dims(m)
  _require(m, 'GPT2LMHeadModel', pos_embedding='learned', norm='layernorm', mlp='gelu',
           use_bias=True, sliding_window=0)
  if k != n or n * h != d:
    raise ValueError('GPT2LMHeadModel has n_heads * head_dim == d_model and no grouped KV '
                     f'heads; this model has n_heads={n}, n_kv_heads={k}, head_dim={h}, '
                     f'd_model={d}.')
  return dict(base, architectures=['GPT2LMHeadModel'], model_type='gpt2',
              vocab_size=m['vocab_size'], n_positions=m['max_len'], n_embd=d,
              n_layer=m['n_layers'], n_head=n,
              n_inner=None if m['d_ff'] in (0, 4 * d) else m['d_ff'],
              activation_function='gelu_new', layer_norm_epsilon=m['norm_eps'],
              tie_word_embeddings=m['tie_embeddings'], scale_attn_weights=True,
              scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)


def _gpt2_rules(m: dict, hf: dict) -> list[Rule]:
  d, n, _, h = _dims(m)
  heads = lambda x: x.reshape(*x.shape[:-1], n, h)  # [..., N*H] -> [..., N, H]
  split = lambda w: tuple(heads(x) for x in _xp(w).split(w, 3, axis=-1))
  fuse = lambda *qkv: (_xp(qkv[0]).concatenate([x.reshape(*x.shape[:-2], n * h) for x in qkv], -1),)
  t = 'transformer.'
  rules = [_one(t + 'wte.weight', 'embed'), _one(t + 'wpe.weight', 'pos_embed'),
           _one(t + 'ln_f.weight', 'final_norm/scale'), _one(t + 'ln_f.bias', 'final_norm/bias')]
  if not m['tie_embeddings']:
    rules.append(_one('lm_head.weight', 'lm_head/kernel', lambda w: w.T, lambda k: k.T))
  for i in range(m['n_layers']):
    p, q = f'{t}h.{i}.', f'layers_{i}/'
    for hf_norm, lm_norm in (('ln_1', 'attn_norm'), ('ln_2', 'mlp_norm')):
      rules += [_one(f'{p}{hf_norm}.weight', f'{q}{lm_norm}/scale'),
                _one(f'{p}{hf_norm}.bias', f'{q}{lm_norm}/bias')]
    for kind in ('kernel', 'bias'):  # Conv1D weights are [in, out]: no transposes
      hf_kind = 'weight' if kind == 'kernel' else 'bias'
      qkv = tuple(f'{q}attn/{x}/{kind}' for x in ('query', 'key', 'value'))
      rules.append(Rule((f'{p}attn.c_attn.{hf_kind}',), qkv, split, fuse))
    rules += [_one(p + 'attn.c_proj.weight', q + 'attn/out/kernel',
                   lambda w: w.reshape(n, h, d), lambda k: k.reshape(n * h, d)),
              _one(p + 'attn.c_proj.bias', q + 'attn/out/bias'),
              _one(p + 'mlp.c_fc.weight', q + 'mlp/wi/kernel'),
              _one(p + 'mlp.c_fc.bias', q + 'mlp/wi/bias'),
              _one(p + 'mlp.c_proj.weight', q + 'mlp/wo/kernel'),
              _one(p + 'mlp.c_proj.bias', q + 'mlp/wo/bias')]
  return rules


def _gpt2_rename(name: str) -> str:
  # The original OpenAI checkpoints on the Hub were saved from GPT2Model: no prefix.
  return name if name.startswith(('transformer.', 'lm_head.')) else 'transformer.' + name


# -- Llama, Mistral, Qwen2 -------------------------------------------------------------------

def _biases(arch: str, hf: dict) -> dict[str, bool]:
  """Which projections carry biases in the HF model."""
  if arch == 'Qwen2ForCausalLM':
    return dict(qkv=True, o=False, mlp=False)
  if arch == 'MistralForCausalLM':
    return dict(qkv=False, o=False, mlp=False)
  attn = bool(hf.get('attention_bias', False))
  return dict(qkv=attn, o=attn, mlp=bool(hf.get('mlp_bias', False)))


def _window(arch: str, hf: dict) -> int:
  """The sliding window, when all layers use one (lm has one window for all layers)."""
  n_layers = hf['num_hidden_layers']
  w = 0 if arch == 'LlamaForCausalLM' else hf.get('sliding_window') or 0
  if arch == 'Qwen2ForCausalLM':
    w = w if hf.get('use_sliding_window') else 0
    first = hf.get('max_window_layers', 28)
    types = [('sliding_attention' if w and i >= first else 'full_attention')
             for i in range(n_layers)]
  else:
    types = [('sliding_attention' if w else 'full_attention')] * n_layers
  types = hf.get('layer_types') or types
  if len(set(types)) > 1:
    raise ValueError(f'config.json mixes sliding-window and full-attention layers ({types}); '
                     "lm's decoder has one model.sliding_window for every layer.")
  return w if types[0] == 'sliding_attention' else 0


def _rope_from_hf(hf: dict) -> tuple[float, dict]:
  # transformers >= 5 writes rope_parameters; older versions rope_theta and rope_scaling.
  p = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = float(p.get('rope_theta', hf.get('rope_theta', 10000.0)))
  kind = p.get('rope_type', p.get('type', 'default'))
  if float(p.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0))) != 1.0:
    raise ValueError("config.json has partial_rotary_factor != 1; lm's RoPE rotates whole heads.")
  if kind == 'default':
    return theta, dict(type='none')
  if kind == 'linear':
    return theta, dict(type='linear', factor=float(p['factor']))
  if kind == 'llama3':
    return theta, dict(type='llama3', factor=float(p['factor']),
                       low_freq_factor=float(p['low_freq_factor']),
                       high_freq_factor=float(p['high_freq_factor']),
                       original_max_len=int(p['original_max_position_embeddings']))
  raise ValueError(f'config.json asks for RoPE scaling {kind!r}; supported: default, linear, '
                   'llama3 (model.rope_scaling.type none | linear | llama3).')


def _rope_to_hf(m: dict) -> dict:
  s = dict(m['rope_scaling'])
  kind = s.get('type', 'none')
  params = dict(rope_type='default' if kind == 'none' else kind)
  if kind in ('linear', 'llama3'):
    params['factor'] = s['factor']
  if kind == 'llama3':
    params.update(low_freq_factor=s['low_freq_factor'], high_freq_factor=s['high_freq_factor'],
                  original_max_position_embeddings=s['original_max_len'])
  # Both spellings: transformers >= 5 reads rope_parameters, older versions the other two.
  return dict(rope_theta=m['rope_theta'], rope_scaling=None if kind == 'none' else params,
              rope_parameters=dict(params, rope_theta=m['rope_theta']))


def _llama_to_lm(arch: str, hf: dict) -> dict:
  _check(hf, 'hidden_act', ('silu',), 'silu', 'SwiGLU uses SiLU')
  theta, scaling = _rope_from_hf(hf)
  d, n = hf['hidden_size'], hf['num_attention_heads']
  return llama_model(vocab_size=hf['vocab_size'], max_len=hf.get('max_position_embeddings', 4096),
                     d_model=d, n_layers=hf['num_hidden_layers'], n_heads=n,
                     n_kv_heads=hf.get('num_key_value_heads') or n,
                     head_dim=hf.get('head_dim') or d // n, d_ff=hf['intermediate_size'],
                     rope_theta=theta, rope_scaling=scaling, norm_eps=hf.get('rms_norm_eps', 1e-6),
                     use_bias=any(_biases(arch, hf).values()),
                     tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
                     sliding_window=_window(arch, hf))


def _llama_to_hf(arch: str, m: dict, base: dict) -> dict:
  _require(m, arch, pos_embedding='rope', norm='rmsnorm', mlp='swiglu')
  d, n, k, h = _dims(m)
  w, n_layers = m['sliding_window'], m['n_layers']
  hf = dict(base, architectures=[arch], model_type=MODEL_TYPES_BY_ARCH[arch],
            vocab_size=m['vocab_size'], max_position_embeddings=m['max_len'], hidden_size=d,
            intermediate_size=m['d_ff'] or 4 * d, num_hidden_layers=n_layers,
            num_attention_heads=n, num_key_value_heads=k, head_dim=h, hidden_act='silu',
            rms_norm_eps=m['norm_eps'], tie_word_embeddings=m['tie_embeddings'], **_rope_to_hf(m))
  if arch == 'LlamaForCausalLM':
    if w:
      raise ValueError(f'LlamaForCausalLM has no sliding window (model.sliding_window={w}); '
                       'export with --hf_arch=MistralForCausalLM.')
    if not m['use_bias'] or 'attention_bias' not in base:  # else keep the imported choice
      hf.update(attention_bias=m['use_bias'], mlp_bias=m['use_bias'])
  elif arch == 'MistralForCausalLM':
    hf['sliding_window'] = w or None
  elif arch == 'Qwen2ForCausalLM':
    if not m['use_bias']:
      raise ValueError('Qwen2ForCausalLM has q/k/v biases but this model has '
                       'model.use_bias=False; export with --hf_arch=LlamaForCausalLM.')
    hf.update(use_sliding_window=bool(w), sliding_window=w or None,
              layer_types=['sliding_attention' if w else 'full_attention'] * n_layers)
    if w:
      hf['max_window_layers'] = 0
  return hf


def _llama_rules(arch: str, m: dict, hf: dict) -> list[Rule]:
  d, n, k, h = _dims(m)
  biases = _biases(arch, hf)
  T = lambda x: x.T
  rules = [_one('model.embed_tokens.weight', 'embed'),
           _one('model.norm.weight', 'final_norm/scale')]
  if not m['tie_embeddings']:
    rules.append(_one('lm_head.weight', 'lm_head/kernel', T, T))

  def bias(has: bool, name: str, path: str, to_lm=lambda b: b, to_hf=lambda b: b):
    if has:
      return [_one(name, path, to_lm, to_hf)]
    return [Rule((), (path,))] if m['use_bias'] else []

  for i in range(m['n_layers']):
    p, q = f'model.layers.{i}.', f'layers_{i}/'
    rules += [_one(p + 'input_layernorm.weight', q + 'attn_norm/scale'),
              _one(p + 'post_attention_layernorm.weight', q + 'mlp_norm/scale')]
    for hf_name, lm_name, heads in (('q_proj', 'query', n), ('k_proj', 'key', k),
                                    ('v_proj', 'value', k)):
      # nn.Linear weights are [out, in]; lm kernels [in, heads, head_dim].
      rules.append(_one(f'{p}self_attn.{hf_name}.weight', f'{q}attn/{lm_name}/kernel',
                        lambda w, a=heads: w.T.reshape(d, a, h),
                        lambda x, a=heads: x.reshape(d, a * h).T))
      rules += bias(biases['qkv'], f'{p}self_attn.{hf_name}.bias', f'{q}attn/{lm_name}/bias',
                    lambda b, a=heads: b.reshape(a, h), lambda b, a=heads: b.reshape(a * h))
    rules.append(_one(p + 'self_attn.o_proj.weight', q + 'attn/out/kernel',
                      lambda w: w.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T))
    rules += bias(biases['o'], p + 'self_attn.o_proj.bias', q + 'attn/out/bias')
    for hf_name, lm_name in (('gate_proj', 'wi_0'), ('up_proj', 'wi_1'), ('down_proj', 'wo')):
      rules.append(_one(f'{p}mlp.{hf_name}.weight', f'{q}mlp/{lm_name}/kernel', T, T))
      rules += bias(biases['mlp'], f'{p}mlp.{hf_name}.bias', f'{q}mlp/{lm_name}/bias')
  return rules


# -- BERT, RoBERTa (family 'encoder') -------------------------------------------------------

# HF prefix of the encoder's tensors; the MLM head's prefix (RoBERTa: lm_head.).
_ENCODER_PREFIX = {'BertModel': '', 'BertForMaskedLM': 'bert.',
                   'BertForSequenceClassification': 'bert.', 'RobertaForMaskedLM': 'roberta.'}


def _mlm_prefix(arch: str) -> str:
  return 'lm_head.' if arch.startswith('Roberta') else 'cls.predictions.'


def _encoder_to_lm(arch: str, hf: dict) -> dict:
  why = "lm's encoder is BERT's"
  _check(hf, 'hidden_act', ('gelu',), 'gelu', 'exact GELU, as BERT')
  _check(hf, 'position_embedding_type', ('absolute',), 'absolute', 'absolute positions')
  _check(hf, 'is_decoder', (False,), False, why + ': bidirectional, no cross-attention')
  _check(hf, 'add_cross_attention', (False,), False, why + ': no cross-attention')
  _check(hf, 'tie_word_embeddings', (True,), True, 'the MLM decoder is the word embeddings')
  pos_offset = hf.get('pad_token_id', 1) + 1 if arch.startswith('Roberta') else 0
  max_positions = hf['max_position_embeddings']
  num_labels = 0
  if arch == 'BertForSequenceClassification':
    num_labels = len(hf.get('id2label') or {}) or hf.get('num_labels', 2)
  return dict(family='encoder', vocab_size=hf['vocab_size'],
              max_len=min(512, max_positions - pos_offset), max_positions=max_positions,
              pos_offset=pos_offset, type_vocab_size=hf.get('type_vocab_size', 2),
              d_model=hf['hidden_size'], n_layers=hf['num_hidden_layers'],
              n_heads=hf['num_attention_heads'], d_ff=hf['intermediate_size'],
              norm_eps=hf.get('layer_norm_eps', 1e-12),
              pooler=arch in ('BertModel', 'BertForSequenceClassification'),
              mlm_head=arch.endswith('ForMaskedLM'), num_labels=num_labels,
              init_std=hf.get('initializer_range', 0.02))


def _encoder_heads(arch: str, m: dict, names: set[str]) -> dict:
  """Heads the checkpoint has beyond its class's: bert-base-uncased (BertForMaskedLM) also
  holds the pooler, which a classifier fine-tuned from it needs."""
  p = _ENCODER_PREFIX[arch]
  return dict(m, pooler=m['pooler'] or p + 'pooler.dense.weight' in names,
              mlm_head=m['mlm_head'] or _mlm_prefix(arch) + 'bias' in names)


def _encoder_to_hf(arch: str, m: dict, base: dict) -> dict:
  roberta = arch.startswith('Roberta')
  if roberta and m['pos_offset'] < 1:
    raise ValueError(f'{arch} positions start after the padding id (model.pos_offset >= 1); '
                     f'this model has pos_offset={m["pos_offset"]}: export as BertForMaskedLM.')
  if not roberta and m['pos_offset']:
    raise ValueError(f'{arch} positions start at 0; this model has model.pos_offset='
                     f'{m["pos_offset"]}: export as RobertaForMaskedLM.')
  if arch.endswith('ForMaskedLM') and not m['mlm_head']:
    raise ValueError(f'{arch} needs the MLM head (model.mlm_head=True); export as BertModel.')
  if arch == 'BertForSequenceClassification' and not m['num_labels']:
    raise ValueError(f'{arch} needs a classifier (model.num_labels > 0); export as BertModel.')
  hf = dict(base, architectures=[arch], model_type=MODEL_TYPES_BY_ARCH[arch],
            vocab_size=m['vocab_size'], hidden_size=m['d_model'],
            num_hidden_layers=m['n_layers'], num_attention_heads=m['n_heads'],
            intermediate_size=m['d_ff'] or 4 * m['d_model'], hidden_act='gelu',
            max_position_embeddings=m['max_positions'], type_vocab_size=m['type_vocab_size'],
            layer_norm_eps=m['norm_eps'], initializer_range=m['init_std'],
            position_embedding_type='absolute', is_decoder=False, add_cross_attention=False,
            tie_word_embeddings=True)
  if roberta:
    hf['pad_token_id'] = m['pos_offset'] - 1
  if m['num_labels']:
    labels = {str(k): v for k, v in (base.get('id2label') or {}).items()}
    if len(labels) != m['num_labels']:
      labels = {str(i): f'LABEL_{i}' for i in range(m['num_labels'])}
    hf.update(id2label=labels, label2id={v: int(k) for k, v in labels.items()})
  return hf


def _encoder_rules(arch: str, m: dict, hf: dict) -> list[Rule]:
  del hf
  d, n = m['d_model'], m['n_heads']
  h = d // n
  T = lambda x: x.T
  p = _ENCODER_PREFIX[arch]

  def dense(hf_name, lm_name, to_lm=T, to_hf=T, bias_lm=lambda b: b, bias_hf=lambda b: b):
    return [_one(hf_name + '.weight', lm_name + '/kernel', to_lm, to_hf),
            _one(hf_name + '.bias', lm_name + '/bias', bias_lm, bias_hf)]

  def norm(hf_name, lm_name):
    return [_one(hf_name + '.weight', lm_name + '/scale'),
            _one(hf_name + '.bias', lm_name + '/bias')]

  e = p + 'embeddings.'
  rules = [_one(e + 'word_embeddings.weight', 'embed'),
           _one(e + 'position_embeddings.weight', 'pos_embed'),
           *norm(e + 'LayerNorm', 'embed_norm')]
  if m['type_vocab_size']:
    rules.append(_one(e + 'token_type_embeddings.weight', 'type_embed'))
  for i in range(m['n_layers']):
    a, q = f'{p}encoder.layer.{i}.', f'layers_{i}/'
    for name in ('query', 'key', 'value'):  # nn.Linear [out, in] -> [in, heads, head_dim]
      rules += dense(f'{a}attention.self.{name}', f'{q}attn/{name}',
                     lambda w: w.T.reshape(d, n, h), lambda k: k.reshape(d, n * h).T,
                     lambda b: b.reshape(n, h), lambda b: b.reshape(n * h))
    rules += dense(a + 'attention.output.dense', q + 'attn/out',
                   lambda w: w.T.reshape(n, h, d), lambda k: k.reshape(n * h, d).T)
    rules += norm(a + 'attention.output.LayerNorm', q + 'attn_norm')
    rules += dense(a + 'intermediate.dense', q + 'mlp/wi')
    rules += dense(a + 'output.dense', q + 'mlp/wo')
    rules += norm(a + 'output.LayerNorm', q + 'mlp_norm')
  if m['pooler']:
    rules += dense(p + 'pooler.dense', 'pooler')
  if m['mlm_head']:
    c = _mlm_prefix(arch)
    c, dense_name, norm_name = ((c, 'dense', 'layer_norm') if arch.startswith('Roberta')
                                else (c + 'transform.', 'dense', 'LayerNorm'))
    rules += dense(c + dense_name, 'mlm_dense') + norm(c + norm_name, 'mlm_norm')
    rules.append(_one(_mlm_prefix(arch) + 'bias', 'mlm_bias'))
  if m['num_labels']:
    rules += dense('classifier', 'classifier')
  return rules


def _encoder_rename(name: str) -> str:
  # Checkpoints from the TensorFlow era name LayerNorm's params gamma and beta.
  return re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight',
                re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', name))


def _encoder_family(arch: str) -> Family:
  # Buffers; the tied MLM decoder (its bias is the head's bias); BERT's next-sentence head.
  ignore = (r'(position_ids|token_type_ids)$|(cls\.predictions|lm_head)\.decoder\.'
            r'(weight|bias)$|^cls\.seq_relationship\.')
  return Family(functools.partial(_encoder_to_lm, arch), functools.partial(_encoder_to_hf, arch),
                functools.partial(_encoder_rules, arch), ignore=ignore, rename=_encoder_rename,
                heads=functools.partial(_encoder_heads, arch))


# -- T5 (family 'encdec') -------------------------------------------------------------------

_T5_MLPS = {'relu': 'relu', 'gated-gelu': 'gated_gelu', 'gated-gelu_new': 'gated_gelu'}


def _t5_to_lm(hf: dict) -> dict:
  proj = hf.get('feed_forward_proj', 'relu')
  _check(hf, 'feed_forward_proj', tuple(_T5_MLPS), 'relu',
         "lm's T5 MLPs are ReLU (v1.0) and gated GELU, tanh approximation (v1.1)")
  # v1.0 scales the decoder output by d_model**-0.5 and ties the head; v1.1 does neither.
  # transformers >= 5 writes scale_decoder_outputs (and tie_word_embeddings=True always).
  scaled = bool(hf.get('scale_decoder_outputs', hf.get('tie_word_embeddings', True)))
  start = hf.get('decoder_start_token_id')
  return t5_model(vocab_size=hf['vocab_size'], max_len=hf.get('n_positions') or 512,
                  d_model=hf['d_model'], n_layers=hf['num_layers'],
                  n_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
                  n_heads=hf['num_heads'], head_dim=hf['d_kv'], d_ff=hf['d_ff'],
                  mlp=_T5_MLPS[proj], tie_embeddings=scaled,
                  relative_buckets=hf.get('relative_attention_num_buckets', 32),
                  relative_max_distance=hf.get('relative_attention_max_distance', 128),
                  norm_eps=hf.get('layer_norm_epsilon', 1e-6),
                  decoder_start_id=(hf.get('pad_token_id') or 0) if start is None else start,
                  init_std=hf.get('initializer_factor', 1.0))


def _t5_to_hf(m: dict, base: dict) -> dict:
  d, n = m['d_model'], m['n_heads']
  gated = m['mlp'] == 'gated_gelu'
  return dict(base, architectures=['T5ForConditionalGeneration'], model_type='t5',
              vocab_size=m['vocab_size'], d_model=d, d_kv=m['head_dim'] or d // n,
              d_ff=m['d_ff'] or 4 * d, num_layers=m['n_layers'],
              num_decoder_layers=m['n_decoder_layers'] or m['n_layers'], num_heads=n,
              relative_attention_num_buckets=m['relative_buckets'],
              relative_attention_max_distance=m['relative_max_distance'],
              layer_norm_epsilon=m['norm_eps'], initializer_factor=m['init_std'],
              feed_forward_proj='gated-gelu' if gated else 'relu',
              dense_act_fn='gelu_new' if gated else 'relu', is_gated_act=gated,
              tie_word_embeddings=m['tie_embeddings'],
              scale_decoder_outputs=m['tie_embeddings'],
              decoder_start_token_id=m['decoder_start_id'], is_encoder_decoder=True)


def _t5_rules(m: dict, hf: dict) -> list[Rule]:
  del hf
  d, n = m['d_model'], m['n_heads']
  h = m['head_dim'] or d // n
  T = lambda x: x.T
  rules = [_one('shared.weight', 'embed')]
  if not m['tie_embeddings']:
    rules.append(_one('lm_head.weight', 'lm_head/kernel', T, T))
  mlp = ('wi_0', 'wi_1', 'wo') if m['mlp'] == 'gated_gelu' else ('wi', 'wo')
  for stack, n_layers in (('encoder', m['n_layers']),
                          ('decoder', m['n_decoder_layers'] or m['n_layers'])):
    # HF keeps the stack's one bias table in its first layer.
    rules += [_one(f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight',
                   f'{stack}/relative_bias'),
              _one(f'{stack}.final_layer_norm.weight', f'{stack}/final_norm/scale')]
    sublayers = [('SelfAttention', 'attn')]
    if stack == 'decoder':
      sublayers.append(('EncDecAttention', 'cross_attn'))
    sublayers.append(('DenseReluDense', 'mlp'))
    for i in range(n_layers):
      for j, (hf_name, lm_name) in enumerate(sublayers):
        p, q = f'{stack}.block.{i}.layer.{j}.', f'{stack}/layers_{i}/'
        rules.append(_one(p + 'layer_norm.weight', f'{q}{lm_name}_norm/scale'))
        if lm_name == 'mlp':
          rules += [_one(f'{p}{hf_name}.{w}.weight', f'{q}mlp/{w}/kernel', T, T) for w in mlp]
          continue
        # nn.Linear weights are [out, in]; lm kernels [in, heads, head_dim].
        rules += [_one(f'{p}{hf_name}.{a}.weight', f'{q}{lm_name}/{b}/kernel',
                       lambda w: w.T.reshape(d, n, h), lambda x: x.reshape(d, n * h).T)
                  for a, b in zip('qkv', ('query', 'key', 'value'))]
        rules.append(_one(f'{p}{hf_name}.o.weight', f'{q}{lm_name}/out/kernel',
                          lambda w: w.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T))
  return rules


# The stacks' embed_tokens are copies of shared.weight (older transformers saved them);
# v1.0's lm_head.weight, where saved, is the tied embedding too; the Hub's t5-small and
# t5-base hold an unused cross-attention bias table (transformers ignores it too).
_T5_FAMILY_IGNORE = (r'^(encoder|decoder)\.embed_tokens\.weight$|^lm_head\.weight$'
                     r'|^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias')


# -- The table -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Family:
  to_lm: Callable[[dict], dict]  # config.json -> config.model fields
  to_hf: Callable[[dict, dict], dict]  # (config.model fields, config.json to update) -> config.json
  rules: Callable[[dict, dict], list[Rule]]  # (config.model fields, config.json) -> rules
  ignore: str = r'$^'  # HF tensors that are buffers, not weights
  rename: Callable[[str], str] = lambda name: name  # HF tensor name -> the name in the rules
  # (config.model fields, the checkpoint's tensor names) -> fields with the optional heads
  # the checkpoint holds (an encoder's pooler or MLM head)
  heads: Callable[[dict, set[str]], dict] = lambda m, names: m


def _llama_family(arch: str) -> Family:
  return Family(functools.partial(_llama_to_lm, arch), functools.partial(_llama_to_hf, arch),
                functools.partial(_llama_rules, arch), ignore=r'rotary_emb\.inv_freq$')


def _classifier_family(arch: str, lm_family: Family) -> Family:
  """A decoder ...ForSequenceClassification: the causal LM's layout with `score` [labels, D]
  (no bias; on the last non-pad token, found by pad_token_id, as lm's classifier) for the
  head; lm's classifier bias must be zero (a Bradley-Terry reward model's stays zero). An
  untied lm_head travels along when lm has one (transformers ignores it) and is tied away
  when the checkpoint has none."""
  def to_lm(hf):
    labels = hf.get('id2label') or {}
    return dict(lm_family.to_lm(hf), num_labels=len(labels) or hf.get('num_labels', 2))

  def to_hf(m, base):
    if not m['num_labels']:
      raise ValueError(f'{arch} needs a classifier (model.num_labels > 0).')
    labels = {str(i): f'LABEL_{i}' for i in range(m['num_labels'])}
    if len(base.get('id2label') or {}) == m['num_labels']:
      labels = {str(k): v for k, v in base['id2label'].items()}
    hf = lm_family.to_hf(m, base)
    return dict(hf, architectures=[arch], num_labels=m['num_labels'], id2label=labels,
                label2id={v: int(k) for k, v in labels.items()})

  def rules(m, hf):
    return lm_family.rules(m, hf) + [
        _one('score.weight', 'classifier/kernel', lambda w: w.T, lambda k: k.T),
        Rule((), ('classifier/bias',))]

  def heads(m, names):
    return dict(m, tie_embeddings=m['tie_embeddings'] or 'lm_head.weight' not in names)

  rename = lambda name: name if name.startswith('score.') else lm_family.rename(name)
  return Family(to_lm, to_hf, rules, ignore=lm_family.ignore, rename=rename, heads=heads)


_GPT2 = Family(_gpt2_to_lm, _gpt2_to_hf, _gpt2_rules, ignore=r'\.attn\.(masked_)?bias$',
               rename=_gpt2_rename)
ARCHS = {
    'GPT2LMHeadModel': _GPT2,
    'GPT2ForSequenceClassification': _classifier_family('GPT2ForSequenceClassification', _GPT2),
    'LlamaForSequenceClassification': _classifier_family('LlamaForSequenceClassification',
                                                         _llama_family('LlamaForCausalLM')),
    'LlamaForCausalLM': _llama_family('LlamaForCausalLM'),
    'MistralForCausalLM': _llama_family('MistralForCausalLM'),
    'Qwen2ForCausalLM': _llama_family('Qwen2ForCausalLM'),
    **{arch: _encoder_family(arch) for arch in _ENCODER_PREFIX},
    'T5ForConditionalGeneration': Family(_t5_to_lm, _t5_to_hf, _t5_rules,
                                         ignore=_T5_FAMILY_IGNORE),
}
MODEL_TYPES_BY_ARCH = {'GPT2ForSequenceClassification': 'gpt2',
                       'LlamaForSequenceClassification': 'llama',
                       'GPT2LMHeadModel': 'gpt2', 'LlamaForCausalLM': 'llama',
                       'MistralForCausalLM': 'mistral', 'Qwen2ForCausalLM': 'qwen2',
                       # model_type alone (no architectures) picks the last: BertModel
                       'RobertaForMaskedLM': 'roberta', 'BertForMaskedLM': 'bert',
                       'BertForSequenceClassification': 'bert', 'BertModel': 'bert',
                       'T5ForConditionalGeneration': 't5'}


def _check(hf, key, allowed, default, why):
  value = hf.get(key, default)
  if value not in allowed:
    raise ValueError(f"config.json has {key}={value!r}, which lm cannot express "
                     f"({why}); supported: {', '.join(map(repr, allowed))}.")


def _require(m, arch, **fields):
  for key, want in fields.items():
    if m[key] != want:
      raise ValueError(f'{arch} needs model.{key}={want!r}; this model has {m[key]!r}. '
                       f'Pick another --hf_arch ({", ".join(ARCHS)}).')


# -- Shared steps ----------------------------------------------------------------------------

def read_hf_config(directory) -> dict:
  d = pathlib.Path(directory)
  expected = ('a directory as transformers save_pretrained writes it: config.json, '
              'model.safetensors (or shards and model.safetensors.index.json) and tokenizer files')
  if not d.is_dir():
    raise FileNotFoundError(f'{d} is not a directory; expected {expected}.')
  if not (d / 'config.json').exists():
    raise FileNotFoundError(f'{d} has no config.json; expected {expected}.')
  return json.loads((d / 'config.json').read_text())


def architecture(hf: dict) -> str:
  archs = hf.get('architectures') or []
  by_type = {t: a for a, t in MODEL_TYPES_BY_ARCH.items()}
  arch = archs[0] if archs else by_type.get(hf.get('model_type'))
  if arch not in ARCHS:
    raise ValueError(f'Unsupported architecture {arch or hf.get("model_type")!r}; supported: '
                     f'{", ".join(ARCHS)}.')
  return arch


def infer_architecture(m: dict) -> str:
  """The HF architecture that a model trained in lm maps onto."""
  if m.get('family') == 'encdec':
    return 'T5ForConditionalGeneration'
  if m.get('family') == 'encoder':
    if m['pos_offset']:
      return 'RobertaForMaskedLM'
    return ('BertForSequenceClassification' if m['num_labels'] else
            'BertForMaskedLM' if m['mlm_head'] else 'BertModel')
  if (m['pos_embedding'], m['norm'], m['mlp']) == ('learned', 'layernorm', 'gelu'):
    return 'GPT2ForSequenceClassification' if m['num_labels'] else 'GPT2LMHeadModel'
  if (m['pos_embedding'], m['norm'], m['mlp']) == ('rope', 'rmsnorm', 'swiglu'):
    if m['num_labels']:
      return 'LlamaForSequenceClassification'
    return 'MistralForCausalLM' if m['sliding_window'] else 'LlamaForCausalLM'
  raise ValueError(f'No Hugging Face architecture here matches pos_embedding={m["pos_embedding"]}, '
                   f'norm={m["norm"]}, mlp={m["mlp"]} (GPT-2: learned/layernorm/gelu; Llama: '
                   'rope/rmsnorm/swiglu).')


def model_config(m: dict):
  """A full config.model ConfigDict from plain fields (rope_scaling given as a dict)."""
  m = dict(m)
  mc = base_config(m.get('family', 'decoder')).model
  if 'rope_scaling' in mc:
    mc.rope_scaling.update(dict(m.pop('rope_scaling', {})))
  mc.update(m)
  return mc


def lm_shapes(m: dict) -> dict[str, tuple[int, ...]]:
  """Shapes of the unscanned lm params, by '/'-joined path (nothing allocated)."""
  return {name: shape for name, shape, _ in param_table(get_model(model_config(m)))}


def hf_shapes(rules: list[Rule], shapes: dict) -> dict[str, tuple[int, ...]]:
  out = {}
  for r in rules:
    if r.hf:
      args = [jax.ShapeDtypeStruct(shapes[p], F32) for p in r.lm]
      for name, s in zip(r.hf, jax.eval_shape(r.to_hf, *args)):
        out[name] = tuple(s.shape)
  return out


def _check_coverage(rules, shapes):  # a table bug, never the user's
  covered = [p for r in rules for p in r.lm]
  if sorted(covered) != sorted(shapes):
    raise AssertionError(f'Rules and params differ: {sorted(set(covered) ^ set(shapes))[:6]}')


_LAYER = re.compile(r'(.*/)?layers_(\d+)/(.*)')  # a prefix for each stack: 'encoder/'


def _stored(path: str, scan: bool) -> tuple[str, int | None]:
  """Where an unscanned path lives in the saved tree: (path, layer index or None)."""
  match = _LAYER.fullmatch(path) if scan else None
  return ((match[1] or '') + 'layers/' + match[3], int(match[2])) if match else (path, None)


def _nest(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# -- Import ----------------------------------------------------------------------------------

def _make(rule: Rule, index: int, infos: dict, shape) -> np.ndarray:
  if not rule.hf:
    return np.zeros(shape, F32)
  xs = [st.read_tensor(infos[name]).astype(F32, copy=False) for name in rule.hf]
  return rule.to_lm(*xs)[index]  # maybe a transposed view: tensorstore copies it chunkwise


def _stack(parts: list[LazyTensor]) -> np.ndarray:
  out = np.empty((len(parts),) + tuple(parts[0].shape), F32)
  for i, part in enumerate(parts):
    out[i] = part()
  return out


def import_hf(directory, scan_layers: bool = False) -> tuple[dict, dict, dict]:
  """(config.model fields, params of LazyTensors, config.json) from a HF model directory.

  Every check (architecture, config, missing, extra or misshapen tensors) runs here,
  from the safetensors headers alone; tensors are read only when a leaf is made.
  """
  d = pathlib.Path(directory)
  hf = read_hf_config(d)
  arch = architecture(hf)
  family = ARCHS[arch]
  infos = {family.rename(k): v for k, v in st.index_directory(d).items()}
  m = model_config(family.heads(family.to_lm(hf), set(infos))).to_dict()
  rules = family.rules(m, hf)
  shapes = lm_shapes(m)
  _check_coverage(rules, shapes)
  expected = hf_shapes(rules, shapes)
  missing = [name for name in expected if name not in infos]
  if missing:
    raise ValueError(f'{d}: tensor {missing[0]} is missing ({len(missing)} missing in all: '
                     f'{", ".join(missing[:4])}...); {arch} with this config.json needs it.')
  for name, shape in expected.items():
    info = infos[name]
    if info.shape != shape:
      raise ValueError(f'{d}: tensor {name} has shape {list(info.shape)}, but config.json '
                       f'({arch}) implies {list(shape)}.')
    if st.NAMES[info.dtype] not in ('F64', 'F32', 'F16', 'BF16'):
      raise ValueError(f'{d}: tensor {name} is {info.dtype}, not floating point (a quantized '
                       'checkpoint?); convert the unquantized one.')
  tied_head = m.get('family', 'decoder') == 'decoder' and m['tie_embeddings']
  ignore = family.ignore + (r'|^lm_head\.weight$' if tied_head else '')
  extra = [n for n in infos if n not in expected and not re.search(ignore, n)]
  if extra:
    raise ValueError(f'{d}: {len(extra)} tensor(s) have no place in lm\'s {arch} layout: '
                     f'{", ".join(extra[:4])}. The checkpoint uses a feature this converter '
                     'does not support.')

  leaves = {}
  for r in rules:
    for i, path in enumerate(r.lm):
      leaves[path] = LazyTensor(shapes[path], F32,
                                functools.partial(_make, r, i, infos, shapes[path]))
  if scan_layers:
    stacked = {}
    for path in list(leaves):
      where, layer = _stored(path, True)
      if layer is not None:
        stacked.setdefault(where, {})[layer] = leaves.pop(path)
    for where, parts in stacked.items():
      parts = [parts[i] for i in range(len(parts))]  # each stack its own layer count
      leaves[where] = LazyTensor((len(parts),) + tuple(parts[0].shape), F32,
                                 functools.partial(_stack, parts))
  return m, _nest(leaves), hf


def convert_from_hf(directory, workdir, scan_layers: bool = False, step: int = 0):
  """Writes an lm run directory (checkpoint, config, tokenizer) from a HF model directory."""
  workdir = pathlib.Path(workdir).absolute()
  if (workdir / 'checkpoints').is_dir() and any((workdir / 'checkpoints').iterdir()):
    raise ValueError(f'{workdir} already holds checkpoints; import into a new --workdir.')
  m, params, hf = import_hf(directory, scan_layers)
  tokenizer = hf_tokenizers.from_hf_dir(directory, hf)
  if tokenizer.vocab_size > m['vocab_size']:
    raise ValueError(f'The tokenizer in {directory} has {tokenizer.vocab_size} ids but the '
                     f'model\'s vocabulary (config.json vocab_size) has {m["vocab_size"]}: '
                     'they do not belong together.')
  config = base_config(m.get('family', 'decoder'))
  config.model = model_config(m)
  config.runtime.scan_layers = scan_layers
  # Fine-tuning rebuilds the tokenizer from config.data: point it at this run's copy.
  config.data.tokenizer = tokenizer.kind
  config.data.tokenizer_path = str(workdir / 'tokenizer')
  config = resolve(config, tokenizer)
  lazy.save_run(workdir, params, config, tokenizer, step)
  (workdir / HF_CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True))
  return config


# -- Export ----------------------------------------------------------------------------------

def _shards(sizes: dict[str, int], max_bytes: int) -> dict[str, list[str]]:
  """File name -> tensor names, in order, each file up to max_bytes (as save_pretrained)."""
  shards, total = [[]], 0
  for name, size in sizes.items():
    if shards[-1] and total + size > max_bytes:
      shards.append([])
      total = 0
    shards[-1].append(name)
    total += size
  if len(shards) == 1:
    return {st.SINGLE: shards[0]}
  n = len(shards)
  return {f'model-{i + 1:05d}-of-{n:05d}.safetensors': names for i, names in enumerate(shards)}


def export_hf(workdir, out_dir, step: int | None = None, arch: str | None = None,
              dtype: str = 'float32', max_shard_bytes: int = 5 * 10**9) -> dict:
  """Writes a HF model directory (from_pretrained of its architecture's class); returns its
  config.json."""
  import ml_dtypes
  workdir, out = pathlib.Path(workdir), pathlib.Path(out_dir)
  if list(out.glob('*.safetensors*')):  # stale shards or index would mix with the new ones
    raise ValueError(f'{out} already holds safetensors files; export into a new directory.')
  config = checkpoint.read_config(workdir)
  m = config.model.to_dict()
  scan = config.runtime.scan_layers
  base = json.loads((workdir / HF_CONFIG).read_text()) if (workdir / HF_CONFIG).exists() else {}
  arch = arch or (architecture(base) if base else infer_architecture(m))
  if arch not in ARCHS:
    raise ValueError(f'Unsupported --hf_arch {arch!r}; supported: {", ".join(ARCHS)}.')
  if base and architecture(base) != arch:  # keep only what does not depend on the layout
    base = {k: base[k] for k in ('bos_token_id', 'eos_token_id', 'pad_token_id') if k in base}
  hf = ARCHS[arch].to_hf(m, base)
  if (m.get('family', 'decoder') == 'decoder' and m['num_labels']
      and hf.get('pad_token_id') is None):  # transformers finds the last token by it
    hf['pad_token_id'] = checkpoint.read_tokenizer(workdir).pad_id
  hf.update(dtype=dtype, torch_dtype=dtype)  # both spellings: transformers >= 5 and older
  out_dtype = np.dtype({'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16,
                        'float16': np.float16}[dtype])
  rules = ARCHS[arch].rules(m, hf)
  shapes = lm_shapes(m)
  _check_coverage(rules, shapes)
  specs = hf_shapes(rules, shapes)
  sizes = {name: math.prod(s) * out_dtype.itemsize for name, s in specs.items()}
  shards = _shards(sizes, max_shard_bytes)

  reader = lazy.ParamReader(workdir, step)
  try:
    # Params the architecture lacks must be zero: checked before anything is written.
    lacking = sorted({_stored(r.lm[0], scan)[0] for r in rules if not r.hf})
    for path, x in (reader.read(lacking) if lacking else {}).items():
      if np.any(x):
        raise ValueError(f'Param {path} is not zero, but {arch} has no such tensor: export '
                         'with an --hf_arch that has it (LlamaForCausalLM has attention_bias '
                         'and mlp_bias).')
    out.mkdir(parents=True, exist_ok=True)
    writers = {file: st.Writer(out / file, {n: (specs[n], out_dtype) for n in names})
               for file, names in shards.items()}
    writer_of = {n: writers[file] for file, names in shards.items() for n in names}
    # Rules that read the same stored leaves go together (with scan_layers, all layers of
    # one kind); small groups are batched up to a budget so Orbax is not called per tensor.
    groups = {}
    for r in rules:
      if r.hf:
        groups.setdefault(frozenset(_stored(p, scan)[0] for p in r.lm), []).append(r)
    budget = max(64 << 20, sum(sizes.values()) // 20)
    batch, batch_bytes = [], 0
    for i, (leaves, group) in enumerate(groups.items()):
      batch.append((leaves, group))
      batch_bytes += sum(4 * math.prod(shapes[p]) for r in group for p in r.lm)
      if batch_bytes >= budget or i == len(groups) - 1:
        _export_batch(reader, batch, scan, out_dtype, writer_of)
        batch, batch_bytes = [], 0
        lazy.trim_memory()
    for w in writers.values():
      w.close()
  finally:
    reader.close()

  if len(shards) > 1:
    weight_map = {n: file for file, names in shards.items() for n in names}
    (out / st.INDEX).write_text(json.dumps(
        dict(metadata=dict(total_size=sum(sizes.values())), weight_map=weight_map), indent=2))
  _export_tokenizer(workdir, out, hf)
  (out / 'config.json').write_text(json.dumps(hf, indent=2, sort_keys=True))
  return hf


def _export_batch(reader, batch, scan: bool, dtype, writer_of) -> None:
  """Restores the leaves of a batch of rule groups and writes their HF tensors."""
  arrays = reader.read(sorted(set().union(*(leaves for leaves, _ in batch))))
  for _, group in batch:
    for r in group:
      xs = [arrays[where] if layer is None else arrays[where][layer]
            for where, layer in (_stored(p, scan) for p in r.lm)]
      for name, x in zip(r.hf, r.to_hf(*xs)):
        writer_of[name].write(name, np.asarray(x).astype(dtype, copy=False))


def _export_tokenizer(workdir, out, hf: dict) -> None:
  """Saves a HF tokenizer into out; special ids that config.json lacks come from the run's."""
  try:
    tokenizer = checkpoint.read_tokenizer(workdir)
  except (FileNotFoundError, ValueError) as e:
    logging.warning('No tokenizer exported: %s', e)
    return
  for name in ('bos', 'eos', 'pad'):  # an explicit null (BERT's bos and eos) stays
    if f'{name}_token_id' not in hf:
      hf[f'{name}_token_id'] = getattr(tokenizer, f'{name}_id', None)
  if tokenizer.kind in hf_tokenizers.KINDS:
    tokenizer.save(out)
  else:
    logging.warning('The run\'s tokenizer (kind %s) has no Hugging Face form: %s gets no '
                    'tokenizer files.', tokenizer.kind, out)
