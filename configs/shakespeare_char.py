"""nanoGPT's shakespeare_char CPU configuration, reproduced.

  python scripts/train.py --config=configs/shakespeare_char.py --workdir=/tmp/shakespeare \
      --config.data.path=data/tinyshakespeare.txt

The corpus: tiny Shakespeare, char-rnn's data/tinyshakespeare/input.txt (1,115,394 bytes,
public), saved locally as data/tinyshakespeare.txt (the default path) or passed with
--config.data.path.

4 layers, 4 heads, 128 wide, block 64, batch 12, character tokenizer (65 symbols),
AdamW lr 1e-3 (100 warmup steps, cosine to 1e-4 at 2000), beta2 0.99, weight decay 0.1,
clip 1.0, no dropout, 2000 iterations, eval every 250 on 20 batches; nanoGPT's split
(first 90% train, last 10% validation).
Expected: eval loss <= 1.89 at step 2000 (nanoGPT measured on an earlier machine: 1.8857;
its README: 1.88). Measured on 2 CPU cores (AVX-512 Xeon): 44-55 s wall in all, peak RSS
0.69-0.79 GB, and this curve (the same to 4 decimals with the xla attention, optax's AdamW
ops or XLA's own matmuls in place of the C++ kernels):
  step   250    500    750    1000   1250   1500   1750   2000
  eval  2.438  2.291  2.153  2.055  1.980  1.932  1.901  1.8825
Dated runs, other machines, speed against nanoGPT: docs/performance.md.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  # GPT-2's biases, unlike nanoGPT's default (bias=False): without them this run measured
  # 1.8961 at step 2000 (all 1,742 validation windows: 1.919 against 1.909 with them).
  c.model.update(gpt2_model(vocab_size=0, max_len=64, n_layers=4, n_heads=4, d_model=128))
  c.runtime.update(cpu_matmuls='ynn')  # on CPU: see lm/ops/backend.compiler_options
  c.data.update(dataset='text_files', path='data/tinyshakespeare.txt',
                tokenizer='char', val_fraction=0.1)
  c.train.update(steps=2000, batch_size=12, log_every=50, eval_every=250, eval_steps=20,
                 seed=1337, steps_per_call=10)  # a ~28 ms step: one dispatch per 10 (trainer.build)
  c.optimizer.update(name='adamw', lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000,
                     schedule='cosine', b1=0.9, b2=0.99, weight_decay=0.1, grad_clip=1.0)
  c.checkpoint.update(every_steps=500, keep=2)
  return c
