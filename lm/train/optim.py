"""Optimizers and schedules (optax), weight-decay and trainable-parameter masks."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from lm.ops import cpu_adamw


def make_schedule(oc, total_steps: int) -> optax.Schedule:
  """Linear warmup to oc.lr, then cosine | linear | inverse_sqrt | constant."""
  decay_steps = max((oc.decay_steps or total_steps) - oc.warmup_steps, 1)
  warmup = optax.linear_schedule(0.0, oc.lr, max(oc.warmup_steps, 1))
  if oc.schedule == 'cosine':
    alpha = oc.min_lr / oc.lr if oc.lr else 0.0
    decay = optax.cosine_decay_schedule(oc.lr, decay_steps, alpha=alpha)
  elif oc.schedule == 'linear':
    decay = optax.linear_schedule(oc.lr, oc.min_lr, decay_steps)
  elif oc.schedule == 'inverse_sqrt':
    w = max(oc.warmup_steps, 1)
    decay = lambda step: oc.lr * jnp.sqrt(w / (step + w))
  elif oc.schedule == 'constant':
    decay = optax.constant_schedule(oc.lr)
  else:
    raise ValueError(f"optimizer.schedule must be cosine, linear, inverse_sqrt or constant; "
                     f"got {oc.schedule!r}.")
  if oc.warmup_steps <= 0:
    return decay
  return optax.join_schedules([warmup, decay], [oc.warmup_steps])


def path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def decay_mask(params, kind: str):
  """Which params get weight decay: '2d' (matrices, as GPT-2/nanoGPT), 'all' or 'none'."""
  if kind not in ('2d', 'all', 'none'):
    raise ValueError(f"optimizer.weight_decay_mask must be 2d, all or none; got {kind!r}.")
  def one(path, x):
    if kind == '2d':  # scanned layers add a leading axis; norms/biases stay 1-D per layer
      layer_axis = 'layers' in path_str(path).split('/')[:1]
      return x.ndim - int(layer_axis) >= 2
    return kind == 'all'
  return jax.tree_util.tree_map_with_path(one, params)


def trainable_mask(params, pattern: str):
  """True where a parameter trains: 'all', or a regex searched in 'a/b/kernel' paths."""
  if pattern == 'all':
    return jax.tree.map(lambda _: True, params)
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda p, _: bool(regex.search(path_str(p))), params)
  if not any(jax.tree.leaves(mask)):
    raise ValueError(f'optimizer.trainable={pattern!r} matches no parameter; paths look like '
                     f'{path_str(jax.tree_util.tree_flatten_with_path(params)[0][0][0])!r}.')
  return mask


def make_optimizer(oc, total_steps: int, params) -> tuple[optax.GradientTransformation,
                                                           optax.Schedule]:
  """Clip -> optimizer with masked weight decay; frozen params get zero updates."""
  schedule = make_schedule(oc, total_steps)
  wd_mask = decay_mask(params, oc.weight_decay_mask)
  if oc.name == 'adamw':
    tx = optax.adamw(schedule, oc.b1, oc.b2, oc.eps, weight_decay=oc.weight_decay, mask=wd_mask)
  elif oc.name == 'lion':
    tx = optax.lion(schedule, oc.b1, oc.b2, weight_decay=oc.weight_decay, mask=wd_mask)
  elif oc.name == 'adafactor':
    tx = optax.adafactor(schedule, weight_decay_rate=oc.weight_decay or None,
                         weight_decay_mask=wd_mask)
  elif oc.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(oc.weight_decay, wd_mask),
                     optax.sgd(schedule, momentum=oc.momentum or None))
  else:
    raise ValueError(f"optimizer.name must be adamw, adafactor, lion or sgd; got {oc.name!r}.")
  if oc.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(oc.grad_clip), tx)
  if oc.trainable != 'all':
    labels = jax.tree.map(lambda t: 'train' if t else 'freeze',
                          trainable_mask(params, oc.trainable))
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)
  return tx, schedule


def fused_update(oc, schedule: optax.Schedule, params, kernels):
  """A one-op replacement for tx.update + optax.apply_updates, or None where it does not
  apply: `(params, grads, opt_state) -> (params, opt_state, global norm of grads)`.

  For AdamW (clipped or not) on all parameters, float32, where the kernel seam allows it
  (kernels.fused_adamw: one CPU device, C++ kernels built; lm/ops/cpu_adamw.py): the same arithmetic on the same optax state, in place.
  XLA:CPU would run ~6 small ops per parameter array: +5-8% tokens/s on the 4x128 model
  (scripts/benchmark.py, `optimizer.fused` False then True, interleaved).
  """
  leaves = jax.tree.leaves(params)
  if (oc.name != 'adamw' or oc.trainable != 'all' or not oc.fused or not kernels.fused_adamw
      or any(x.dtype != jnp.float32 for x in leaves)):
    return None
  decay = jax.tree.leaves(decay_mask(params, oc.weight_decay_mask))
  clip = oc.grad_clip if oc.grad_clip > 0 else float('inf')

  def update(params, grads, opt_state):
    count = optax.tree_utils.tree_get_all_with_path(opt_state, 'count')[0][1]
    p, treedef = jax.tree.flatten(params)
    p, mu, nu, norm = cpu_adamw.update(
        p, treedef.flatten_up_to(grads),
        treedef.flatten_up_to(optax.tree.get(opt_state, 'mu')),
        treedef.flatten_up_to(optax.tree.get(opt_state, 'nu')), schedule(count), count,
        b1=oc.b1, b2=oc.b2, eps=oc.eps, wd=oc.weight_decay, clip=clip, decay=decay)
    opt_state = optax.tree.set(opt_state, mu=treedef.unflatten(mu), nu=treedef.unflatten(nu),
                               count=optax.safe_increment(count))
    return treedef.unflatten(p), opt_state, norm

  return update
