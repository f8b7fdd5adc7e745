"""BERT base (uncased layout: 12 layers, 768 wide, 12 heads, 512 positions, vocab 30522).

  python scripts/model_summary.py --config=configs/bert_base.py
    -> total_params=109482240 (BertModel with its pooler, the public checkpoint's count),
       ~5 s on 2 CPU cores.
  python scripts/convert_checkpoint.py --from_hf=HF_DIR --workdir=RUN
    -> the released weights (HF_DIR: bert-base-uncased saved with save_pretrained, or the
       Hub's files) as an lm run with its WordPiece tokenizer; BertModel, BertForMaskedLM
       and BertForSequenceClassification directories import (lm/convert/hf.py).
Pre-training: not run yet (no measured runtime or loss). Add the MLM head and the task:
  python scripts/train.py --config=configs/bert_base.py --workdir=RUN \
    --config.model.mlm_head=True --config.task.name=masked_lm
with a WordPiece tokenizer (--config.init_from=HF_DIR brings BERT's own), or train a
classifier with --config.model.num_labels=N --config.task.name=classification (JSON
lines {"text", "label"} in --config.data.path; lm/data/labeled.py).
"""
from lm.config import base_config


def get_config():
  c = base_config('encoder')
  c.model.update(vocab_size=30522, max_len=512, max_positions=512, pos_offset=0,
                 type_vocab_size=2, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                 norm_eps=1e-12, pooler=True, mlm_head=False, num_labels=0, init_std=0.02)
  c.train.update(batch_size=32, steps=10000, log_every=10)
  c.optimizer.update(lr=1e-4, min_lr=1e-5, warmup_steps=1000, b2=0.999, weight_decay=0.01)
  return c
