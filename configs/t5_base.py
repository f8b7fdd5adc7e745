"""T5-base, v1.0 layout (12+12 layers, 768 wide, 12 heads of 64, ReLU MLP 3072, vocab 32128,
the head tied to the embedding).

  python scripts/model_summary.py --config=configs/t5_base.py
    -> total_params=222903552 (the public t5-base checkpoint's count), ~6 s on 2 CPU cores.
  python scripts/convert_checkpoint.py --from_hf=t5-base --workdir=RUN
    -> the released weights as an lm run (T5ForConditionalGeneration, see lm/convert/hf.py).
Pre-training: not run yet (no measured runtime or loss); see configs/t5_small.py.
"""
from lm.config import base_config, t5_model


def get_config():
  c = base_config('encdec')
  c.model.update(t5_model(d_model=768, n_layers=12, n_decoder_layers=12, n_heads=12,
                          head_dim=64, d_ff=3072))
  c.task.name = 'span_corruption'
  c.train.update(batch_size=128, steps=10000, log_every=10)
  c.optimizer.update(name='adafactor', lr=1e-2, min_lr=1e-3, warmup_steps=1000,
                     schedule='inverse_sqrt', weight_decay=0.0)
  return c
