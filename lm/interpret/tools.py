"""Attention maps, the logit lens and token attributions of a decoder run.

    model, params, config, tokenizer = load(workdir)      # unscanned, plain XLA kernels
    probs_LNTT = attention_maps(model, params, ids)
    lens = logit_lens(model, params, ids)                 # log-probs [L, T, V] per layer
    out = attributions(model, params, ids, target_id)     # integrated gradients

The model reports what it computes when asked (lm/models): each attention layer sows its
probabilities and the decoder each block's output in the 'intermediates' collection, and
the token embeddings carry a zero 'perturbations' variable, so gradients and scaled inputs
reach them without a second implementation of the model.

- The logit lens (nostalgebraist) reads each layer's residual stream through the final norm
  and the head; the last layer's reading is the model's own output.
- Integrated gradients (Sundararajan et al.): from a baseline of zero token embeddings (the
  positions stay) to the input, `steps` midpoints; the attributions of the output's
  log-probability sum to output(input) - output(baseline) up to the quadrature error
  (`completeness_error`, relative). Gradient x input is the one-step version.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm import models
from lm.ops import norms


def load(workdir):
  """(model, params, config, tokenizer) of a decoder run, layers unscanned, XLA kernels."""
  from lm.infer.load import load_run
  _, params, config, tokenizer = load_run(workdir)
  if config.model.family != 'decoder':
    raise ValueError(f'{workdir} is an {config.model.family} run; the interpretability tools '
                     'read decoders.')
  if config.peft.method in ('prompt', 'prefix'):
    raise ValueError(f'{workdir} is a {config.peft.method}-tuning run; its soft prompt is not '
                     'a token to attribute to. Inspect its base.')
  runtime = config.runtime.copy_and_resolve_references()
  scanned = runtime.scan_layers
  runtime.update(scan_layers=False, remat='none', attention='xla')
  model = models.get_model(config.model, runtime)
  if scanned:
    params = models.relayout(params, scanned=False)
  return model, params, config, tokenizer


@functools.partial(jax.jit, static_argnames='model')
def _intermediates(model, params, tokens_1T):
  logits, state = model.apply({'params': params}, tokens_1T, mutable=['intermediates'])
  return logits[0], state['intermediates']


def attention_maps(model, params, ids) -> np.ndarray:
  """Attention probabilities [layers, heads, T, T] (query, key) of one sequence."""
  _, inter = _intermediates(model, params, jnp.asarray([ids], jnp.int32))
  n = model.cfg.n_layers
  return np.stack([np.asarray(inter[f'layers_{i}']['attn']['attention_probs'][0][0])
                   for i in range(n)])


def logit_lens(model, params, ids) -> np.ndarray:
  """log-probs [layers, T, V] of the next token read out of each layer's output."""
  cfg = model.cfg
  logits_TV, inter = _intermediates(model, params, jnp.asarray([ids], jnp.int32))
  hidden_LTD = jnp.stack([h[0] for h in inter['residual']]).astype(jnp.float32)
  norm = params['final_norm']
  h = norms.norm(hidden_LTD, norm['scale'], norm.get('bias'), cfg.norm == 'layernorm',
                 cfg.norm_eps)
  head_DV = params['embed'].T if cfg.tie_embeddings else params['lm_head']['kernel']
  out = jax.nn.log_softmax(h @ head_DV.astype(jnp.float32), axis=-1)
  return np.asarray(out)


def top_tokens(logp_LTV, tokenizer, k: int = 3) -> list[list[list[tuple[str, float]]]]:
  """[layer][position] -> the k likeliest next tokens (text, probability)."""
  order = np.argsort(-logp_LTV, axis=-1)[..., :k]
  return [[[(tokenizer.decode([int(i)]), float(np.exp(logp_LTV[l, t, i]))) for i in order[l, t]]
           for t in range(logp_LTV.shape[1])] for l in range(logp_LTV.shape[0])]


@dataclasses.dataclass
class Attribution:
  scores: np.ndarray  # [T] per input token (summed over the embedding)
  output: float  # log p(target | input) at `position`
  baseline_output: float  # the same with zero token embeddings
  completeness_error: float  # |sum(scores) - (output - baseline)| / |output - baseline|


def attributions(model, params, ids, target_id: int, position: int = -1, steps: int = 64,
                 method: str = 'integrated_gradients', batch: int = 16) -> Attribution:
  """Each input token's share of log p(target_id) at `position` (module docstring)."""
  if method not in ('integrated_gradients', 'grad_x_input'):
    raise ValueError(f"method must be 'integrated_gradients' or 'grad_x_input'; got {method!r}.")
  tokens_T = jnp.asarray(ids, jnp.int32)
  embed_TD = jnp.take(params['embed'], tokens_T, axis=0).astype(jnp.float32)

  def output(delta_BTD):  # summed over the batch: each row's gradient is its own
    tokens_BT = jnp.broadcast_to(tokens_T, delta_BTD.shape[:2])
    logits = model.apply({'params': params, 'perturbations': {'token_embeddings': delta_BTD}},
                         tokens_BT)[:, position]
    return jnp.sum(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[:, target_id])

  grad = jax.jit(jax.grad(output))
  value = jax.jit(output)
  f_input = float(value(jnp.zeros((1,) + embed_TD.shape)))
  f_base = float(value(-embed_TD[None]))
  if method == 'grad_x_input':
    alphas = np.ones(1, np.float32)
  else:
    alphas = (np.arange(steps, dtype=np.float32) + 0.5) / steps  # midpoints
  total_TD = jnp.zeros_like(embed_TD)
  for start in range(0, len(alphas), batch):
    a = np.ones(batch, np.float32)  # padding rows: alpha 1, dropped below
    chunk = alphas[start:start + batch]
    a[:len(chunk)] = chunk
    g_BTD = grad((a[:, None, None] - 1.0) * embed_TD[None])  # input = alpha * embeddings
    total_TD = total_TD + g_BTD[:len(chunk)].sum(0)
  scores = np.asarray(jnp.sum(total_TD / len(alphas) * embed_TD, axis=-1))
  diff = f_input - f_base
  return Attribution(scores, f_input, f_base,
                     abs(float(scores.sum()) - diff) / max(abs(diff), 1e-12))


# -- pictures (matplotlib's Agg canvas: no display needed) ----------------------------------

def _figure(width, height):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def token_labels(tokenizer, ids) -> list[str]:
  """Printable token labels: escapes for control characters, '␣' for a space."""
  return [repr(tokenizer.decode([int(i)]))[1:-1].replace(' ', '␣') or '·' for i in ids]


def plot_attention(probs_LNTT, labels, path, layer: int) -> str:
  """One layer's heads side by side as heat maps (rows: queries, columns: keys)."""
  heads = probs_LNTT.shape[1]
  fig = _figure(3 * heads, 3.2)
  for h in range(heads):
    ax = fig.add_subplot(1, heads, h + 1)
    ax.imshow(probs_LNTT[layer, h], cmap='viridis', vmin=0, vmax=1)
    ax.set_title(f'layer {layer} head {h}', fontsize=8)
    ticks = range(len(labels))
    ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
    ax.set_yticks(ticks, labels, fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return str(path)


def plot_logit_lens(logp_LTV, tokenizer, labels, path) -> str:
  """The top-1 next token of each layer (rows) at each position (columns), shaded by its
  probability."""
  best = logp_LTV.argmax(-1)
  prob = np.exp(logp_LTV.max(-1))
  layers, t = best.shape
  fig = _figure(max(4, 0.6 * t), max(2, 0.5 * layers + 1))
  ax = fig.add_subplot(1, 1, 1)
  ax.imshow(prob, cmap='Blues', vmin=0, vmax=1, aspect='auto')
  for l in range(layers):
    for j in range(t):
      ax.text(j, l, token_labels(tokenizer, [best[l, j]])[0], ha='center', va='center',
              fontsize=6)
  ax.set_xticks(range(t), labels, rotation=90, fontsize=6)
  ax.set_yticks(range(layers), [f'layer {l}' for l in range(layers)], fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return str(path)


def plot_attributions(scores, labels, path, title: str = '') -> str:
  fig = _figure(max(4, 0.35 * len(labels)), 2.5)
  ax = fig.add_subplot(1, 1, 1)
  ax.bar(range(len(labels)), scores, color=['tab:red' if s < 0 else 'tab:blue' for s in scores])
  ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
  ax.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return str(path)
