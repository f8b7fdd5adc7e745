"""Gradual magnitude pruning while fine-tuning the quickstart model on its own corpus.

  python scripts/train.py --config=configs/quickstart.py --workdir=runs/quickstart
  python scripts/train.py --config=configs/prune_quick.py --workdir=runs/pruned50 \
      --config.init_from=runs/quickstart
  python scripts/train.py --config=configs/prune_quick.py --workdir=runs/pruned24 \
      --config.init_from=runs/quickstart --config.prune.pattern=2:4
  python scripts/train.py --config=configs/prune_quick.py --workdir=runs/dense300 \
      --config.init_from=runs/quickstart --config.prune.method=none   # the dense control

300 steps (batch 16 x 128 bytes) at lr 5e-4; the sparsity of the attention and MLP kernels
rises on Zhu & Gupta's cubic schedule from step 0 to 50% at step 225 (masks every 10 steps),
then the pruned model fine-tunes for 75 more. Measured on 2 shared CPU cores (278 s):
corpus perplexity 5.812 against 5.729 for the dense control (150 s), 2:4 5.958; the
quickstart model before: 6.421. Details: docs/compression.md.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.init_from = 'runs/quickstart'
  c.model.update(gpt2_model(vocab_size=0, max_len=128, n_layers=4, n_heads=4, d_model=128))
  c.data.update(dataset='default', tokenizer='bytes')
  c.train.update(steps=300, batch_size=16, log_every=25, eval_every=150, eval_steps=10)
  c.optimizer.update(lr=5e-4, min_lr=5e-5, warmup_steps=10, b2=0.99, weight_decay=0.1)
  c.prune.update(method='magnitude', sparsity=0.5, pattern='unstructured', scope='global',
                 schedule='gradual', begin_step=0, end_step=225, update_every=10)
  c.checkpoint.update(every_steps=300, keep=1)
  return c
