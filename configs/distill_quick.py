"""Distillation: a 2-layer student from a 6-layer teacher on the embedded default corpus.

  python scripts/train.py --config=configs/quickstart.py --workdir=runs/teacher6 \
      --config.model.n_layers=6 --config.train.steps=1200
  python scripts/train.py --config=configs/distill_quick.py --workdir=runs/student \
      --config.task.teacher=runs/teacher6
  python scripts/train.py --config=configs/distill_quick.py --workdir=runs/scratch \
      --config.task.name=causal_lm      # the same student, same steps and data, no teacher

The student is the quickstart model with 2 layers (bytes tokenizer, context 128, batch 16,
600 steps); loss 0.5 * T^2 * KL(teacher_T || student_T) + 0.5 * CE with T = 2
(lm/train/distill.py). Measured on 2 shared CPU cores: eval loss 1.7715 at step 600 for the
distilled student (166 s) against 1.8540 from scratch (80 s); the teacher 1.5245 at 1200.
Details: docs/compression.md.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(vocab_size=0, max_len=128, n_layers=2, n_heads=4, d_model=128))
  c.data.update(dataset='default', tokenizer='bytes')
  c.task.update(name='distill', teacher='runs/teacher6', distill_alpha=0.5,
                distill_temperature=2.0)
  c.train.update(steps=600, batch_size=16, log_every=25, eval_every=200, eval_steps=10)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.1)
  c.checkpoint.update(every_steps=200, keep=2)
  return c
