"""RL from feedback (lm/train/rl.py, lm/train/rewards.py): GRPO's group advantages and k3
KL, PPO's GAE, whitening and clipped losses against numbers worked by hand; the LoRA
reference is exactly the base; the reward registry's errors; one short GRPO run under LoRA
through the trainer with two updates per rollout (the prepare hook: metrics finite, the step
traced once, the second update's ratio off 1); on that run's weights the rollout's
log-probs equal the sampler's, its mask, and the sign of one update."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, peft
from lm.config import base_config
from lm.ops.backend import Kernels
from lm.train import flops, metrics as metrics_lib, rewards, rl, tasks, trainer


def test_group_advantages_and_k3_kl_by_hand():
  r = jnp.array([1., 0., 0., 1., 1., 1., 1., 1.])
  a = np.asarray(rl.group_advantages(r, 4))
  # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735; group 2: uniform -> 0
  want = 0.5 / (math.sqrt(1 / 3) + 1e-4)
  np.testing.assert_allclose(a, [want, -want, -want, want, 0, 0, 0, 0], rtol=1e-5)
  kl = np.asarray(rl.k3_kl(jnp.array([-1., -2., -1.]), jnp.array([-2., -1., -1.])))
  np.testing.assert_allclose(kl, [math.exp(-1), math.e - 2, 0.0], rtol=1e-6, atol=1e-7)


def test_gae_and_whitening_by_hand():
  values = jnp.array([[0.5, 0.6, 0.7]])
  adv, ret = rl.gae(jnp.array([[0., 0., 1.]]), values, jnp.ones((1, 3)), gamma=0.9, lam=0.5)
  # d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03; d0 = .9*.6 - .5 = .04; A_t = d_t + .45 A_t+1
  np.testing.assert_allclose(adv, [[0.11425, 0.165, 0.3]], rtol=1e-5)
  np.testing.assert_allclose(ret, [[0.61425, 0.765, 1.0]], rtol=1e-5)
  # Past the end (mask 0) rewards and values count as 0: the reward 5 is never seen.
  adv, _ = rl.gae(jnp.array([[0., 1., 5.]]), values, jnp.array([[1., 1., 0.]]), 1.0, 0.5)
  np.testing.assert_allclose(adv, [[0.1 + 0.5 * 0.4, 0.4, 0.0]], rtol=1e-5)
  w = rl.masked_whiten(jnp.array([1., 2., 3., 100.]), jnp.array([1., 1., 1., 0.]))
  np.testing.assert_allclose(w[:3], [-1., 0., 1.], rtol=1e-5)  # mean 2, unbiased var 1


def test_clipped_objectives_on_fixed_inputs():
  ratio = jnp.array([1.5, 1.5, 0.5, 0.5])
  adv = jnp.array([1., -1., -1., 1.])
  loss, clipped = rl.clipped_policy_loss(jnp.log(ratio), jnp.zeros(4), adv, 0.2)
  np.testing.assert_allclose(loss, [-1.2, 1.5, 0.8, -0.5], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [1, 0, 1, 0])
  vf, frac = rl.clipped_value_loss(jnp.array([1., 1.]), jnp.array([.5, .5]), jnp.array([0., 2.]),
                                   jnp.ones(2), 0.2)
  # v 1 clipped to .7: (1-0)^2=1 beats .49; (.7-2)^2=1.69 beats 1 -> 0.5 * mean(1, 1.69)
  np.testing.assert_allclose(vf, 0.5 * (1 + 1.69) / 2, rtol=1e-6)
  assert float(frac) == 0.5


def test_response_mask_cuts_after_the_first_eos():
  mask, length = rl.response_mask(jnp.array([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_id=2)
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(length, [2, 4])


def test_reward_registry_and_errors():
  assert rewards.get('exact_match')('p', ' 42 ', '42') == 1.0
  assert rewards.get('partial_match')('p', 'b a c', 'a b c') == 0.5 * 1 / 3
  with pytest.raises(ValueError, match="Unknown reward 'nope'; known: exact_match"):
    rewards.get('nope')

  @rewards.register('test_raises')
  def boom(prompt, response, reference):
    raise KeyError('no answer')
  with pytest.raises(rewards.RewardError, match=r"raised KeyError.*on the prompt 'add: 1 \+ 2"):
    rewards.score(rewards.get('test_raises'), ['add: 1 + 2\n'], ['3'], ['3'])
  with pytest.raises(rewards.RewardError, match='returned nan'):
    rewards.score(lambda p, r, ref: float('nan'), ['x'], ['y'], [None])


class CountingGRPO(rl.GRPO):
  """GRPO counting how often its loss and prepare are traced (per compilation of the step:
  prepare once, the loss once per update)."""
  name = 'grpo_counting'
  traces = 0
  prepares = 0

  def loss(self, *args, **kwargs):
    type(self).traces += 1
    return super().loss(*args, **kwargs)

  def prepare(self, *args, **kwargs):
    type(self).prepares += 1
    return super().prepare(*args, **kwargs)


tasks.register(CountingGRPO)


@rewards.register('test_short')
def short(prompt, response, reference):
  """Varies within every group of a random policy's responses: a gradient from step 1."""
  del prompt, reference
  return -len(response) / 12


def rl_config(name='grpo_counting', **peft_fields):
  c = base_config('decoder')
  # The prompts of the embedded set stay under 64 bytes. Two updates per rollout and a
  # tight clip: the second update's ratio leaves [0.995, 1.005] (lora_b starts at 0, so the
  # first update moves the policy only a little).
  c.task.update(name=name, finetune_examples=32, finetune_eval=4, max_prompt_len=64,
                max_new_tokens=12, reward='test_short', num_generations=4, temperature=1.0,
                updates_per_batch=2, epsilon=0.005)
  c.model.update(vocab_size=0, max_len=80, d_model=32, n_layers=1, n_heads=2)
  c.data.update(tokenizer='bytes')
  c.peft.update(peft_fields)
  c.train.update(batch_size=4, steps=2, log_every=1, eval_every=0, seed=0)
  # Constant lr from the first update: the second update's ratio is off 1 on every step.
  c.optimizer.update(lr=1e-2, warmup_steps=0, schedule='constant')
  c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  old = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')  # faster init compiles
  mp = pytest.MonkeyPatch()
  mp.setattr(metrics_lib, 'plot_losses', lambda workdir: None)
  mp.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))
  c = rl_config(method='lora', rank=4, targets=r'attn/(query|value)$')
  workdir = tmp_path_factory.mktemp('grpo')
  out = trainer.train(c, workdir, log=lambda _: None, devices=jax.devices()[:1])
  out['workdir'] = str(workdir)
  out['traces'] = (CountingGRPO.prepares, CountingGRPO.traces)
  yield out
  mp.undo()
  jax.config.update('jax_default_prng_impl', old)


def test_grpo_run_metrics_finite_and_traced_once(run):
  for k in ('train/loss', 'train/reward', 'train/kl', 'train/entropy', 'train/response_length',
            'train/clip_fraction', 'train/exact_match'):
    assert math.isfinite(run[k]), k
  assert 0 < run['train/response_length'] <= 12
  assert run['train/entropy'] > 0
  assert run['train/kl'] > 0  # the adapters moved the policy off the base
  # Two steps, one compilation: prepare (the rollout) traced once, the loss once per update.
  assert run['traces'] == (1, 2)
  # The logged metrics are the second update's: its params differ from the rollout's, so
  # the ratio is off 1 and the clip acts (on the first it is exactly 1: the test below).
  assert run['train/clip_fraction'] > 0


def test_eval_stats_and_metrics(run):
  """Eval (greedy and sampled held-out responses) traces on the run's weights (shapes only:
  the run skips eval to stay fast) and its metrics are the sums over the count."""
  task, params = run['setup'].task, trainer.full_params(run['state'])
  batch = task.data_iter(run['tokenizer'], 'eval')[0]
  assert batch['index'].tolist() == [0, 1, 2, 3]  # finetune_eval=4 prompts, no empty rows
  stats = jax.eval_shape(lambda p, b: task.eval_stats(run['setup'].model, p, None, b),
                         params, batch)
  assert set(stats) == {'reward', 'exact', 'length', 'count', 'sampled_reward'}
  m = task.eval_metrics(dict(reward=3.0, exact=2.0, length=20.0, count=4.0,
                             sampled_reward=1.0))
  assert m == {'eval/loss': -0.75, 'eval/reward': 0.75, 'eval/exact_match': 0.5,
               'eval/response_length': 5.0, 'eval/sampled_reward': 0.25}


def test_lora_reference_is_exactly_the_base(run):
  state, setup = run['state'], run['setup']
  full = trainer.full_params(state)
  assert np.abs(np.asarray(full['layers_0']['attn']['query']['lora_b'])).max() > 0
  tokens = jnp.array([[5, 9, 77, 3, 41, 41, 8, 100]])
  ref = setup.model.apply({'params': peft.adapters_off(full)}, tokens)
  base_model = models.get_model(setup.config.model, setup.config.runtime, Kernels())
  base = base_model.apply({'params': state['frozen']}, tokens)
  np.testing.assert_array_equal(np.asarray(ref), np.asarray(base))
  # Base leaves that peft.train_also trains (not the value head) come from a starting copy.
  task = tasks.get_task(rl_config(method='lora', train_also='final_norm|classifier'))
  extra = task.init_extra(full)
  assert sorted(extra['reference_leaves']) == ['final_norm/bias', 'final_norm/scale']
  # The trainer's init hands boxed (logically partitioned) params: the copy keeps the boxes.
  boxed = jax.tree.map(lambda x: nn.LogicallyPartitioned(x, (None,) * x.ndim), full)
  got = task.init_extra(boxed)['reference_leaves']['final_norm/scale']
  assert isinstance(got, nn.LogicallyPartitioned)
  np.testing.assert_array_equal(got.value, full['final_norm']['scale'])
  moved = jax.tree.map(lambda x: x, full)
  moved['final_norm'] = {k: v + 1.0 for k, v in full['final_norm'].items()}
  np.testing.assert_array_equal(task.reference_params(moved, extra)['final_norm']['scale'],
                                full['final_norm']['scale'])


def test_rollout_logps_mask_ratio_and_update_sign(run):
  """On the run's weights (temperature 1): prepare's old log-probs summed over the mask equal
  the sampler's own (same tokens, positions, EOS included, padding out); the first update's
  ratio is 1 (no clipping); one gradient step with reward 1 on response 0 alone raises its
  log-prob and lowers its group mates'."""
  # pylint: disable=protected-access
  setup, task = run['setup'], run['setup'].task
  model, params = setup.model, trainer.full_params(run['state'])
  batch = jax.tree.map(jnp.asarray, next(iter(task.data_iter(run['tokenizer'], 'train'))))

  @jax.jit
  def check(params):
    ro = task.prepare(model, params, None, batch, jax.random.PRNGKey(7))
    ro = dict(ro, reward=jnp.zeros_like(ro['reward']).at[0].set(1.0))
    def loss(p):
      s, w, aux = task.loss(model, p, None, ro, None, True)
      return s / w, aux
    (_, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    after, _ = task._logp_entropy(model, stepped, ro, None, True)
    seq = lambda lp: jnp.sum(lp * ro['mask'], axis=1)
    return ro, aux, seq(ro['old_logp']), seq(after)

  ro, aux, before, after = check(params)
  np.testing.assert_allclose(before, ro['sampler_logp'], rtol=1e-4, atol=1e-4)
  eos, mask, length = task.tokenizer.eos_id, np.asarray(ro['mask']), np.asarray(ro['length'])
  np.testing.assert_array_equal(mask.sum(1), length)
  for i in np.flatnonzero(length < task.r):  # ended: EOS is the last token in the mask
    assert ro['response'][i, length[i] - 1] == eos and eos not in ro['response'][i, :length[i] - 1]
  assert float(aux['clip_fraction']) == 0.0  # params == the rollout's: ratio 1
  delta = np.asarray(after - before)
  assert delta[0] > 0 and np.all(delta[1:task.g] < delta[0]), delta[:task.g]


def test_reward_that_raises_names_the_prompt(run):
  task = run['setup'].task
  old = task.reward_fn
  task.reward_fn = lambda p, r, ref: 1 / 0
  try:
    with pytest.raises(rewards.RewardError, match=r"on the prompt '(add|reverse|sort|field)"):
      task._host_rewards('train')(np.array([0]), np.array([[65, 2]]), np.array([2]))
  finally:
    task.reward_fn = old


def test_long_prompts_are_skipped_and_counted(run):
  c = rl_config()
  c.task.max_prompt_len = 20
  tok = run['tokenizer']
  kept = rl.load_prompts(c, tok, True)
  assert 0 < len(kept) < 32 and all(len(p.ids) <= 20 for p in kept)
  c.task.max_prompt_len = 5
  with pytest.raises(ValueError, match='longer than task.max_prompt_len=5'):
    rl.load_prompts(c, tok, True)
  c = rl_config(name='grpo')
  c.task.max_new_tokens = 32
  with pytest.raises(ValueError, match='exceeds model.max_len=80'):
    tasks.get_task(c)


def test_grpo_loss_type():
  c = rl_config(name='grpo')
  assert tasks.get_task(c).loss_type == 'grpo'  # DPO's default 'sigmoid' -> GRPO's own
  c.task.loss_type = 'dr_grpo'
  assert tasks.get_task(c).loss_type == 'dr_grpo'
  c.task.loss_type = 'ipo'
  with pytest.raises(ValueError, match="task.loss_type must be 'grpo' or 'dr_grpo', not 'ipo'"):
    tasks.get_task(c)


def test_ppo_needs_a_value_head_and_its_loss_traces(run):
  with pytest.raises(ValueError, match='num_labels=1'):
    tasks.get_task(rl_config(name='ppo'))
  c = rl_config(name='ppo')
  c.model.num_labels = 1
  c.model.vocab_size = 260
  task = tasks.get_task(c)
  task.set_tokenizer(run['tokenizer'])
  model = models.get_model(c.model, c.runtime, Kernels())
  params = nn.unbox(models.param_shapes(model))
  batch = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in task.batch_spec().items()}
  extra = jax.eval_shape(task.init_extra, params)
  s, w, aux = jax.eval_shape(lambda p, e, b: task.loss(model, p, e, b, jax.random.PRNGKey(0),
                                                       True), params, extra, batch)
  assert s.shape == w.shape == () and set(aux) >= {'reward', 'kl', 'entropy', 'clip_fraction',
                                                   'value_loss', 'response_length'}


def test_reward_model_must_have_one_label(run):
  with pytest.raises(ValueError, match='is not a reward model'):
    rewards.get(f"rm:{run['workdir']}")
