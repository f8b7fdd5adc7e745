"""Tasks in the trainer: a task with extra state (a frozen reference) trains, checkpoints and
resumes bitwise; data hooks reach the pipeline; runtime fields may change on resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config
from lm.train import checkpoint as ckpt_lib
from lm.train import metrics as metrics_lib
from lm.train import tasks, trainer

HOOK_CALLS = []


@tasks.register
class AnchoredLM(tasks.CausalLM):
  """Causal LM plus beta * KL(policy || frozen reference), per target token: the shape of
  DPO/RLHF-style tasks (extra state that never trains, task metrics in train and eval)."""
  name = 'test_anchored_lm'
  beta = 0.5

  def init_extra(self, params):
    return {'reference': params}

  def batch_transform(self, tokenizer):
    def hook(batch, rng):
      HOOK_CALLS.append(len(batch['inputs']))
      return batch
    return hook

  def _kl(self, model, params, extra, batch, rng, deterministic):
    logp = jax.nn.log_softmax(tasks._forward(model, params, batch, rng, deterministic))
    ref = jax.nn.log_softmax(tasks._forward(model, jax.lax.stop_gradient(extra['reference']),
                                            batch, None, True))
    kl_BT = jnp.sum(jnp.exp(logp) * (logp - ref), axis=-1)
    return jnp.sum(kl_BT * batch['weights']), logp

  def loss(self, model, params, extra, batch, rng, deterministic):
    kl, logp = self._kl(model, params, extra, batch, rng, deterministic)
    nll_BT = -jnp.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
    w = batch['weights']
    return jnp.sum(nll_BT * w) + self.beta * kl, jnp.sum(w), {'kl': kl}

  def eval_stats(self, model, params, extra, batch):
    stats = super().eval_stats(model, params, extra, batch)
    stats['kl_sum'] = self._kl(model, params, extra, batch, None, True)[0]
    return stats

  def eval_metrics(self, stats):
    return {**super().eval_metrics(stats), 'eval/kl': stats['kl_sum'] / stats['weight']}


ONE = jax.devices()[:1]  # one device: these test tasks and resume, not sharding


def config(data_dir, **train):
  c = base_config()
  c.task.name = AnchoredLM.name
  c.model.update(vocab_size=0, max_len=32, d_model=32, n_layers=2, n_heads=2)
  c.data.update(dataset='default', tokenizer='bytes', data_dir=str(data_dir))
  c.train.update(batch_size=8, steps=12, log_every=1, eval_every=6, eval_steps=2, seed=3)
  c.train.update(train)
  c.optimizer.update(warmup_steps=2, lr=3e-3, decay_steps=12)
  c.checkpoint.update(every_steps=6, keep=3, async_save=False)
  return c


def losses(workdir):
  return {r['step']: (r['train/loss'], r.get('train/kl')) for r in
          metrics_lib.read_metrics(workdir) if 'train/loss' in r}


def test_task_with_extra_state_trains_checkpoints_and_resumes_bitwise(data_dir, tmp_path):
  HOOK_CALLS.clear()
  out = trainer.train(config(data_dir), tmp_path / 'once', log=lambda s: None, devices=ONE)
  assert HOOK_CALLS, 'the task\'s batch transform never reached the pipeline'
  trainer.train(config(data_dir, steps=6), tmp_path / 'twice', log=lambda s: None, devices=ONE)
  # resumes at 6
  trainer.train(config(data_dir), tmp_path / 'twice', log=lambda s: None, devices=ONE)
  once, twice = losses(tmp_path / 'once'), losses(tmp_path / 'twice')
  assert sorted(once) == list(range(1, 13)) and once == twice  # bitwise, KL included
  assert abs(once[1][1]) < 1e-6 < once[12][1]  # the policy moves away from its anchor
  evals = [r for r in metrics_lib.read_metrics(tmp_path / 'once') if 'eval/loss' in r]
  assert [r['step'] for r in evals] == [6, 12] and evals[1]['eval/kl'] > 0.0
  assert 'eval/perplexity' in evals[0]
  # The reference is in the checkpoint, frozen at the initial params.
  state = out['state']
  setup = out['setup']
  init = setup.init_state(jax.random.PRNGKey(3))
  jax.tree.map(np.testing.assert_array_equal, state['extra']['reference'], init['params'])
  ckpt = ckpt_lib.Checkpointer(tmp_path / 'twice', None, read_only=True)
  restored, _ = ckpt.restore(12, setup.abstract_state)
  jax.tree.map(np.testing.assert_array_equal, restored['extra'], state['extra'])
  ckpt.close()


def test_task_aux_metrics_accumulate_over_microbatches():
  """Aux sums (here the KL) add up over microbatches exactly as over the big batch."""
  c = config('', steps=3)
  c.optimizer.warmup_steps = 0  # the first step moves the params off the reference
  c.model.vocab_size = 64
  results = []
  for micro in (1, 4):
    c.train.microbatches = micro
    setup = trainer.build(c, jax.devices()[:1])
    state = setup.init_state(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    for _ in range(2):
      x = rng.integers(0, 64, (8, 33), dtype=np.int32)
      batch = dict(inputs=x[:, :-1], targets=x[:, 1:], segment_ids=np.ones((8, 32), np.int32),
                   positions=np.broadcast_to(np.arange(32, dtype=np.int32), (8, 32)),
                   weights=np.ones((8, 32), np.float32))
      state, m = setup.train_step(state, trainer.global_batch(setup, batch))
    results.append(jax.device_get(m))
  assert results[0]['train/kl'] > 0
  for k in ('train/loss', 'train/kl', 'train/grad_norm'):
    np.testing.assert_allclose(results[0][k], results[1][k], rtol=2e-5)


def test_unknown_task_is_rejected():
  c = base_config()
  c.task.name = 'nope'
  with pytest.raises(ValueError, match="Unknown task.name 'nope'"):
    tasks.get_task(c)


def test_runtime_fields_may_change_on_resume(data_dir, tmp_path):
  """remat, scan_layers (a different params layout) and attention change between runs of
  one workdir; the architecture may not."""
  c = config(data_dir, steps=6, eval_every=0)
  c.task.name = 'causal_lm'
  trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=ONE)
  ref = config(data_dir, steps=8, eval_every=0)
  ref.task.name = 'causal_lm'
  trainer.train(ref, tmp_path / 'ref', log=lambda s: None, devices=ONE)
  c8 = config(data_dir, steps=8, eval_every=0)
  c8.task.name = 'causal_lm'
  c8.runtime.update(remat='full', scan_layers=True, attention='xla')
  out = trainer.train(c8, tmp_path / 'run', log=lambda s: None, devices=ONE)
  assert 'layers' in out['state']['params'] and out['step'] == 8
  got, want = losses(tmp_path / 'run'), losses(tmp_path / 'ref')
  np.testing.assert_allclose([got[s][0] for s in (7, 8)], [want[s][0] for s in (7, 8)],
                             rtol=1e-4)
  c8.model.d_model = 64
  with pytest.raises(ValueError, match='model differs'):
    trainer.train(c8, tmp_path / 'run', log=lambda s: None, devices=ONE)


def test_model_runtime_keys_point_to_the_runtime_section():
  c = base_config()
  with c.unlocked():
    c.model.remat = 'full'
  from lm.config import check_keys  # pylint: disable=import-outside-toplevel
  with pytest.raises(KeyError, match='runtime field now: set runtime.remat'):
    check_keys(c)


def test_configs_saved_before_the_split_still_load():
  old = ('{"model": {"family": "decoder", "vocab_size": 65, "dtype": "bfloat16", '
         '"remat": "full", "attention": "xla"}, "train": {"objective": "causal_lm", '
         '"z_loss": 0.001, "cpu_matmuls": "onednn", "steps": 7}}')
  c = ckpt_lib.config_from_json(old)
  assert (c.runtime.dtype, c.runtime.remat, c.runtime.attention) == ('bfloat16', 'full', 'xla')
  assert (c.task.name, c.task.z_loss, c.runtime.cpu_matmuls) == ('causal_lm', 0.001, 'onednn')
  assert c.model.vocab_size == 65 and c.train.steps == 7 and 'dtype' not in c.model


def test_every_config_loads_and_opens_with_its_command():
  """configs/*.py: get_config() gives a valid config, and the docstring opens with what it
  is and carries the command that runs it."""
  import importlib.util
  import pathlib
  from lm.config import check_keys
  root = pathlib.Path(__file__).resolve().parents[1]
  paths = sorted((root / 'configs').glob('*.py'))
  assert len(paths) > 20
  for path in paths:
    spec = importlib.util.spec_from_file_location(f'config_{path.stem}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    check_keys(config)
    assert module.__doc__ and 'python scripts/' in module.__doc__, path.name
    if config.task.name in tasks.TASKS:
      assert config.model.family in ('decoder', 'encoder', 'encdec'), path.name
