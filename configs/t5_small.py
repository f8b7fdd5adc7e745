"""T5-small, v1.0 layout (6+6 layers, 512 wide, 8 heads of 64, ReLU MLP 2048, vocab 32128,
the head tied to the embedding).

  python scripts/model_summary.py --config=configs/t5_small.py
    -> total_params=60506624 (the public t5-small checkpoint's count), ~5 s on 2 CPU cores.
  python scripts/convert_checkpoint.py --from_hf=t5-small --workdir=RUN
    -> the released weights as an lm run (T5ForConditionalGeneration, see lm/convert/hf.py).
Pre-training: not run yet (no measured runtime or loss). It needs T5's SentencePiece
tokenizer (32000 pieces + 100 sentinels): --config.init_from=HF_DIR brings it along.
"""
from lm.config import base_config, t5_model


def get_config():
  c = base_config('encdec')
  c.model.update(t5_model(d_model=512, n_layers=6, n_decoder_layers=6, n_heads=8,
                          head_dim=64, d_ff=2048))
  c.task.name = 'span_corruption'
  c.train.update(batch_size=128, steps=10000, log_every=10)
  c.optimizer.update(name='adafactor', lr=1e-2, min_lr=1e-3, warmup_steps=1000,
                     schedule='inverse_sqrt', weight_decay=0.0)
  return c
