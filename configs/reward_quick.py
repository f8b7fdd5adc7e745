"""A reward model from the fine-tuned quickstart model on the embedded preference set.

  python scripts/train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python scripts/train.py --config=configs/finetune_quick.py --workdir=runs/ft_full \
      --config.init_from=runs/quickstart
  python scripts/train.py --config=configs/reward_quick.py --workdir=runs/reward \
      --config.init_from=runs/ft_full

The decoder with a one-label classifier (model.num_labels=1) read on the last token (the
response's EOS), Bradley-Terry loss, plus the chosen response's NLL per token from the same
pass (task.rpo_alpha=1: GRM's text-generation regulariser, Yang et al. 2024); eval/accuracy
is the pairwise accuracy on the 200 held-out pairs (lm/data/preferences.py). Full
fine-tuning from the SFT model (peft.method 'none'; the peft fields below apply only with
--config.peft.method=lora).

The pairs are fresh, not epochs: task.finetune_examples=32000 draws 32000 training pairs from
the embedded generator (2000 steps x 16 = one pass); the 200 held-out pairs are the same
whatever finetune_examples is (finetune_sets.make takes them first and excludes their
prompts), so the number stays comparable. One of the 32000 is 65 tokens and skipped (reported).

Expected (2 CPU cores; 7.5 min alone without the regulariser, whose LM head adds one
259-wide projection): eval/accuracy 0.77, 0.87, 0.91, 0.935 at steps
500, 1000, 1500, 2000; per kind at 2000: field 1.00, sort 0.94, add 0.92, reverse 0.88.
Measured with --config.init_from=/tmp/rl/sft (configs/finetune_quick.py's full SFT, 400
steps), 38 min wall beside four other jobs. Without the regulariser (rpo_alpha=0) the same
run reaches 0.665, 0.725, 0.840, 0.870 (add 0.74), and 3000 steps only 0.885: the scalar on
EOS has to check a sum or a word order, and the LM loss keeps the hidden states computing
the answer (the SFT model's own log-probs rank these pairs 0.88 at step 0). Other tries
without it: 300 steps on 4000 pairs 0.725; lr 1e-3 0.670 at 400 steps; 600 steps over 4000
pairs 0.775 (overfits: training accuracy ~0.9); 1200 steps on 20000 pairs 0.835.
"""
from lm.config import base_config


def get_config():
  c = base_config()
  c.init_from = 'runs/ft_full'
  c.task.name = 'reward'
  c.model.num_labels = 1
  c.task.rpo_alpha = 1.0  # + the chosen response's NLL per token (GRM; docstring)
  c.data.tokenizer = 'bytes'
  c.task.finetune_examples = 32000  # fresh pairs: one pass in 2000 steps (docstring)
  c.train.update(steps=2000, batch_size=16, seq_len=64, log_every=50, eval_every=500,
                 eval_steps=13)
  c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=20, b2=0.99, weight_decay=0.0)
  c.peft.update(rank=8, alpha=16.0,
                targets=r'(attn/(query|key|value|out)|mlp/(wi(_[01])?|wo))$')
  c.checkpoint.update(every_steps=2000, keep=1)
  return c
