"""A tiny GPT-2-style model for tests and smoke runs (2 layers, 64 wide, bytes tokenizer).

  python scripts/train.py --config=configs/tiny_gpt2.py --workdir=/tmp/tiny --config.train.steps=50
    -> about 20 s on 2 CPU cores (24 s measured on 2 shared, busy AMD EPYC cores);
       train/loss falls from ~5.6 (ln 259) on the default corpus; eval/loss 4.38 at step 50.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(vocab_size=0, max_len=64, n_layers=2, d_model=64, n_heads=4))
  c.train.update(batch_size=8, steps=50, log_every=10, eval_every=25, eval_steps=2)
  c.checkpoint.update(every_steps=25)
  return c
