"""DPO of the fine-tuned quickstart model on the embedded verifiable preference set.

  python scripts/train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python scripts/train.py --config=configs/finetune_quick.py --workdir=runs/ft_full \
      --config.init_from=runs/quickstart
  python scripts/train.py --config=configs/dpo_quick.py --workdir=runs/dpo \
      --config.init_from=runs/ft_full
  python scripts/exact_match.py --workdir=runs/dpo     # greedy answers, 200 held-out prompts

The pairs (lm/data/preferences.py): the fine-tuning set's prompts and split (the 200 eval
prompts never trained); chosen = the correct answer, rejected = a wrong one of the same
kind (another example's sum, words unsorted / unreversed or two swapped, another field).
task.loss_type sigmoid | ipo, task.label_smoothing > 0 (cDPO), task.reference step |
precomputed, task.rpo_alpha (an NLL term on chosen); --config.peft.method=lora makes the
reference the base with the adapters off (no second copy of the weights).

Measured on 2 shared CPU cores (other jobs running: 5 min 12 s wall), from the SFT model
of configs/finetune_quick.py (full; greedy exact match 0.385):
- this config (lr 2e-4, rpo_alpha 2.0, 400 steps): eval/reward_accuracy 0.50 at step 0 (by
  definition: policy = reference) -> 0.855 (step 200) -> 0.935 (step 400), eval/margin
  0.81; per kind add 0.78, field 1.00, reverse 0.98, sort 0.98. Greedy exact match 0.385 ->
  0.405 (scripts/exact_match.py; +4 of 200 prompts: the RPO term is continued SFT on the
  chosen answers, part of that gain).
- rpo_alpha 1.0, 250 steps: 0.89, exact match 0.365. Plain DPO (rpo_alpha 0, lr 1e-4, 200
  steps, with off-by-one/ten sums as the add negatives): 0.815, and exact match fell to
  0.06: DPO lowers the chosen answers' likelihood too (rewards/chosen < 0) and greedy
  decoding degrades; the NLL term prevents it.
- On-policy negatives (scripts/make_preferences.py --strong=reference --weak=SFT_RUN: the
  SFT's own wrong greedy answers, 2369 pairs), rpo_alpha 1.0, 250 steps: held-out (these
  synthetic pairs) 0.595, exact match 0.26.
The SFT model's own likelihood ranks 0.895 of the held-out pairs right (eval/ref_accuracy).
"""
from lm.config import base_config


def get_config():
  c = base_config()
  c.init_from = 'runs/ft_full'
  c.task.name = 'dpo'
  c.task.update(beta=0.1, label_smoothing=0.0, loss_type='sigmoid', reference='step',
                rpo_alpha=2.0)
  c.data.tokenizer = 'bytes'
  c.train.update(steps=400, batch_size=16, seq_len=64, log_every=25, eval_every=200,
                 eval_steps=13)
  c.optimizer.update(lr=2e-4, min_lr=2e-5, warmup_steps=20, b2=0.99, weight_decay=0.0)
  c.peft.update(rank=8, alpha=16.0,
                targets=r'(attn/(query|key|value|out)|mlp/(wi(_[01])?|wo))$')
  c.checkpoint.update(every_steps=400, keep=1)
  return c
