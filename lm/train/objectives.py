"""Objectives: a loss over a batch (and later, a batch transform for the data pipeline).

The trainer never hard-codes next-token loss; it looks the objective up by
`config.train.objective`. Each loss returns (sum of per-token losses, sum of
weights, aux metrics) so microbatches add up exactly to the big batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def causal_lm_loss(model, params, batch, *, rng=None, deterministic=True, z_loss=0.0):
  """Next-token cross entropy in float32, masked by batch['weights']."""
  rngs = None if deterministic else {'dropout': rng}
  logits_BTV = model.apply({'params': params}, batch['inputs'],
                           positions_BT=batch.get('positions'),
                           segment_ids_BT=batch.get('segment_ids'),
                           deterministic=deterministic, rngs=rngs)
  logits_BTV = logits_BTV.astype(jnp.float32)
  loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
  weights_BT = batch['weights'].astype(jnp.float32)
  aux = {}
  if z_loss:  # PaLM's auxiliary loss keeps the softmax normaliser near 1
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    z_BT = z_loss * jnp.square(log_z_BT)
    aux['z_loss'] = jnp.sum(z_BT * weights_BT)
    loss_BT = loss_BT + z_BT
  return jnp.sum(loss_BT * weights_BT), jnp.sum(weights_BT), aux


OBJECTIVES = {
    'causal_lm': causal_lm_loss,
}


def get_objective(name: str):
  if name not in OBJECTIVES:
    raise ValueError(f'Unknown train.objective {name!r}; known: {sorted(OBJECTIVES)}.')
  return OBJECTIVES[name]
