"""T5 v1.1 small (8+8 layers, 512 wide, 6 heads of 64, gated-GELU MLP 1024, vocab 32128,
an untied head; Flan-T5-small has this layout).

  python scripts/model_summary.py --config=configs/t5_v1_1_small.py
    -> total_params=76961152 (the public google/t5-v1_1-small checkpoint's count),
       ~5 s on 2 CPU cores.
  python scripts/convert_checkpoint.py --from_hf=google/t5-v1_1-small --workdir=RUN
    -> the released weights as an lm run (T5ForConditionalGeneration, see lm/convert/hf.py).
Pre-training: not run yet (no measured runtime or loss); see configs/t5_small.py.
"""
from lm.config import base_config, t5_model


def get_config():
  c = base_config('encdec')
  c.model.update(t5_model(d_model=512, n_layers=8, n_decoder_layers=8, n_heads=6,
                          head_dim=64, d_ff=1024, mlp="gated_gelu", tie_embeddings=False))
  c.task.name = 'span_corruption'
  c.train.update(batch_size=128, steps=10000, log_every=10)
  c.optimizer.update(name='adafactor', lr=1e-2, min_lr=1e-3, warmup_steps=1000,
                     schedule='inverse_sqrt', weight_decay=0.0)
  return c
