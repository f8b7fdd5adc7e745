"""GPT-2 1558M (48 layers, 1600 wide, 25 heads, context 1024, vocab 50257).

  python scripts/model_summary.py --config=configs/gpt2_1558m.py
    -> total_params=1557611200 (the public checkpoint's count), ~6 s on 2 CPU cores.
  python scripts/train.py --config=configs/gpt2_1558m.py --compile_only --topology=v5e-8
    -> compile-only: see docs/tpu_compile.md.
Training: not run yet (no measured runtime or loss). Data and tokenizer as
configs/gpt2_124m.py says; use --config.runtime.dtype=bfloat16 and FSDP on accelerators.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(n_layers=48, d_model=1600, n_heads=25))
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=2e-4, min_lr=2e-05, warmup_steps=700, b2=0.95)
  return c
