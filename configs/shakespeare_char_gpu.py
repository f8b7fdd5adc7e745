"""nanoGPT's shakespeare_char GPU configuration (train_shakespeare_char.py).

  python scripts/train.py --config=configs/shakespeare_char_gpu.py --workdir=/tmp/sgpu \
      --config.data.path=data/tinyshakespeare.txt

The corpus: tiny Shakespeare, char-rnn's data/tinyshakespeare/input.txt (1,115,394 bytes,
public), saved locally as data/tinyshakespeare.txt (the default path) or passed with
--config.data.path.

6 layers, 6 heads, 384 wide, block 256, batch 64, dropout 0.2, no biases (nanoGPT's
default), AdamW lr 1e-3 (100 warmup, cosine to 1e-4 at 5000), beta2 0.99, weight decay 0.1,
clip 1.0, 5000 iterations. nanoGPT's README: best val loss 1.4697 on one A100 in about 3
minutes. Our full 5000-step run: not run yet (no measured runtime or loss).
On CPU this is the speed benchmark (batch 16):
  python scripts/benchmark.py --config=configs/shakespeare_char_gpu.py \
      --config.train.batch_size=16 --steps=10
measured on 2 CPU cores (AVX-512 Xeon, interleaved with nanoGPT): ~50 s, 2,930-3,770
tokens/s, MFU 0.690-0.806 (nanoGPT in PyTorch eager, scripts/benchmark_nanogpt.py with the
same flags: 1,800-2,490 tokens/s; ours 1.48-1.55x run for run). Dated runs:
docs/performance.md.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(vocab_size=0, max_len=256, n_layers=6, n_heads=6, d_model=384,
                            use_bias=False))  # nanoGPT's default bias=False
  c.runtime.update(embed_dropout=0.2, attn_dropout=0.2, resid_dropout=0.2,
                   cpu_matmuls='ynn')  # on CPU: see lm/ops/backend.compiler_options
  c.data.update(dataset='text_files', path='data/tinyshakespeare.txt',
                tokenizer='char', val_fraction=0.1)
  c.train.update(steps=5000, batch_size=64, log_every=50, eval_every=250, eval_steps=200,
                 seed=1337)
  c.optimizer.update(name='adamw', lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=5000,
                     schedule='cosine', b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  c.checkpoint.update(every_steps=1000, keep=2)
  return c
