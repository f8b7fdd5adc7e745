"""A tiny T5-style encoder-decoder for tests and smoke runs (2+2 layers, 64 wide, 4 heads,
ReLU MLP 128, tied head, bytes tokenizer).

  python scripts/model_summary.py --config=configs/tiny_t5.py
    -> total_params=189440, ~4 s on 2 CPU cores. Vocabulary 384: the bytes tokenizer's
       259 ids, then room for span corruption's sentinels (counting down from 383; T5
       leaves 100), padded to a multiple of 128 as T5's 32128.
  python scripts/train.py --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5
    -> span-corruption pre-training on the default corpus (lm/train/tasks.py:
       span_corruption); the runtime and loss of a real run are in the quick T5 config's
       docstring.
"""
from lm.config import base_config, t5_model


def get_config():
  c = base_config('encdec')
  c.model.update(t5_model(vocab_size=384, max_len=64, max_target_len=16, d_model=64,
                          n_layers=2, n_decoder_layers=2, n_heads=4, head_dim=16, d_ff=128,
                          relative_buckets=32, relative_max_distance=128))
  c.task.name = 'span_corruption'
  c.train.update(batch_size=8, steps=50, log_every=10, eval_every=25, eval_steps=2)
  c.checkpoint.update(every_steps=25)
  return c
