"""GPT-2 124M (12 layers, 768 wide, 12 heads, context 1024, vocab 50257).

  python scripts/model_summary.py --config=configs/gpt2_124m.py
    -> total_params=124439808 (the public checkpoint's count), ~5 s on 2 CPU cores.
  python scripts/train.py --config=configs/gpt2_124m.py --compile_only --topology=v5e-8
    -> compile-only: see docs/tpu_compile.md.
  python scripts/benchmark.py --config=configs/gpt2_124m.py --config.runtime.dtype=bfloat16
    -> tokens/s and MFU on the device at hand (synthetic tokens): one H100, 298k tokens/s,
       MFU 0.26 (docs/performance.md, scripts/gpu_benchmark.sh).
Training: not run yet (no measured runtime or loss). It needs a GPT-2-sized tokenizer:
pass --config.data.path, --config.data.tokenizer=sentencepiece and
--config.data.tokenizer_path=spm.model (scripts/train_tokenizer.py makes one), or start
from the released weights with --config.init_from=HF_DIR.
"""
from lm.config import base_config, gpt2_model


def get_config():
  c = base_config()
  c.model.update(gpt2_model(n_layers=12, d_model=768, n_heads=12))
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=6e-4, min_lr=6e-5, warmup_steps=700, b2=0.95)
  return c
