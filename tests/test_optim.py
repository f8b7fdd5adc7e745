"""Optimizers, schedules and masks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.config import base_config
from lm.ops import backend
from lm.train import optim


def oc(**kw):
  c = base_config().optimizer
  c.update(kw)
  return c


def test_warmup_then_cosine_to_min_lr():
  s = optim.make_schedule(oc(lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule='cosine'), 2000)
  assert float(s(0)) == 0.0
  assert float(s(50)) == pytest.approx(5e-4)
  assert float(s(100)) == pytest.approx(1e-3)
  assert float(s(2000)) == pytest.approx(1e-4, rel=1e-4)
  assert float(s(1050)) == pytest.approx(5.5e-4, rel=1e-3)  # halfway down the cosine


@pytest.mark.parametrize('kind', ['linear', 'inverse_sqrt', 'constant'])
def test_other_schedules_decay_monotonically(kind):
  s = optim.make_schedule(oc(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule=kind), 100)
  values = [float(s(i)) for i in range(10, 100, 10)]
  assert values[0] == pytest.approx(1e-3)
  assert all(b <= a + 1e-12 for a, b in zip(values, values[1:]))


PARAMS = {'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones((3,))},
          'layers': {'norm': {'scale': jnp.ones((2, 3))}, 'w': {'kernel': jnp.ones((2, 3, 3))}}}


def test_weight_decay_mask_is_matrices_only():
  mask = optim.decay_mask(PARAMS, '2d')
  assert mask['dense']['kernel'] and not mask['dense']['bias']
  # Scanned layers carry a leading layer axis that does not make a vector a matrix.
  assert mask['layers']['w']['kernel'] and not mask['layers']['norm']['scale']


@pytest.mark.parametrize('name', ['adamw', 'adafactor', 'lion', 'sgd'])
def test_each_optimizer_descends(name):
  tx, _ = optim.make_optimizer(oc(name=name, lr=0.05, warmup_steps=0, schedule='constant'),
                               100, PARAMS)
  loss = lambda p: sum(jnp.sum(jnp.square(x - 0.5)) for x in jax.tree.leaves(p))
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < float(loss(PARAMS))


def test_trainable_regex_freezes_the_rest():
  tx, _ = optim.make_optimizer(oc(lr=0.1, warmup_steps=0, trainable=r'^dense/'), 100, PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert float(jnp.abs(updates['dense']['kernel']).sum()) > 0
  assert float(jnp.abs(updates['layers']['w']['kernel']).sum()) == 0
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.make_optimizer(oc(trainable='nothing_here'), 100, PARAMS)


def test_bad_names_are_rejected():
  with pytest.raises(ValueError, match='adamw, adafactor, lion or sgd'):
    optim.make_optimizer(oc(name='adam2'), 10, PARAMS)
  with pytest.raises(ValueError, match='schedule'):
    optim.make_schedule(oc(schedule='step'), 10)


def test_clipping_bounds_the_update():
  tx, _ = optim.make_optimizer(oc(name='sgd', lr=1.0, momentum=0.0, warmup_steps=0,
                                  schedule='constant', grad_clip=1.0, weight_decay=0.0),
                               10, PARAMS)
  grads = jax.tree.map(lambda x: 100 * jnp.ones_like(x), PARAMS)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_fused_adamw_applies_only_where_it_can():
  on = backend.Kernels(fused_adamw=True)
  s = optim.make_schedule(oc(), 10)
  assert optim.fused_update(oc(), s, PARAMS, on) is not None
  assert optim.fused_update(oc(name='sgd'), s, PARAMS, on) is None
  assert optim.fused_update(oc(trainable='dense'), s, PARAMS, on) is None
  assert optim.fused_update(oc(fused=False), s, PARAMS, on) is None
  assert optim.fused_update(oc(), s, PARAMS, backend.Kernels()) is None
  # The seam allows it on one CPU device only (with the kernels built).
  runtime = base_config().runtime
  mesh8 = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  assert not backend.select(runtime, mesh8).fused_adamw
