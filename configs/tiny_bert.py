"""A tiny BERT-style encoder for tests and smoke runs (2 layers, 64 wide, bytes tokenizer).

  python scripts/model_summary.py --config=configs/tiny_bert.py
    -> total_params=129668 (vocab 260: the bytes tokenizer plus [MASK]; MLM head, pooler),
       ~3 s on 2 CPU cores.
  python scripts/train.py --config=configs/tiny_bert.py --workdir=/tmp/tiny_bert
    -> masked-LM pre-training on the default corpus (lm/train/tasks.py: masked_lm),
       50 steps in ~60 s on 2 busy, shared CPU cores; eval loss 5.22 at step 25 and 4.56
       at step 50 (ln 260 = 5.56). A longer run is the quick BERT config's.
"""
from lm.config import base_config


def get_config():
  c = base_config('encoder')
  c.model.update(vocab_size=0, max_len=64, max_positions=64, d_model=64, n_layers=2,
                 n_heads=4, d_ff=0, norm_eps=1e-12, pooler=True, mlm_head=True)
  c.task.name = 'masked_lm'
  c.data.user_symbols = ('[MASK]',)  # the bytes tokenizer's mask symbol (id 259)
  c.train.update(batch_size=8, steps=50, log_every=10, eval_every=25, eval_steps=2)
  c.checkpoint.update(every_steps=25)
  return c
