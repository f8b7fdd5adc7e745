"""Magnitude pruning: unstructured (global or per layer) and N:M (2:4), one-shot or gradual.

In training (`config.prune.method='magnitude'`, any task, usually a fine-tuning run from
init_from) the optimizer is wrapped: after each update the pruned weights are set to
exactly zero, and the masks live in the optimizer state, so they survive checkpoints and
resume, and AdamW's moments never bring a pruned weight back. Masks are recomputed from the
weights' magnitudes every `update_every` steps from `begin_step`; the sparsity follows Zhu &
Gupta's cubic schedule s_t = s (1 - (1 - (t - begin) / (end - begin))^3) up to `end_step`
('gradual') or jumps to `sparsity` at `begin_step` ('oneshot'). A weight once pruned stays
pruned. N:M keeps the N largest of each M consecutive weights along the kernel's input
axis, the layout sparse tensor cores use, so its sparsity is 1 - N/M.

`prune_params` prunes a params tree once (scripts/prune.py); `sparsity_report` gives it per
kernel. A pruned model is a dense one with zeros: it exports to Hugging Face as any other.
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm.train.optim import path_str


class PruneState(NamedTuple):
  inner: Any  # the wrapped optimizer's state
  masks: Any  # bool per weight (all True where not pruned / not a target)
  count: jax.Array  # updates made


def targets(params, pattern: str):
  """True for the kernels `pattern` (a regex over param paths) picks: 2-D or more."""
  regex = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: x.ndim >= 2 and regex.search(path_str(p)) is not None, params)


def parse_nm(pattern: str) -> tuple[int, int] | None:
  """'2:4' -> (2, 4); 'unstructured' -> None."""
  if pattern == 'unstructured':
    return None
  m = re.fullmatch(r'(\d+):(\d+)', pattern)
  if not m or not 0 < int(m[1]) < int(m[2]):
    raise ValueError(f"prune.pattern must be 'unstructured' or N:M with 0 < N < M (e.g. "
                     f"'2:4'); got {pattern!r}.")
  return int(m[1]), int(m[2])


def _nm_mask(w, n: int, m: int):
  """Keeps the n largest of each m consecutive weights along the input axis: the first, or
  the first two flattened when the first is shorter (attention's output projection,
  heads x head_dim, both contracted)."""
  rows = w.shape[0] if w.shape[0] % m == 0 or w.ndim < 3 else w.shape[0] * w.shape[1]
  if rows % m:
    raise ValueError(f'N:M pruning groups the input axis in runs of {m}: a kernel of shape '
                     f'{w.shape} has {rows} input rows, not a multiple of {m}; exclude it '
                     'with prune.targets.')
  g = jnp.abs(w).reshape((rows // m, m, -1))
  rank = jnp.argsort(jnp.argsort(-g, axis=1), axis=1)  # 0 = the largest of its group
  return (rank < n).reshape(w.shape)


def _keep_largest(a, k_prune):
  """Mask keeping all but the k_prune smallest of `a` (ties broken by position)."""
  order = jnp.argsort(a.reshape(-1))
  rank = jnp.zeros(order.shape, jnp.int32).at[order].set(jnp.arange(order.size, dtype=jnp.int32))
  return (rank >= k_prune).reshape(a.shape)


def masks_for(params, is_target, sparsity, pc):
  """Masks pruning `sparsity` (a traced scalar is fine) of the targets by magnitude."""
  nm = parse_nm(pc.pattern)
  leaves, treedef = jax.tree.flatten(params)
  chosen = jax.tree.leaves(is_target)
  out = [jnp.ones(x.shape, bool) for x in leaves]
  picked = [i for i, t in enumerate(chosen) if t]
  if nm is not None:
    for i in picked:
      out[i] = _nm_mask(leaves[i], *nm)
    return treedef.unflatten(out)
  if pc.scope == 'global':
    flat = jnp.concatenate([jnp.abs(leaves[i]).reshape(-1) for i in picked])
    keep = _keep_largest(flat, jnp.floor(sparsity * flat.size).astype(jnp.int32))
    start = 0
    for i in picked:
      out[i] = keep[start:start + leaves[i].size].reshape(leaves[i].shape)
      start += leaves[i].size
  elif pc.scope == 'layer':
    for i in picked:
      out[i] = _keep_largest(jnp.abs(leaves[i]),
                             jnp.floor(sparsity * leaves[i].size).astype(jnp.int32))
  else:
    raise ValueError(f"prune.scope must be 'global' or 'layer'; got {pc.scope!r}.")
  return treedef.unflatten(out)


def sparsity_at(step, pc):
  """The target sparsity after `step` updates (0 before begin_step)."""
  s = pc.sparsity if parse_nm(pc.pattern) is None else 1 - parse_nm(pc.pattern)[0] / parse_nm(
      pc.pattern)[1]
  if pc.schedule == 'oneshot':
    return jnp.where(step >= pc.begin_step, s, 0.0)
  span = max(pc.end_step - pc.begin_step, 1)
  frac = jnp.clip((step - pc.begin_step) / span, 0.0, 1.0)
  return jnp.where(step >= pc.begin_step, s * (1 - (1 - frac) ** 3), 0.0)


def check(pc) -> None:
  if pc.method not in ('none', 'magnitude'):
    raise ValueError(f"prune.method must be 'none' or 'magnitude'; got {pc.method!r}.")
  parse_nm(pc.pattern)
  if not 0.0 <= pc.sparsity < 1.0:
    raise ValueError(f'prune.sparsity must lie in [0, 1); got {pc.sparsity}.')
  if pc.schedule not in ('oneshot', 'gradual'):
    raise ValueError(f"prune.schedule must be 'oneshot' or 'gradual'; got {pc.schedule!r}.")
  if pc.schedule == 'gradual' and pc.end_step <= pc.begin_step:
    raise ValueError('prune.end_step must come after prune.begin_step for a gradual schedule.')
  if pc.update_every <= 0:
    raise ValueError('prune.update_every must be positive.')
  try:
    re.compile(pc.targets)
  except re.error as e:
    raise ValueError(f'prune.targets={pc.targets!r} is not a regex: {e}.') from None


def wrap(inner: optax.GradientTransformation, pc, params) -> optax.GradientTransformation:
  """`inner`, then the magnitude masks of config.prune (module docstring)."""
  check(pc)
  is_target = targets(params, pc.targets)
  if not any(jax.tree.leaves(is_target)):
    raise ValueError(f'prune.targets={pc.targets!r} matches no kernel.')
  last = pc.begin_step if pc.schedule == 'oneshot' else pc.end_step

  def init(params):
    return PruneState(inner.init(params), jax.tree.map(lambda x: jnp.ones(x.shape, bool), params),
                      jnp.zeros((), jnp.int32))

  def update(grads, state, params):
    updates, inner_state = inner.update(grads, state.inner, params)
    new = optax.apply_updates(params, updates)
    step = state.count + 1  # updates made after this one
    due = (step >= pc.begin_step) & (step <= last) & (
        ((step - pc.begin_step) % pc.update_every == 0) | (step == last))
    masked = jax.tree.map(lambda p, m: p * m, new, state.masks)  # pruned stay smallest
    masks = jax.lax.cond(due, lambda: masks_for(masked, is_target, sparsity_at(step, pc), pc),
                         lambda: state.masks)
    masks = jax.tree.map(jnp.logical_and, masks, state.masks)
    new = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), new, masks)
    return (jax.tree.map(lambda n, p: n - p, new, params),
            PruneState(inner_state, masks, step))

  return optax.GradientTransformation(init, update)


def prune_params(params, pc):
  """The params with config.prune's final sparsity applied once, by magnitude."""
  check(pc)
  is_target = targets(params, pc.targets)
  if not any(jax.tree.leaves(is_target)):
    raise ValueError(f'prune.targets={pc.targets!r} matches no kernel.')
  s = pc.sparsity if parse_nm(pc.pattern) is None else 0.0
  masks = jax.jit(lambda p: masks_for(p, is_target, s, pc))(params)
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity_report(params, pattern: str) -> dict[str, float]:
  """Fraction of zeros in each target kernel, and 'total' over them."""
  is_target = targets(params, pattern)
  out, zeros, size = {}, 0, 0
  for (path, x), t in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(is_target)):
    if t:
      z = int(jnp.sum(x == 0))
      out[path_str(path)] = z / x.size
      zeros, size = zeros + z, size + x.size
  out['total'] = zeros / max(size, 1)
  return out


def prune_run(workdir, out, *, sparsity: float = 0.5, pattern: str = 'unstructured',
              scope: str = 'global', targets: str = r'(attn|mlp)/[^/]+/kernel$',
              step: int | None = None) -> dict:
  """One-shot magnitude pruning of the run in `workdir` (LoRA merged) into a new run `out`
  (float params with zeros). Returns the sparsity per kernel."""
  import ml_collections as mlc
  from lm.infer.load import load_run
  from lm.train import checkpoint
  pc = mlc.ConfigDict(dict(method='magnitude', sparsity=sparsity, pattern=pattern, scope=scope,
                           schedule='oneshot', begin_step=0, end_step=0, update_every=1,
                           targets=targets))
  check(pc)
  new = checkpoint.derived_run_config(workdir, out, 'prune')
  _, params, _, tokenizer = load_run(workdir, step=step)
  pruned = prune_params(params, pc)
  checkpoint.save_inference_run(out, pruned, new, tokenizer)
  return sparsity_report(pruned, targets)
