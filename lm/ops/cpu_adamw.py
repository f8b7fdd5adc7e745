"""AdamW with global-norm clipping as one C++ custom call on XLA:CPU (cpu_adamw.cc).

The same update as optax.chain(optax.clip_by_global_norm(clip), optax.adamw(...)) followed
by optax.apply_updates, on the same optax state, in one op instead of ~6 per parameter
array. Built and registered by lm/ops/cpu_kernels.py; lm/train/optim.py decides when to
use it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def update(params: list[Array], grads: list[Array], mu: list[Array], nu: list[Array],
           lr: Array, count: Array, *, b1: float, b2: float, eps: float, wd: float,
           clip: float, decay: list[bool]):
  """One step on flat lists of float32 arrays; count is the step count before this step.
  Returns (params, mu, nu, global norm of grads)."""
  t = (count + 1).astype(jnp.float32)
  hyper = jnp.stack([lr, 1 - b1 ** t, 1 - b2 ** t]).astype(jnp.float32)
  n = len(params)
  shapes = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in params]
  outs = jax.ffi.ffi_call(
      'LmAdamW', (*shapes, *shapes, *shapes, jax.ShapeDtypeStruct((), jnp.float32)),
      # params, mu, nu are updated where they lie: arguments 1 + i, 1 + 2n + i, 1 + 3n + i
      input_output_aliases={**{1 + i: i for i in range(n)},
                            **{1 + 2 * n + i: n + i for i in range(n)},
                            **{1 + 3 * n + i: 2 * n + i for i in range(n)}},
  )(hyper, *params, *grads, *mu, *nu, b1=np.float32(b1), b2=np.float32(b2),
    eps=np.float32(eps), wd=np.float32(wd), clip=np.float32(clip),
    decay=np.asarray(decay, np.int64))
  return list(outs[:n]), list(outs[n:2 * n]), list(outs[2 * n:3 * n]), outs[3 * n]
