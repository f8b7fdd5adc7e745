"""Alignment (lm/train/align.py, lm/data/preferences.py): the DPO / cDPO / IPO losses and
reward metrics equal TRL's formulas worked by hand; the Bradley-Terry reward loss; the mask
on response tokens only, token by token; the LoRA reference (lora_b zero) is the base; the
precomputed reference equals the in-step one; bad pairs name file and line, long ones are a
counted skip; one tiny DPO trainer run starts at log 2 and reports TRL's metrics."""
import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import models, peft
from lm.config import base_config
from lm.data import finetune_sets, preferences
from lm.data.tokenizers import ByteTokenizer
from lm.ops.backend import Kernels
from lm.train import align, flops, tasks, trainer
from lm.train import metrics as metrics_lib

TOK = ByteTokenizer()
EOS = TOK.eos_id
# policy (chosen, rejected), reference (chosen, rejected) log-prob sums of two pairs
POLICY = [[-2.0, -5.0], [-4.0, -3.0]]
REF = [[-3.0, -4.0], [-3.5, -3.5]]


@pytest.fixture(scope='module', autouse=True)
def _rbg_prng():
  old = jax.config.jax_default_prng_impl
  jax.config.update('jax_default_prng_impl', 'rbg')  # faster init compiles (test_peft)
  yield
  jax.config.update('jax_default_prng_impl', old)


def init(model, seed):
  """Random params of the model's shapes, drawn in numpy (no init compile: seconds each)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype),
                      nn.unbox(models.param_shapes(model)))


def config(**task):
  c = base_config('decoder')
  c.task.name = 'dpo'
  with c.unlocked():  # dpo's fields until lm/config.py has them (config.task.get meanwhile)
    c.task.update(finetune_examples=48, finetune_eval=8, **task)
  c.model.update(vocab_size=260, max_len=64, d_model=32, n_layers=1, n_heads=2)
  c.data.update(tokenizer='bytes')
  c.train.update(batch_size=4, seed=0)
  return c


def write_jsonl(path, records):
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in records))
  return str(path)


# -- losses worked by hand ------------------------------------------------------------

def logsig(x):
  return -math.log1p(math.exp(-x))


@pytest.mark.parametrize('loss_type,ls', [('sigmoid', 0.0), ('sigmoid', 0.2), ('ipo', 0.0)])
def test_dpo_losses_and_rewards_are_trls(loss_type, ls):
  beta = 0.5
  losses, chosen, rejected = align.dpo_loss(jnp.array(POLICY), jnp.array(REF), beta, ls,
                                            loss_type)
  # pair 0: logits = (-2 + 5) - (-3 + 4) = 2; pair 1: (-4 + 3) - 0 = -1
  want = {('sigmoid', 0.0): [-logsig(1.0), -logsig(-0.5)],  # -log sigmoid(beta * logits)
          ('sigmoid', 0.2): [-0.8 * logsig(1.0) - 0.2 * logsig(-1.0),
                             -0.8 * logsig(-0.5) - 0.2 * logsig(0.5)],
          ('ipo', 0.0): [(2 - 1) ** 2, (-1 - 1) ** 2]}[(loss_type, ls)]  # 1/(2 beta) = 1
  np.testing.assert_allclose(losses, want, rtol=1e-6)
  np.testing.assert_allclose(chosen, [0.5 * 1.0, 0.5 * -0.5], rtol=1e-6)  # beta (pi - ref)
  np.testing.assert_allclose(rejected, [0.5 * -1.0, 0.5 * 0.5], rtol=1e-6)


class FixedLogps:
  """sequence_logps stand-in: POLICY for the policy params, REF for the reference's."""

  def __call__(self, model, params, batch, rng=None, deterministic=True):
    del model, batch, rng, deterministic
    counts = jnp.array([[2.0, 4.0], [1.0, 2.0]])  # response tokens per side
    return jnp.array(REF if params == 'ref' else POLICY), counts


@pytest.mark.parametrize('loss_type,rpo', [('sigmoid', 0.0), ('ipo', 0.0), ('sigmoid', 2.0)])
def test_dpo_task_metrics_are_trls(monkeypatch, loss_type, rpo):
  monkeypatch.setattr(align, 'sequence_logps', FixedLogps())
  task = tasks.get_task(config(beta=0.5, loss_type=loss_type, rpo_alpha=rpo))
  s, w, aux = task.loss(None, 'policy', {'reference': 'ref'}, {}, None, True)
  assert float(w) == 2
  if loss_type == 'sigmoid':
    pol, ref = np.array(POLICY), np.array(REF)
    want_loss = -logsig(1.0) - logsig(-0.5)
  else:  # TRL's IPO: log-probs averaged per response token (policy and reference)
    counts = np.array([[2.0, 4.0], [1.0, 2.0]])
    pol, ref = np.array(POLICY) / counts, np.array(REF) / counts
    logits = (pol[:, 0] - pol[:, 1]) - (ref[:, 0] - ref[:, 1])  # 0.75, -2.5
    want_loss = float(np.sum((logits - 1.0) ** 2))
  # RPO: + alpha * the chosen NLL per token: 2 * (2 / 2) + 2 * (4 / 1)
  want_loss += rpo * (2.0 / 2 + 4.0 / 1)
  rc, rr = 0.5 * (pol[:, 0] - ref[:, 0]), 0.5 * (pol[:, 1] - ref[:, 1])
  assert float(s) == pytest.approx(want_loss, rel=1e-6)
  assert float(aux['rewards/chosen']) == pytest.approx(rc.sum(), rel=1e-6)
  assert float(aux['rewards/rejected']) == pytest.approx(rr.sum(), rel=1e-6)
  assert float(aux['rewards/accuracies']) == float(np.sum(rc > rr)) == 1.0
  assert float(aux['rewards/margins']) == pytest.approx(np.sum(rc - rr), rel=1e-6)
  stats = jax.tree.map(float, task.eval_stats(None, 'policy', {'reference': 'ref'}, {}))
  m = task.eval_metrics(stats)
  assert m['eval/reward_accuracy'] == 0.5 and m['eval/loss'] == pytest.approx(want_loss / 2)
  assert m['eval/ref_accuracy'] == 0.5  # the reference ranks pair 0 right, pair 1 not


def test_reward_loss_is_bradley_terry(tiny):
  c = config()
  c.task.name = 'reward'
  c.model.num_labels = 1
  model = models.get_model(c.model, c.runtime)
  shapes = nn.unbox(models.param_shapes(model))['classifier']  # the base's params + a head
  head = jax.tree.map(lambda s: 3.0 * np.random.default_rng(3).normal(size=s.shape), shapes)
  params = dict(tiny['params'], classifier=jax.tree.map(jnp.float32, head))
  task = tasks.get_task(c)
  batch = tiny['examples'].batch(np.arange(4))
  r, (s, w, aux) = jax.jit(lambda p, b: (task.rewards(model, p, b)[0],
                                          task.loss(model, p, {}, b, None, True)))(params, batch)
  r = np.asarray(r)
  margin = r[:, 0] - r[:, 1]
  assert float(w) == 4 and len(set(np.sign(margin))) == 2, margin  # some right, some wrong
  assert float(s) == pytest.approx(sum(-logsig(float(m)) for m in margin), rel=1e-5)
  assert float(aux['accuracy']) == np.sum(margin > 0)
  # rpo_alpha: + alpha * the chosen response's NLL per token (GRM), from a plain LM pass.
  c.task.rpo_alpha = 0.5
  s2 = jax.jit(lambda p, b: tasks.get_task(c).loss(model, p, {}, b, None, True)[0])(params,
                                                                                   batch)
  logits = model.apply({'params': params}, batch['inputs'][:, 0],
                       positions_BT=batch['positions'][:, 0],
                       segment_ids_BT=batch['segment_ids'][:, 0])
  lp = np.asarray(jax.nn.log_softmax(logits))
  t, wt = batch['targets'][:, 0], batch['weights'][:, 0]
  nll = [-np.sum(np.take_along_axis(lp[i], t[i][:, None], -1)[:, 0] * wt[i]) / wt[i].sum()
         for i in range(4)]
  assert float(s2) == pytest.approx(float(s) + 0.5 * sum(nll), rel=1e-5)
  with pytest.raises(ValueError, match='num_labels=1'):
    tasks.get_task(config(name='reward'))


# -- data -----------------------------------------------------------------------------

def masked(batch, row, side):
  t, w = batch['targets'][row, side], batch['weights'][row, side]
  return [int(x) for x, on in zip(t, w) if on]


def test_mask_is_the_response_only_token_by_token(tmp_path):
  chat = [dict(role='user', content='hi'), dict(role='assistant', content='yo!'),
          dict(role='user', content='2+2?')]
  path = write_jsonl(tmp_path / 'p.jsonl', [
      dict(prompt='add: 1 + 2\n', chosen='3', rejected='4'),
      dict(messages=chat, chosen='4', rejected='five'),
      dict(messages=chat, chosen=[dict(role='assistant', content='4')],
           rejected=[dict(role='assistant', content='22')])])
  pairs = preferences.read_pairs(path)
  ex = preferences.encode(pairs, TOK, None, 64)
  b = ex.batch(np.arange(3))
  assert masked(b, 0, 0) == TOK.encode('3') + [EOS]
  assert masked(b, 0, 1) == TOK.encode('4') + [EOS]
  for row in (1, 2):  # the context's own assistant turn 'yo!' is never trained
    assert masked(b, row, 0) == TOK.encode('4') + [EOS]
  assert masked(b, 1, 1) == TOK.encode('five') + [EOS]
  assert masked(b, 2, 1) == TOK.encode('22') + [EOS]
  # Rows: the default chat template's text, targets the next token, weights exactly on the
  # positions whose target is a response token.
  text = 'User: hi\nAssistant: yo!'
  want = TOK.encode(text) + [EOS] + TOK.encode('User: 2+2?\nAssistant: five') + [EOS]
  n = len(want)
  assert b['inputs'][1, 1, :n].tolist() == want and b['segment_ids'][1, 1, n:].sum() == 0
  assert b['targets'][1, 1, :n - 1].tolist() == want[1:]
  on = np.nonzero(b['weights'][1, 1])[0].tolist()
  assert on == list(range(n - 6, n - 1))  # predicting f, i, v, e, EOS
  assert b['positions'][1, 1, :n].tolist() == list(range(n))
  # A padding pair (eval's last batch) has no weight at all.
  assert ex.batch(np.array([0, 5]))['weights'][1].sum() == 0


def test_bad_pairs_name_file_and_line_and_long_pairs_are_counted(tmp_path):
  good = dict(prompt='q\n', chosen='a', rejected='b')
  cases = [(dict(prompt='q\n', chosen='a', rejected='a'), 'equals'),
           (dict(prompt='q\n', chosen='  ', rejected='b'), 'empty'),
           (dict(prompt='q\n', chosen='a'), 'not a preference pair'),
           (dict(messages=[dict(role='bot', content='x')], chosen='a', rejected='b'),
            'unknown role')]
  for record, why in cases:
    path = write_jsonl(tmp_path / 'bad.jsonl', [good, record])
    with pytest.raises(ValueError, match=f'bad.jsonl:2.*{why}|{why}.*bad.jsonl:2'):
      preferences.read_pairs(path)
  long = dict(prompt='x' * 80 + '\n', chosen='a', rejected='b')
  pairs = preferences.read_pairs(write_jsonl(tmp_path / 'p.jsonl', [good, long, good]))
  said = []
  ex = preferences.encode(pairs, TOK, None, 32, log=said.append)
  assert len(ex) == 2 and ex.skipped == 1 and 'Skipped 1 of 3' in said[0]
  with pytest.raises(ValueError, match='Every one of the 1'):
    preferences.encode(pairs[1:2], TOK, None, 32)


def test_embedded_pairs_are_the_sft_split_with_wrong_answers():
  train, ev = preferences.embedded_pairs(40, 12)
  ft_train, ft_eval = finetune_sets.make(40, 12)
  assert [p['prompt'] for p in ev] == [e['prompt'] for e in ft_eval]
  assert [p['chosen'] for p in train] == [e['completion'] for e in ft_train]
  assert all(p['rejected'] != p['chosen'] and p['rejected'] for p in train + ev)
  assert preferences.embedded_pairs(40, 12) == (train, ev)  # deterministic
  add = [p for p in train if p['prompt'].startswith('add')]
  assert {p['rejected'] for p in add} <= {p['chosen'] for p in add}  # another example's sum


# -- the reference ----------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  c = config()
  model = models.get_model(c.model, c.runtime)
  params = init(model, 0)
  examples = preferences.load_examples(c, TOK, False)
  return dict(c=c, model=model, params=params, examples=examples)


def test_lora_reference_is_the_base_exactly(tiny):
  c = config()
  c.peft.update(method='lora', rank=4, targets=r'attn/(query|value)$')
  adapters = peft.from_config(c.peft)
  lora_model = models.get_model(c.model, c.runtime, Kernels(adapters=adapters))
  lora = init(lora_model, 1)
  lora = peft.combine(peft.partition(lora)[0], tiny['params'])  # adapters over the base
  lora = jax.tree_util.tree_map_with_path(  # lora_b away from zero: the policy moved
      lambda p, x: x + 0.5 if 'lora_b' in jax.tree_util.keystr(p) else x, lora)
  batch = tiny['examples'].batch(np.arange(4))
  logps = jax.jit(functools.partial(align.sequence_logps, lora_model))
  base = np.asarray(jax.jit(functools.partial(align.sequence_logps, tiny['model']))(
      tiny['params'], batch)[0])
  ref = np.asarray(logps(peft.adapters_off(lora), batch)[0])
  np.testing.assert_allclose(ref, base, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(logps(lora, batch)[0]) - base).max() > 1e-3  # the policy differs
  task = tasks.get_task(c)
  assert task.init_extra(lora) == {}  # no second copy of the weights


def test_precomputed_reference_equals_the_step_reference(tiny):
  model, params = tiny['model'], tiny['params']
  step = tasks.get_task(config())
  c2 = config(reference='precomputed')
  c2.init_from = 'unused: the reference is given'
  pre = tasks.get_task(c2)
  # pylint: disable-next=protected-access  (the eval split alone: no train pairs to load)
  pre._examples[False] = preferences.load_examples(c2, TOK, False)
  pre.attach_reference(TOK, model, params)
  batch = next(iter(pre.data_iter(TOK, 'eval', 1)))
  assert 'ref_logps' in pre.batch_spec() and batch['ref_logps'].shape == (4, 2)
  moved = jax.tree.map(lambda x: x * 1.1, params)  # the policy differs from the reference
  extra = step.init_extra(params)
  a = jax.jit(lambda p, e, b: step.loss(model, p, e, b, None, True))(
      moved, extra, {k: v for k, v in batch.items() if k != 'ref_logps'})
  b = jax.jit(lambda p, b: pre.loss(model, p, {}, b, None, True))(moved, batch)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_allclose(a[2]['rewards/margins'], b[2]['rewards/margins'], rtol=1e-4,
                             atol=1e-6)
  assert float(a[0]) != pytest.approx(4 * math.log(2))  # it compared different models


# -- one tiny trainer run ---------------------------------------------------------------

def test_dpo_trains_from_log_two_with_trls_metrics(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_lib, 'plot_losses', lambda workdir: None)
  monkeypatch.setattr(flops, 'mesh_peak_flops_per_sec', lambda mesh: (1e12, 'test'))
  c = config()  # beta 0.1 (the default: the run's config schema has no dpo fields yet)
  c.model.vocab_size = 0
  c.train.update(steps=4, log_every=1, eval_every=4, eval_steps=0)
  c.optimizer.update(lr=3e-3, warmup_steps=1, decay_steps=4)
  c.checkpoint.update(every_steps=1000, keep=1, async_save=False)
  trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=jax.devices()[:1])
  records = metrics_lib.read_metrics(tmp_path / 'run')
  train = [r for r in records if 'train/loss' in r]
  ev = [r for r in records if 'eval/loss' in r][-1]
  # Step 1's loss is of the initial params, which are the reference: log 2 exactly.
  assert train[0]['train/loss'] == pytest.approx(math.log(2), abs=1e-5)
  assert train[0]['train/rewards/margins'] == pytest.approx(0.0, abs=1e-5)
  assert train[-1]['train/loss'] < train[0]['train/loss']
  for k in ('rewards/chosen', 'rewards/rejected', 'rewards/accuracies', 'rewards/margins'):
    assert all(math.isfinite(r[f'train/{k}']) for r in train)
  assert set(ev) >= {'eval/loss', 'eval/reward_accuracy', 'eval/margin'}
  assert all(math.isfinite(v) for k, v in ev.items() if k.startswith('eval/'))
