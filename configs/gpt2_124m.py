"""GPT-2 124M (12 layers, 768 wide, 12 heads, context 1024, vocab 50257).

  python scripts/model_summary.py --config=configs/gpt2_124m.py
    -> total_params=124439808 (the public checkpoint's count), in seconds on a CPU.
  python scripts/benchmark.py --config=configs/gpt2_124m.py --config.model.dtype=bfloat16
    -> tokens/s and MFU on the device at hand (synthetic tokens).
Training needs a GPT-2-sized tokenizer: pass --config.data.path and
--config.data.tokenizer_path=spm.model (scripts/train_tokenizer.py makes one), or import
the released weights and tokenizer with scripts/convert_checkpoint.py.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(n_layers=12, d_model=768, n_heads=12))
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=6e-4, min_lr=6e-5, warmup_steps=700, b2=0.95)
  return c
