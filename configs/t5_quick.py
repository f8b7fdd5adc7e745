"""Quick T5: a small encoder-decoder pre-trained with span corruption on the default corpus.

  python scripts/train.py --config=configs/t5_quick.py --workdir=runs/t5_quick

The corpus is the Python standard library of the running interpreter (no download);
bytes tokenizer (259 ids) and a model vocabulary of 384, so the sentinels count down from
383 above the tokenizer's ids. T5 v1.0 layout, 3 + 3 layers x 128 wide, 4 heads of 32, ReLU
MLP 512; raw rows of 141 bytes -> encoder inputs of 128 (15% noise in spans of mean 3,
a sentinel per span, EOS) and targets of 29 (max_target_len 32); decoding starts from
the pad id 256 (T5 starts from its pad id). Batch 32, 800 steps.

Measured on 2 CPU cores (AMD EPYC, shared with other jobs: configs/quickstart.py took
119 s there the same day, against 52 s on a quiet AVX-512 Xeon): 413 s wall.
Eval loss (nats per target token: the noise bytes, the sentinels and EOS) and token
accuracy:
  step   200    400    600    800
  loss   2.493  2.391  2.314  2.288
  acc    0.377  0.384  0.400  0.400
(train loss 3.09 at step 50, 2.38 at step 800; deterministic: the same numbers each run).
Unigram baseline: 3.58 nats, the entropy of the unigram distribution of the eval targets
(the decoder targets of the validation split; 3.53 on the 10 batches the eval reads):
  ids = np.concatenate([b['decoder_targets'][b['decoder_weights'] > 0]
                        for b in task.data_iter(tok, 'eval')])
  p = np.bincount(ids) / len(ids); p = p[p > 0]; print(-(p * np.log(p)).sum())
with task = lm.train.tasks.get_task(config) and tok the run's tokenizer. The model ends
1.3 nats below it. notebooks/t5_span_corruption.ipynb trains this config and decodes
spans with beam search.
"""
from lm.config import base_config, t5_model


def get_config():
  c = base_config('encdec')
  c.model.update(t5_model(vocab_size=384, max_len=128, max_target_len=32, d_model=128,
                          n_layers=3, n_decoder_layers=3, n_heads=4, head_dim=32, d_ff=512,
                          decoder_start_id=256))
  c.task.name = 'span_corruption'
  c.data.update(dataset='default', tokenizer='bytes')
  c.train.update(steps=800, batch_size=32, log_every=50, eval_every=200, eval_steps=10)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.01)
  c.checkpoint.update(every_steps=400, keep=1)
  return c
