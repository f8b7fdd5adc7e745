"""The RAG reader: a small GPT trained to answer a question from retrieved passages.

  python scripts/train.py --config=configs/rag_reader.py --workdir=runs/rag_reader

Task sft on the embedded reading set (lm/rag/corpus.py, task.finetune_set='rag'): each
prompt holds two chunks of made-up towns' documents (the one with the answer and a
distractor) and a question; the answer is copied from the passages. Trained from scratch
(bytes tokenizer, 4 layers x 128 wide, context 192). Then scripts/rag.py eval measures it
on the towns of the document store, with and without retrieval (docs/rag.md).
Expected on 2 CPU cores: RUNTIME; eval/exact_match RESULT at the last step (gold passages).
"""
from lm.config import base_config, llama_model


def get_config():
  c = base_config()
  c.model.update(llama_model(vocab_size=0, max_len=192, n_layers=4, n_heads=4, d_model=128,
                             d_ff=384))
  c.task.update(name='sft', finetune_set='rag', prompt_loss_weight=0.25, finetune_examples=8000,
                finetune_eval=200)
  c.data.tokenizer = 'bytes'
  c.train.update(steps=1500, batch_size=16, log_every=50, eval_every=500, eval_steps=13)
  c.optimizer.update(lr=2e-3, min_lr=2e-4, warmup_steps=50, b2=0.99, weight_decay=0.1)
  c.checkpoint.update(every_steps=500, keep=1)
  return c
