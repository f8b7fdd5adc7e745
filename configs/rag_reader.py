"""The RAG reader: a small LLaMA-style decoder that answers a question from a passage.

  python scripts/train.py --config=configs/rag_reader.py --workdir=runs/rag_reader

Task sft on the embedded reading set (lm/rag/corpus.py, task.finetune_set='rag'): each
prompt holds the chunk of a made-up town's document that states the answer, then the
question; the answer is copied out of it. From scratch (bytes, 4 layers x 128 wide, RoPE,
context 192), the prompt's tokens trained too at weight 0.25 (without it the reader stays
on a plateau of made-up names: docs/rag.md). Then scripts/rag.py eval measures it on the
document store's towns, with and without retrieval.
Expected on 2 CPU cores: about 26 min (1500 steps took 13 min); eval/exact_match (held-out
towns, the gold passage) 0.24, 0.735, 1.000 at steps 1000, 2000, 3000.
"""
from lm.config import base_config, llama_model


def get_config():
  c = base_config()
  c.model.update(llama_model(vocab_size=0, max_len=192, n_layers=4, n_heads=4, d_model=128,
                             d_ff=384))
  c.task.update(name='sft', finetune_set='rag', prompt_loss_weight=0.25, finetune_examples=8000,
                finetune_eval=200)
  c.data.tokenizer = 'bytes'
  c.train.update(steps=3000, batch_size=16, log_every=50, eval_every=1000, eval_steps=13)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.1)
  c.checkpoint.update(every_steps=1000, keep=1)
  return c
