"""LLaMA-2 7B (32 layers, 4096 wide, 32 heads, MLP 11008, vocab 32000, untied head).

  python scripts/model_summary.py --config=configs/llama2_7b.py
    -> total_params=6738415616 (the public checkpoint's count), in seconds on a CPU
       (shapes only: jax.eval_shape allocates nothing).
  python scripts/train.py --config=configs/llama2_7b.py --workdir=/tmp/l7 --compile_only \
      --config.mesh.fsdp=8
    -> per-device memory of the train step on 8 (fake) devices, without the hardware.
"""
from lm.config import base_config, llama_model


def get_config():
  c = base_config()
  c.model.update(llama_model(n_layers=32, d_model=4096, n_heads=32, d_ff=11008,
                             dtype="bfloat16", remat="full", scan_layers=True))
  c.train.update(batch_size=8, steps=10000, log_every=10)
  c.optimizer.update(lr=3e-4, min_lr=3e-5, warmup_steps=2000, b2=0.95)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  return c
