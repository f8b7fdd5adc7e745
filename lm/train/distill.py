"""Task distill: a decoder student learns from a frozen decoder teacher (Hinton et al.).

    python scripts/train.py --config=configs/distill_quick.py --workdir=runs/student \
        --config.task.teacher=runs/teacher

loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE,
per target token (the T^2 keeps the soft term's gradients on the scale of the hard one's),
on the packed rows of causal_lm. The teacher (task.teacher: any lm run of the decoder
family, any depth and width, the same tokenizer) is read once at the start of a run into the
train state's extra state (`extra['teacher']`, sharded like params), so a resumed run has it
from its checkpoint. Eval: the student's own loss and perplexity (comparable with a run
trained from scratch), plus the KL to the teacher.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from lm import models
from lm.train import tasks


class Distill(tasks.CausalLM):
  name = 'distill'

  def __init__(self, config):
    super().__init__(config)
    from lm.train import checkpoint
    t = config.task
    if not t.teacher:
      raise ValueError('task distill needs --config.task.teacher=RUN_DIR (a trained decoder '
                       'run with the same tokenizer).')
    if not 0.0 <= t.distill_alpha <= 1.0 or t.distill_temperature <= 0:
      raise ValueError('task.distill_alpha must lie in [0, 1] and task.distill_temperature '
                       'be positive.')
    self.teacher_config = checkpoint.read_config(t.teacher)
    if self.teacher_config.model.family != 'decoder':
      raise ValueError(f'task.teacher={t.teacher} is a {self.teacher_config.model.family}; '
                       'distill needs a decoder teacher.')
    self.teacher_tokenizer = checkpoint.read_tokenizer(t.teacher)
    self.teacher = models.get_model(self.teacher_config.model, config.runtime)

  def data_iter(self, tokenizer, split, num_batches=None):
    if tokenizer.fingerprint() != self.teacher_tokenizer.fingerprint():
      raise ValueError(f'The teacher ({self.config.task.teacher}) has another tokenizer '
                       f'({self.teacher_tokenizer!r}) than this run ({tokenizer!r}); '
                       'distillation compares their distributions token by token, so they '
                       'must share one.')
    return super().data_iter(tokenizer, split, num_batches)

  def init_extra(self, params):
    del params  # the teacher is not the student: shapes (and logical axes) of its own
    example = models.example_inputs(self.teacher, 1, 8)
    return {'teacher': self.teacher.init(jax.random.PRNGKey(0), *example)['params']}

  def load_extra(self, mesh):
    from lm.train import trainer  # lazy: the trainer imports the tasks
    return {'teacher': trainer.restore_run_params(self.config.task.teacher, self.teacher_config,
                                                  self.config.runtime, mesh)}

  def _terms(self, model, params, extra, batch, rng, deterministic):
    """(cross entropy, KL(teacher_T || student_T)), both [B, T]."""
    logits_BTV = tasks._forward(model, params, batch, rng, deterministic).astype(jnp.float32)
    teacher_BTV = jax.lax.stop_gradient(tasks._forward(
        self.teacher, extra['teacher'], batch, None, True).astype(jnp.float32))
    if teacher_BTV.shape[-1] != logits_BTV.shape[-1]:
      raise ValueError(f'The teacher has {teacher_BTV.shape[-1]} logits, the student '
                       f'{logits_BTV.shape[-1]}: they need one vocabulary.')
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
    temp = self.config.task.distill_temperature
    log_p_BTV = jax.nn.log_softmax(teacher_BTV / temp)
    kl_BT = jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - jax.nn.log_softmax(logits_BTV / temp)),
                    axis=-1)
    return ce_BT, kl_BT

  def loss(self, model, params, extra, batch, rng, deterministic):
    ce_BT, kl_BT = self._terms(model, params, extra, batch, rng, deterministic)
    alpha, temp = self.config.task.distill_alpha, self.config.task.distill_temperature
    w_BT = batch['weights'].astype(jnp.float32)
    loss_BT = alpha * temp ** 2 * kl_BT + (1 - alpha) * ce_BT
    return (jnp.sum(loss_BT * w_BT), jnp.sum(w_BT),
            {'kl': jnp.sum(kl_BT * w_BT), 'ce': jnp.sum(ce_BT * w_BT)})

  def eval_stats(self, model, params, extra, batch):
    ce_BT, kl_BT = self._terms(model, params, extra, batch, None, True)
    w_BT = batch['weights'].astype(jnp.float32)
    return {'loss_sum': jnp.sum(ce_BT * w_BT), 'kl_sum': jnp.sum(kl_BT * w_BT),
            'weight': jnp.sum(w_BT)}

  def eval_metrics(self, stats):
    w = max(stats['weight'], 1.0)
    loss = stats['loss_sum'] / w
    return {'eval/loss': loss, 'eval/perplexity': math.exp(min(loss, 50.0)),
            'eval/kl_to_teacher': stats['kl_sum'] / w}


tasks.register(Distill)


def teacher_texts(teacher, num: int, prompt_tokens: int = 32, new_tokens: int = 96,
                  batch_size: int = 64, split: str = 'train') -> list[str]:
  """Sequence-level distillation's data (Kim & Rush): the teacher's greedy continuations
  of the first `prompt_tokens` tokens of `num` documents of its own training data, as
  texts (prompt + continuation) for a student's causal_lm run on text_files."""
  from lm.data import sources
  from lm.infer import sampling
  from lm.infer.load import load_run
  model, params, config, tokenizer = load_run(teacher)
  prompts = []
  for text in sources.iter_texts(config, split):
    ids = sampling.encode_prompt(tokenizer, text[:8 * prompt_tokens])[:prompt_tokens]
    if len(ids) == prompt_tokens:
      prompts.append(ids)
    if len(prompts) == num:
      break
  if not prompts:
    raise ValueError(f'No document of {teacher}\'s {split} split has {prompt_tokens} tokens.')
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = prompts[start:start + batch_size]
    chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))  # one compiled shape
    new = sampling.generate(model, params, chunk, max_new_tokens=new_tokens, temperature=0.0,
                            eos_id=tokenizer.eos_id)
    for ids, cont in list(zip(chunk, new))[:len(prompts) - start]:
      if cont and cont[-1] == tokenizer.eos_id:
        cont = cont[:-1]
      out.append(tokenizer.decode(ids + cont))
  return out
