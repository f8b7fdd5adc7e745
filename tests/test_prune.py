"""Magnitude pruning (lm/compress/prune.py): masks and schedule by hand, pruning in training
kept through AdamW and resume, one-shot pruning of a run."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.compress import prune
from lm.config import base_config
from lm.train import checkpoint as ckpt_lib
from lm.train import trainer

ONE = jax.devices()[:1]  # one device: cheaper compiles than the 8-way mesh


def pc_of(**kw):
  c = base_config().prune
  c.update(dict(dict(method='magnitude'), **kw))
  return c


def test_masks_by_hand():
  params = {'a': {'kernel': jnp.array([[1.0, -5.0], [0.5, 3.0]])},
            'b': {'kernel': jnp.array([[-2.0, 0.1], [4.0, 6.0]]), 'bias': jnp.array([0.01, 9.0])}}
  targets = prune.targets(params, 'kernel$')
  assert targets == {'a': {'kernel': True}, 'b': {'kernel': True, 'bias': False}}
  # global 50%: the 4 smallest |w| of all 8 kernel weights: 0.1, 0.5, 1, 2
  m = prune.masks_for(params, targets, 0.5, pc_of(scope='global'))
  assert m['a']['kernel'].tolist() == [[False, True], [False, True]]
  assert m['b']['kernel'].tolist() == [[False, False], [True, True]]
  assert m['b']['bias'].tolist() == [True, True]  # not a target
  # per layer 50%: two of each kernel
  m = prune.masks_for(params, targets, 0.5, pc_of(scope='layer'))
  assert m['a']['kernel'].tolist() == [[False, True], [False, True]]
  assert m['b']['kernel'].tolist() == [[False, False], [True, True]]
  m = prune.masks_for(params, targets, 0.25, pc_of(scope='layer'))
  assert m['b']['kernel'].tolist() == [[True, False], [True, True]]
  # 2:4 along the first axis: of each column's 4 rows keep the 2 largest
  w = jnp.array([[1.0, -8], [4, 1], [-3, 2], [2, 7]])
  m = prune.masks_for({'k': w}, {'k': True}, 0.0, pc_of(pattern='2:4'))['k']
  assert m.tolist() == [[False, True], [True, False], [True, False], [False, True]]
  with pytest.raises(ValueError, match='not a multiple of 4'):
    prune.masks_for({'k': w[:3]}, {'k': True}, 0.0, pc_of(pattern='2:4'))
  # [heads=2, head_dim=2, out]: both leading axes are inputs, grouped together
  w3 = jnp.array([[[1.0], [2.0]], [[4.0], [3.0]]])
  m = prune.masks_for({'k': w3}, {'k': True}, 0.0, pc_of(pattern='2:4'))['k']
  assert m.reshape(-1).tolist() == [False, False, True, True]
  with pytest.raises(ValueError, match="N:M"):
    prune.parse_nm('4:2')


def test_cubic_schedule_by_hand():
  pc = pc_of(sparsity=0.8, begin_step=10, end_step=20)
  # s (1 - (1 - f)^3): f = 0 -> 0, 0.5 -> 0.8 * 0.875 = 0.7, 1 -> 0.8
  assert [float(prune.sparsity_at(t, pc)) for t in (5, 10, 15, 20, 30)] == pytest.approx(
      [0.0, 0.0, 0.7, 0.8, 0.8])
  assert float(prune.sparsity_at(9, pc_of(schedule='oneshot', begin_step=10))) == 0.0
  assert float(prune.sparsity_at(10, pc_of(schedule='oneshot', begin_step=10))) == 0.5
  assert float(prune.sparsity_at(0, pc_of(pattern='2:4'))) == pytest.approx(0.0)


def test_pruned_weights_stay_zero_through_adamw():
  params = {'k': jnp.array(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)}
  tx = prune.wrap(optax.adamw(0.1), pc_of(sparsity=0.5, begin_step=1, end_step=3,
                                           update_every=1, targets='k'), params)
  state = tx.init(params)
  history = []
  for step in range(6):
    grads = {'k': jnp.ones((8, 8))}  # pushes every weight the same way
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(float(jnp.mean(params['k'] == 0)))
  # sparsity after updates 1, 2, 3 follows the schedule (0.5 * (1 - (1-f)^3)), then holds
  # 0.5 * (1 - (1 - 1/2)^3) = 0.4375 after update 2, of 64 weights: 28 zeros
  assert history == pytest.approx([0.0, 28 / 64, 0.5, 0.5, 0.5, 0.5], abs=1 / 64)
  assert bool(jnp.all((params['k'] == 0) == ~state.masks['k']))


def tiny(data_dir, **train):
  c = base_config()
  c.model.update(vocab_size=0, max_len=32, d_model=32, n_layers=1, n_heads=2)
  c.data.update(dataset='default', tokenizer='bytes', data_dir=str(data_dir))
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.train.update(dict(dict(batch_size=8, steps=4, log_every=2, eval_every=0, seed=2), **train))
  c.optimizer.update(warmup_steps=1, decay_steps=4)  # the same schedule at any steps
  c.checkpoint.update(every_steps=2, keep=3, async_save=False)
  c.prune.update(method='magnitude', sparsity=0.6, begin_step=1, end_step=3, update_every=1)
  return c


def test_pruning_in_training_survives_resume(data_dir, tmp_path):
  full = trainer.train(tiny(data_dir), tmp_path / 'full', log=lambda s: None, devices=ONE)
  trainer.train(tiny(data_dir, steps=2), tmp_path / 'half', log=lambda s: None, devices=ONE)
  resumed = trainer.train(tiny(data_dir), tmp_path / 'half', log=lambda s: None, devices=ONE)
  report = prune.sparsity_report(jax.device_get(full['state']['params']),
                                 base_config().prune.targets)
  assert report['total'] == pytest.approx(0.6, abs=0.01) and len(report) > 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(full['state']['params']),
               jax.device_get(resumed['state']['params']))


def test_one_shot_prune_run(tmp_path):
  from test_convert_hf import imported
  from lm.infer.load import load_run
  run = imported('gpt2')[0]  # a dense run (GPT-2 shaped, imported)
  report = prune.prune_run(run, tmp_path / 'pruned', sparsity=0.5)
  assert report['total'] == pytest.approx(0.5, abs=1e-3)
  _, params, _, _ = load_run(tmp_path / 'pruned')
  assert prune.sparsity_report(params, base_config().prune.targets) == pytest.approx(report)
  report = prune.prune_run(run, tmp_path / 'p24', pattern='2:4')
  assert all(v == 0.5 for v in report.values()), report
  with pytest.raises(ValueError, match='not empty'):
    prune.prune_run(run, tmp_path / 'pruned')
  # A soft prompt is no weight, and a quantized run has no float weights: both refused.
  for field, value, match in [('peft.method', 'prefix', 'prefix-tuning run'),
                              ('quant.method', 'int8', 'quantized already')]:
    c = base_config()
    c.update_from_flattened_dict({field: value})
    ckpt_lib.write_run_files(tmp_path / field, c, None)
    with pytest.raises(ValueError, match=match):
      prune.prune_run(tmp_path / field, tmp_path / 'never')
    assert not (tmp_path / 'never').exists()
