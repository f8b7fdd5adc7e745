"""A reward model from the fine-tuned quickstart model on the embedded preference set.

  python scripts/train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python scripts/train.py --config=configs/finetune_quick.py --workdir=runs/ft_full \
      --config.init_from=runs/quickstart
  python scripts/train.py --config=configs/reward_quick.py --workdir=runs/reward \
      --config.init_from=runs/ft_full

The decoder with a one-label classifier (model.num_labels=1) read on the last token (the
response's EOS), Bradley-Terry loss; eval/accuracy is the pairwise accuracy on the 200
held-out pairs (lm/data/preferences.py). Full fine-tuning from the SFT model (peft.method
'none'; the peft fields below apply only with --config.peft.method=lora).

The pairs are fresh, not epochs: task.finetune_examples=32000 draws 32000 training pairs from
the embedded generator (2000 steps x 16 = one pass); the 200 held-out pairs are the same
whatever finetune_examples is (finetune_sets.make takes them first and excludes their
prompts), so the number stays comparable. One of the 32000 is 65 tokens and skipped (reported).

Measured on 2 shared CPU cores (load 4-5 from other jobs), --config.init_from=/tmp/align/sft
(configs/finetune_quick.py's full SFT, 400 steps):
- this config (2000 steps, 32000 pairs, lr 3e-4 cosine to 3e-5): eval/accuracy 0.665, 0.725,
  0.840, 0.870 at steps 500, 1000, 1500, 2000; 7.5 min wall. Per kind at 2000: field 1.00,
  reverse 0.88, sort 0.86, add 0.74.
- before (300 steps, the 4000 pairs): 0.665, 0.670, 0.725 at 100, 200, 300 (~6.5 min wall
  under heavier load); per kind: field 1.00, sort 0.76, reverse 0.58, add 0.56. lr 1e-3 for
  400 steps: 0.670.
- 600 steps, 4000 pairs (2.4 epochs): 0.695, 0.695, 0.770, 0.775 at 150..600 (4.4 min);
  training accuracy ~0.9 by then: more epochs over 4000 pairs overfit.
- 1200 steps, 20000 pairs: 0.720, 0.750, 0.815, 0.835 at 300..1200 (4.3 min, lighter load).
- 3000 steps over the same 32000 pairs (1.5 passes, --config.train.steps=3000): 0.735,
  0.715, 0.820, 0.850, 0.865, 0.885 at steps 500..3000; 38 min wall beside the test suite
  and two other jobs (about 11 min alone, by step count). 48000 fresh pairs do not exist:
  the generator has too few distinct prompts (a clear error).
The issue's target (>= 0.90) is not met in ~8 CPU minutes: still rising at the end, so it is
compute-bound. A scalar read on the EOS token has to learn to verify a sum or a word order,
which the DPO policy's per-token log-probs see at step 0 (the SFT model's own log-probs rank
these pairs at 0.88: add 0.70, reverse 0.94, sort 0.96, field 0.98).
"""
from lm.config import base_config


def get_config():
  c = base_config()
  c.init_from = 'runs/ft_full'
  c.task.name = 'reward'
  c.model.num_labels = 1
  c.data.tokenizer = 'bytes'
  c.task.finetune_examples = 32000  # fresh pairs: one pass in 2000 steps (docstring)
  c.train.update(steps=2000, batch_size=16, seq_len=64, log_every=50, eval_every=500,
                 eval_steps=13)
  c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=20, b2=0.99, weight_decay=0.0)
  c.peft.update(rank=8, alpha=16.0,
                targets=r'(attn/(query|key|value|out)|mlp/(wi(_[01])?|wo))$')
  c.checkpoint.update(every_steps=2000, keep=1)
  return c
