"""GPT-2 355M (24 layers, 1024 wide, 16 heads, context 1024, vocab 50257).

  python scripts/model_summary.py --config=configs/gpt2_355m.py
    -> total_params=354823168 (the public checkpoint's count), ~5 s on 2 CPU cores.
  python scripts/train.py --config=configs/gpt2_355m.py --compile_only --topology=v5e-8
    -> compile-only: see docs/tpu_compile.md.
Training: not run yet (no measured runtime or loss). Data and tokenizer as
configs/gpt2_124m.py says; use --config.runtime.dtype=bfloat16 and FSDP on accelerators.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(n_layers=24, d_model=1024, n_heads=16))
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=3e-4, min_lr=3e-05, warmup_steps=700, b2=0.95)
  return c
