"""Quickstart: a small GPT trained on the embedded default corpus, then a sample.

  pip install -e . && python scripts/train.py --config=configs/quickstart.py --workdir=runs/quickstart

The corpus is the Python standard library of the running interpreter (no download);
bytes tokenizer. 4 layers x 128 wide, context 128, batch 16, 600 steps.
Expected on 2 CPU cores (AVX-512 Xeon): 52 s wall in all (1 min 28 s with the install in
a fresh venv; the first run also builds the corpus, ~4 MB), peak RSS 0.87 GB; eval loss
2.32, 2.01, 1.87 nats/byte at steps 200, 400, 600; then 300 bytes of Python-looking text.
Dated runs, other machines: docs/performance.md.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(vocab_size=0, max_len=128, n_layers=4, n_heads=4, d_model=128))
  c.data.update(dataset='default', tokenizer='bytes')
  c.train.update(steps=600, batch_size=16, log_every=25, eval_every=200, eval_steps=10,
                 sample_prompt='def ', sample_tokens=300)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.1)
  c.checkpoint.update(every_steps=200, keep=2)
  return c
