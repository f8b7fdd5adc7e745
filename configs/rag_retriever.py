"""The RAG retriever: a small BERT-style encoder trained to embed questions near passages.

  python scripts/train.py --config=configs/rag_retriever.py --workdir=runs/rag_retriever

Task embedding (lm/rag/embed.py): InfoNCE with in-batch negatives (batch 64, temperature
0.05) on 8,000 (question, chunk) pairs of the embedded retrieval set's training towns
(lm/rag/corpus.py), mean pooling; from scratch (bytes, 4 layers x 128 wide). Then
scripts/rag.py index embeds the document store with it (docs/rag.md).
Expected on 2 CPU cores: about 7 min; eval/accuracy (the own chunk first of the batch's 64)
0.955 at step 400; recall@1 0.939 on the embedded store's 800 questions.
"""
from lm.config import base_config


def get_config():
  c = base_config('encoder')
  c.model.update(vocab_size=0, max_len=112, max_positions=112, d_model=128, n_layers=4,
                 n_heads=4, pooler=False, mlm_head=False)
  c.task.update(name='embedding', pooling='mean', embed_temperature=0.05, query_len=40,
                finetune_examples=8000, finetune_eval=512)
  # Unshuffled: batches follow the pairs' order, town by town, so a question's batch holds
  # its town's other chunks, the hard negatives (in-batch accuracy 0.955 vs 0.746 shuffled).
  c.data.update(tokenizer='bytes', shuffle=False)
  c.train.update(steps=400, batch_size=64, log_every=50, eval_every=200, eval_steps=8)
  c.optimizer.update(lr=1e-3, min_lr=1e-4, warmup_steps=50, b2=0.99, weight_decay=0.01)
  c.checkpoint.update(every_steps=200, keep=1)
  return c
