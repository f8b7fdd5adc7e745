"""RoBERTa base (RobertaForMaskedLM: 12 layers, 768 wide, 12 heads, vocab 50265).

  python scripts/model_summary.py --config=configs/roberta_base.py
    -> total_params=124697433 (RobertaForMaskedLM: the MLM head, no pooler, one token
       type; the decoder is tied to the word embeddings), ~5 s on 2 CPU cores.
  python scripts/convert_checkpoint.py --from_hf=HF_DIR --workdir=RUN
    -> the released weights (HF_DIR: roberta-base saved with save_pretrained) as an lm
       run; its byte-level BPE tokenizer.json comes along.
Positions start at pos_offset=2 (padding_idx + 1), as RoBERTa's: 514 rows for 512 tokens.
Pre-training: not run yet (no measured runtime or loss):
  python scripts/train.py --config=configs/roberta_base.py --workdir=RUN \
    --config.task.name=masked_lm
"""
from lm.config import base_config


def get_config():
  c = base_config('encoder')
  c.model.update(vocab_size=50265, max_len=512, max_positions=514, pos_offset=2,
                 type_vocab_size=1, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 norm_eps=1e-5, pooler=False, mlm_head=True, num_labels=0, init_std=0.02)
  c.task.name = 'masked_lm'
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=6e-4, min_lr=6e-5, warmup_steps=1000, b2=0.98, eps=1e-6,
                     weight_decay=0.01)
  return c
