"""LLaMA-2 13B (40 layers, 5120 wide, 40 heads, MLP 13824, vocab 32000, untied head).

  python scripts/model_summary.py --config=configs/llama2_13b.py
    -> total_params=13015864320 (the public checkpoint's count), ~3.5 s on 2 CPU cores
       (shapes only: jax.eval_shape allocates nothing).
  python scripts/train.py --config=configs/llama2_13b.py --compile_only --topology=TOPOLOGY
    -> compile-only: see docs/tpu_compile.md (topologies and per-device memory).
Training: not run yet (no measured runtime or loss).
"""
from lm.config import base_config, llama_model


def get_config():
  c = base_config()
  c.model.update(llama_model(n_layers=40, d_model=5120, n_heads=40, d_ff=13824))
  c.runtime.update(dtype="bfloat16", remat="full", scan_layers=True)
  c.train.update(batch_size=8, steps=10000, log_every=10)
  c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=2000, b2=0.95)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
