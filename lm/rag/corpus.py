"""The embedded retrieval set: made-up towns whose facts appear only in their documents.

Made deterministically by the package (no network, no files), so retrieval has something
to prove: no model can know these facts, and every answer is checkable exactly. A town's
document is four sentences in a random order, e.g.

  Velmora was founded in 1742. The mayor of Velmora is Orla Brandik. Velmora lies on the
  river Kesh. Velmora is known for its copper.

and each fact has one question: "Who is the mayor of Velmora?" -> "Orla Brandik"; "When was
Velmora founded?" -> "1742"; "Which river is Velmora on?" -> "Kesh"; "What is Velmora known
for?" -> "copper" (16 goods, so a blind guess is right 1 time in 16; the others are names
or years nobody can guess).

towns(n, split) draws the towns of split 'train' (the retriever's and the reader's training
data) or 'eval' (the document store and questions the README's figures are measured on):
the two never share a town name. From them:
- documents(): the documents, {"source": "town/NAME", "text": ...};
- questions(): {"question", "answer", "source"}, one per fact;
- retriever_pairs(): (question, passage) training pairs for the `embedding` task (lm/rag/
  embed.py), the passage a chunk of the town's document that holds the answer's sentence;
- reader_records(): chat records for the `sft` task (task.finetune_set='rag'): the prompt
  (lm/rag/pipeline.prompt) holds the chunk with the answer's sentence (plus k - 1
  distractor chunks, of the same town or another, in a random order); the answer is the
  fact.

    python -m lm.rag.corpus --out=DIR   writes DIR/docs/*.txt and DIR/questions.jsonl (eval)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from lm.rag import index, pipeline

ONSETS = ('b', 'br', 'd', 'dr', 'f', 'g', 'gr', 'h', 'k', 'kr', 'l', 'm', 'n', 'p', 'r',
          's', 'st', 't', 'tr', 'v', 'z')
VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ea', 'ou')
CODAS = ('', '', 'n', 'r', 'l', 's', 'th', 'sk', 'nd', 'm')
FIRST_NAMES = ('Orla', 'Ivo', 'Mira', 'Tomas', 'Edda', 'Lukas', 'Nora', 'Piet', 'Asta',
               'Rune', 'Greta', 'Otto', 'Saga', 'Emil', 'Ilse', 'Kaj', 'Vera', 'Bram',
               'Hedda', 'Sven')
GOODS = ('copper', 'wool', 'salt', 'tea', 'glass', 'silk', 'amber', 'tin', 'cider', 'rope',
         'cheese', 'paper', 'honey', 'marble', 'linen', 'pottery')
FACTS = ('river', 'mayor', 'founded', 'known')
SENTENCES = dict(river='{town} lies on the river {river}.',
                 mayor='The mayor of {town} is {mayor}.',
                 founded='{town} was founded in {founded}.',
                 known='{town} is known for its {known}.')
QUESTIONS = dict(river='Which river is {town} on?', mayor='Who is the mayor of {town}?',
                 founded='When was {town} founded?', known='What is {town} known for?')
SPLITS = ('train', 'eval')
# The chunking reader_records and retriever_pairs assume (bytes-tokenizer tokens); the index
# takes its own (scripts/rag.py index --chunk_tokens --overlap), these by default.
CHUNK_TOKENS, OVERLAP = 96, 48


def _word(rng: np.random.Generator, syllables: int) -> str:
  parts = [ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
           for _ in range(syllables)]
  return (''.join(parts) + CODAS[rng.integers(len(CODAS))]).capitalize()


@dataclasses.dataclass(frozen=True)
class Town:
  town: str
  river: str
  mayor: str
  founded: str
  known: str
  order: tuple[int, ...]  # the document's sentence order

  @property
  def source(self) -> str:
    return f'town/{self.town}'

  def sentence(self, fact: str) -> str:
    return SENTENCES[fact].format(**dataclasses.asdict(self))

  def document(self) -> str:
    return ' '.join(self.sentence(FACTS[i]) for i in self.order)


def towns(n: int, split: str, seed: int = 0) -> list[Town]:
  """n towns of `split` (train or eval): distinct names, never shared between the splits
  (one stream of names; eval takes the first names, train the ones after 10,000)."""
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; known: {SPLITS}.')
  rng = np.random.default_rng([seed, 1206])
  names, seen = [], set()
  need = n + (10_000 if split == 'train' else 0)
  while len(names) < need:
    name = _word(rng, int(rng.integers(2, 4)))
    if name not in seen and len(name) <= 10:
      seen.add(name)
      names.append(name)
  names = names[-n:] if n else []
  rng = np.random.default_rng([seed, 1206, SPLITS.index(split)])
  return [Town(town=name, river=_word(rng, 1 + int(rng.integers(2))),
               mayor=f'{FIRST_NAMES[rng.integers(len(FIRST_NAMES))]} {_word(rng, 2)}',
               founded=str(int(rng.integers(1100, 1900))), known=GOODS[rng.integers(len(GOODS))],
               order=tuple(int(i) for i in rng.permutation(len(FACTS))))
          for name in names]


def documents(town_list: list[Town]) -> list[dict]:
  return [dict(source=t.source, text=t.document()) for t in town_list]


def questions(town_list: list[Town]) -> list[dict]:
  """One {"question", "answer", "evidence", "source"} per fact of each town; evidence is
  the sentence that states it (a retrieved chunk holding it counts as a hit)."""
  return [dict(question=QUESTIONS[f].format(town=t.town), answer=getattr(t, f),
               evidence=t.sentence(f), source=t.source) for t in town_list for f in FACTS]


def byte_chunks(text: str, size: int = CHUNK_TOKENS, overlap: int = OVERLAP) -> list[str]:
  """The chunks lm/rag/index.chunk makes with the bytes tokenizer (ASCII text)."""
  return [text[a:b].strip() for a, b in index.windows(len(text), size, overlap)]


def _gold_chunks(town: Town, fact: str) -> list[str]:
  sentence = town.sentence(fact)
  return [c for c in byte_chunks(town.document()) if sentence in c]


def retriever_pairs(town_list: list[Town]) -> list[dict]:
  """{"query", "passage"} per fact: the question and a chunk holding its answer sentence."""
  rng = np.random.default_rng(7)
  out = []
  for t in town_list:
    for f in FACTS:
      gold = _gold_chunks(t, f)
      out.append(dict(query=QUESTIONS[f].format(town=t.town),
                      passage=gold[rng.integers(len(gold))]))
  return out


def reader_records(town_list: list[Town], k: int = 1, seed: int = 0) -> list[dict]:
  """Chat records: the prompt with the gold chunk and k - 1 distractor chunks (of the same
  town or another, in a random order), the fact's answer."""
  rng = np.random.default_rng([seed, 99])
  out = []
  for i, t in enumerate(town_list):
    for f in FACTS:
      gold = _gold_chunks(t, f)
      passages = [gold[rng.integers(len(gold))]]
      for _ in range(k - 1):
        other = t if rng.random() < 0.5 else town_list[
            (i + 1 + rng.integers(len(town_list) - 1)) % len(town_list)]
        pool = [c for c in byte_chunks(other.document()) if c not in passages]
        passages.append(pool[rng.integers(len(pool))])
      passages = [passages[j] for j in rng.permutation(len(passages))]
      content = pipeline.prompt(QUESTIONS[f].format(town=t.town), passages)
      out.append(dict(messages=[dict(role='user', content=content),
                                dict(role='assistant', content=getattr(t, f))]))
  return out


def held_out_towns(num_train: int, num_eval: int) -> tuple[list[Town], list[Town]]:
  """(training, held-out) towns of split 'train' for num_train / num_eval records of four
  per town; the held-out towns come first, so they do not change with num_train."""
  town_list = towns((num_train + num_eval + 3) // 4, 'train')
  e = (num_eval + 3) // 4
  return town_list[e:], town_list[:e]


def reader_sets(num_train: int, num_eval: int, k: int = 1) -> tuple[list[dict], list[dict]]:
  """(train, eval) reader records (k passages each) for the sft task, of held_out_towns."""
  train, held_out = held_out_towns(num_train, num_eval)
  return reader_records(train, k)[:num_train], reader_records(held_out, k)[:num_eval]


def write(out_dir, num_towns: int = 200) -> None:
  out = pathlib.Path(out_dir)
  (out / 'docs').mkdir(parents=True, exist_ok=True)
  town_list = towns(num_towns, 'eval')
  for t in town_list:
    (out / 'docs' / f'{t.town}.txt').write_text(t.document() + '\n')
  (out / 'questions.jsonl').write_text(
      ''.join(json.dumps(q) + '\n' for q in questions(town_list)))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='directory for docs/*.txt and questions.jsonl')
  p.add_argument('--towns', type=int, default=200)
  a = p.parse_args(argv)
  write(a.out, a.towns)
  print(f'Wrote {a.towns} documents to {a.out}/docs and {4 * a.towns} questions to '
        f'{a.out}/questions.jsonl.')


if __name__ == '__main__':
  main()
