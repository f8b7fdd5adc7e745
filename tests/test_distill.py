"""Task distill (lm/train/distill.py): the loss by hand, a run that loads its teacher,
resumes with it, and refuses a teacher of another tokenizer."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import base_config
from lm.train import distill, trainer

ONE = jax.devices()[:1]  # one device: cheaper compiles than the 8-way mesh


def config_for(data_dir, teacher, **task):
  c = base_config()
  c.model.update(vocab_size=0, max_len=32, d_model=32, n_layers=1, n_heads=2)
  c.data.update(dataset='default', tokenizer='bytes', data_dir=str(data_dir))
  c.mesh.update(data=1, fsdp=1, tensor=1)
  c.task.update(dict(dict(name='distill', teacher=str(teacher)), **task))
  c.train.update(batch_size=8, steps=4, log_every=2, eval_every=4, eval_steps=1, seed=1)
  c.optimizer.update(warmup_steps=1)
  c.checkpoint.update(every_steps=2, keep=3, async_save=False)
  return c


@pytest.fixture(scope='module')
def teacher(tmp_path_factory, data_dir):
  c = config_for(data_dir, '', name='causal_lm')
  c.model.update(n_layers=2, d_model=48)  # deeper and wider than the student
  c.train.update(steps=3, eval_every=0)
  workdir = tmp_path_factory.mktemp('teacher')
  trainer.train(c, workdir, log=lambda s: None, devices=ONE)
  return workdir


def test_loss_is_alpha_t2_kl_plus_ce_by_hand(data_dir, teacher):
  task = distill.Distill(config_for(data_dir, teacher, distill_alpha=0.25,
                                    distill_temperature=2.0))

  class Fixed:  # a "model" whose logits are given
    def __init__(self, logits):
      self.logits = logits

    def apply(self, variables, *args, **kwargs):
      return self.logits
  student = jnp.array([[[0.0, 1.0, 0.0]]])
  task.teacher = Fixed(jnp.array([[[2.0, 0.0, 0.0]]]))
  batch = dict(inputs=jnp.zeros((1, 1), jnp.int32), targets=jnp.array([[1]]),
               weights=jnp.ones((1, 1)))
  s, w, aux = task.loss(Fixed(student), None, {'teacher': None}, batch, None, True)
  p = np.exp([1.0, 0, 0]) / np.exp([1.0, 0, 0]).sum()  # teacher / T
  q = np.exp([0, 0.5, 0]) / np.exp([0, 0.5, 0]).sum()  # student / T
  kl = float((p * np.log(p / q)).sum())
  ce = float(-np.log(np.exp(1.0) / (2 + np.exp(1.0))))
  assert float(aux['kl']) == pytest.approx(kl, rel=1e-5)
  assert float(aux['ce']) == pytest.approx(ce, rel=1e-5)
  assert float(s / w) == pytest.approx(0.25 * 4 * kl + 0.75 * ce, rel=1e-5)


def test_distill_run_loads_the_teacher_and_resumes_with_it(data_dir, teacher, tmp_path):
  from lm.infer.load import load_run
  _, t_params, _, _ = load_run(teacher)
  out = trainer.train(config_for(data_dir, teacher), tmp_path / 'run', log=lambda s: None,
                      devices=ONE)
  got = out['state']['extra']['teacher']
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(t_params))
  lines = [json.loads(x) for x in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert any('train/kl' in x for x in lines) and any('eval/kl_to_teacher' in x for x in lines)
  # Resume: the checkpoint holds the teacher; two more steps continue from it.
  c = config_for(data_dir, teacher)
  c.train.steps = 6
  out = trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=ONE)
  assert out['step'] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(out['state']['extra']['teacher']),
               jax.device_get(t_params))


def test_teacher_with_another_tokenizer_is_refused(data_dir, teacher, tmp_path):
  c = config_for(data_dir, teacher)
  c.data.update(tokenizer='char')
  with pytest.raises(ValueError, match='another tokenizer'):
    trainer.train(c, tmp_path / 'run', log=lambda s: None, devices=ONE)
  with pytest.raises(ValueError, match='needs --config.task.teacher'):
    distill.Distill(config_for(data_dir, ''))


def test_sequence_level_data_is_the_teachers_greedy_output(teacher):
  from lm.infer import sampling
  from lm.infer.load import load_run
  texts = distill.teacher_texts(teacher, num=3, prompt_tokens=8, new_tokens=6, batch_size=2)
  assert len(texts) == 3
  model, params, _, tok = load_run(teacher)
  ids = tok.encode(texts[2])[:8]
  new = sampling.generate(model, params, [ids], max_new_tokens=6, temperature=0.0,
                          eos_id=tok.eos_id)[0]
  assert texts[2] == tok.decode(ids + [t for t in new if t != tok.eos_id])
