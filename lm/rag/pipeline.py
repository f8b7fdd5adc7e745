"""Retrieval-augmented generation: retrieve top-k chunks, put them in the prompt, generate.

The reader sees one user message, prompt(question, passages), through its chat template
(lm/data/instruct.py): numbered passages, then the question. A passage that does not fit
the reader's context is dropped, lowest-ranked first. evaluate() measures the retriever
(recall@k: a retrieved chunk holds the question's evidence sentence, or its answer when the
question has no evidence) and the reader's greedy exact match closed-book (no passages) and
with the top-k passages, as lm/eval/exact_match.py counts it.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def prompt(question: str, passages: list[str]) -> str:
  """The user message the reader sees: numbered passages (none: closed book), then the
  question. The reader is fine-tuned on this exact layout (lm/rag/corpus.reader_records)."""
  if not passages:
    return f'Question: {question}'
  context = '\n'.join(f'[{i + 1}] {p}' for i, p in enumerate(passages))
  return f'Context:\n{context}\nQuestion: {question}'


@dataclasses.dataclass
class Retriever:
  index: object  # lm.rag.index.Index
  embedder: object  # lm.rag.embed.Embedder

  @classmethod
  def load(cls, index_dir) -> 'Retriever':
    """The saved index and the encoder run it was built with (its meta.json names it)."""
    from lm.rag import embed, index  # lazy: jax and checkpoints
    idx = index.load(index_dir)
    return cls(idx, embed.Embedder.from_run(idx.meta['encoder'], idx.meta['pooling']))

  def retrieve(self, questions: list[str], k: int, approximate: bool | None = None
               ) -> list[list[dict]]:
    """The k best chunks per question, best first: {"text", "source", "chunk", "score"}."""
    scores, ids = self.index.search(self.embedder.embed(questions), k, approximate)
    return [[dict(self.index.chunks[j], score=round(float(s), 4))
             for s, j in zip(row_s, row_i) if j >= 0] for row_s, row_i in zip(scores, ids)]


@dataclasses.dataclass
class Reader:
  """A generator run: model, params, tokenizer and its chat template."""
  model: object
  params: object
  tokenizer: object
  template: object

  @classmethod
  def from_run(cls, workdir) -> 'Reader':
    from lm.data import instruct
    from lm.infer import load
    model, params, config, tokenizer = load.load_run(workdir)
    if config.model.get('family', 'decoder') != 'decoder':
      raise ValueError(f'The generator {workdir} is a {config.model.family}; RAG reads with '
                       'a decoder run.')
    return cls(model, params, tokenizer, instruct.chat_template(config, tokenizer))

  def record(self, question: str, passages: list[str], answer: str = '',
             room: int = 0) -> dict:
    """The messages record of `question` (and `answer`) over as many of `passages` (in
    order) as fit the context with `room` tokens to spare."""
    from lm.data import instruct
    passages = list(passages)
    while True:
      rec = dict(messages=[dict(role='user', content=prompt(question, passages)),
                           dict(role='assistant', content=answer)])
      n = len(instruct.encode_record(instruct.parse_record(rec, 'rag'), self.tokenizer,
                                     self.template)[0])
      if n + room <= self.model.cfg.max_len or not passages:
        return rec
      passages.pop()

  def answer(self, questions: list[str], passages: list[list[str]],
             max_new_tokens: int = 32) -> list[str]:
    """Greedy answers, one per question, each over its passages (kept while at least 8
    tokens are left to answer in; the answers stop at the context's end)."""
    from lm.data import instruct
    from lm.infer import sampling
    prompts = []
    for q, ps in zip(questions, passages):
      rec = self.record(q, ps, room=min(8, max_new_tokens))
      text = self.template.render(rec['messages'][:1], add_generation_prompt=True)
      prompts.append(instruct.encode_text(self.tokenizer, text).tolist())
    tok = self.tokenizer
    room = self.model.cfg.max_len - max(len(p) for p in prompts)
    outs = sampling.generate(self.model, self.params, prompts,
                             max_new_tokens=max(1, min(max_new_tokens, room)),
                             temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id or 0)
    return [tok.decode([t for t in out if t != tok.eos_id]).strip() for out in outs]

  def exact_match(self, questions: list[dict], passages: list[list[str]]) -> tuple[float, list]:
    """lm/eval/exact_match.py's greedy exact match of each {"question", "answer"}."""
    from lm.eval import exact_match
    # The record holds the answer and EOS already; room for exact_match's 4 extra tokens.
    records = [self.record(q['question'], ps, q['answer'], room=4)
               for q, ps in zip(questions, passages)]
    return exact_match.exact_match(self.model, self.params, self.tokenizer, records,
                                   self.template)


def hit(question: dict, chunks: list[dict]) -> bool:
  needle = question.get('evidence') or question['answer']
  return any(needle in c['text'] for c in chunks)


def evaluate(retriever: Retriever, reader: Reader | None, questions: list[dict], k: int = 1,
             recall_ks=(1, 2, 5, 10)) -> tuple[dict, list[dict]]:
  """({metric: value}, per question rows): recall@each of recall_ks, and with a reader the
  exact match closed-book and with the top-k passages."""
  retrieved = retriever.retrieve([q['question'] for q in questions], max(max(recall_ks), k))
  results = {f'recall@{j}': float(np.mean([hit(q, r[:j]) for q, r in zip(questions, retrieved)]))
             for j in recall_ks}
  rows = [dict(q, retrieved=[c['source'] for c in r[:k]], hit=hit(q, r[:k]))
          for q, r in zip(questions, retrieved)]
  if reader is not None:
    closed, closed_rows = reader.exact_match(questions, [[] for _ in questions])
    rag, rag_rows = reader.exact_match(questions, [[c['text'] for c in r[:k]]
                                                   for r in retrieved])
    results.update({'exact_match/closed_book': closed, f'exact_match/rag@{k}': rag})
    for row, c, r in zip(rows, closed_rows, rag_rows):
      row.update(closed_book=c['generated'], rag=r['generated'])
  results['questions'] = len(questions)
  return results, rows
