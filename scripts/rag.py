"""Retrieval-augmented generation: build an index, ask it, measure it (docs/rag.md).

  python scripts/rag.py index --workdir=ENCODER_RUN --docs='DIR/**/*.txt' --index=DIR2 \
      [--chunk_tokens=96 --overlap=48 --approximate]
  python scripts/rag.py ask --index=DIR2 --generator=RUN --question="Who is the mayor of X?" \
      [--k=1 --max_new_tokens=32]
  python scripts/rag.py eval --index=DIR2 --generator=RUN [--questions=FILE.jsonl --k=1
      --limit=N --out=FILE.json]

index: --docs is a glob (or comma-separated globs) of text files, or *.jsonl files of
{"text", "source"} lines, or "embedded" (the package's document store of 200 made-up towns,
lm/rag/corpus.py); ENCODER_RUN an encoder or decoder run (configs/rag_retriever.py);
--approximate adds a FAISS HNSW graph (searched by default when present).
ask: prints the answer, then the sources used (JSON lines).
eval: recall@1/2/5/10 of the retriever and the generator's exact match closed-book and with
the top-k passages, over --questions (JSON lines {"question", "answer", optional
"evidence"}; default: the embedded store's 800 questions); prints a markdown table and the
results as JSON (--out: also to FILE.json, and per question to FILE.samples.jsonl).
"""
import json
import pathlib
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'index: the encoder run that embeds.')
_DOCS = flags.DEFINE_string('docs', None, 'index: glob of documents, or "embedded".')
_INDEX = flags.DEFINE_string('index', None, 'The index directory.')
_CHUNK = flags.DEFINE_integer('chunk_tokens', 96, 'index: tokens per chunk.')
_OVERLAP = flags.DEFINE_integer('overlap', 48, 'index: tokens shared by neighbouring chunks.')
_APPROX = flags.DEFINE_boolean('approximate', False, 'index: also build a FAISS HNSW graph.')
_POOLING = flags.DEFINE_string('pooling', None, 'index: mean | cls | last (default: the '
                               'run\'s task.pooling, else mean for an encoder, last for a '
                               'decoder).')
_GENERATOR = flags.DEFINE_string('generator', None, 'ask/eval: the decoder run that answers.')
_QUESTION = flags.DEFINE_string('question', None, 'ask: the question.')
_K = flags.DEFINE_integer('k', 1, 'Passages put in the prompt.')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 32, 'ask: answer length cap.')
_QUESTIONS = flags.DEFINE_string('questions', None, 'eval: JSON lines of questions (default: '
                                 'the embedded store\'s).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'eval: the first N questions only (0: all).')
_OUT = flags.DEFINE_string('out', None, 'eval: also write FILE.json and FILE.samples.jsonl.')


def _need(**flags_):
  missing = [f'--{k}' for k, v in flags_.items() if not v]
  if missing:
    raise ValueError(f'this command needs {", ".join(missing)}.')


def index_cmd():
  from lm.rag import corpus, embed, index
  _need(workdir=_WORKDIR.value, docs=_DOCS.value, index=_INDEX.value)
  docs = (corpus.documents(corpus.towns(200, 'eval')) if _DOCS.value == 'embedded'
          else index.read_docs(_DOCS.value))
  embedder = embed.Embedder.from_run(_WORKDIR.value, _POOLING.value)
  idx = index.build(embedder, docs, _CHUNK.value, _OVERLAP.value, _APPROX.value)
  idx.save(_INDEX.value)
  print(json.dumps(dict(index=_INDEX.value, chunks=len(idx), documents=len(docs),
                        approximate=_APPROX.value)))


def ask_cmd():
  from lm.rag import pipeline
  _need(index=_INDEX.value, generator=_GENERATOR.value, question=_QUESTION.value)
  retriever = pipeline.Retriever.load(_INDEX.value)
  reader = pipeline.Reader.from_run(_GENERATOR.value)
  chunks = retriever.retrieve([_QUESTION.value], _K.value)[0]
  print(reader.answer([_QUESTION.value], [[c['text'] for c in chunks]], _MAX_NEW.value)[0])
  for c in chunks:
    print(json.dumps(c))


def eval_cmd():
  from lm.rag import corpus, pipeline
  _need(index=_INDEX.value)
  if _QUESTIONS.value:
    lines = pathlib.Path(_QUESTIONS.value).read_text().splitlines()
    questions = [json.loads(line) for line in lines if line.strip()]
    bad = [i + 1 for i, q in enumerate(questions) if not {'question', 'answer'} <= set(q)]
    if bad:
      raise ValueError(f'{_QUESTIONS.value}:{bad[0]} is not {{"question": ..., "answer": ...}}.')
  else:
    questions = corpus.questions(corpus.towns(200, 'eval'))
  questions = questions[:_LIMIT.value] if _LIMIT.value else questions
  retriever = pipeline.Retriever.load(_INDEX.value)
  reader = pipeline.Reader.from_run(_GENERATOR.value) if _GENERATOR.value else None
  results, rows = pipeline.evaluate(retriever, reader, questions, _K.value)
  print('| metric | value |\n|---|---|')
  for name, value in results.items():
    print(f'| {name} | {value:.3f} |' if isinstance(value, float) else f'| {name} | {value} |')
  out = dict(results=results, index=_INDEX.value, generator=_GENERATOR.value, k=_K.value)
  if _OUT.value:
    path = pathlib.Path(_OUT.value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix('.json').write_text(json.dumps(out, indent=2) + '\n')
    path.with_suffix('.samples.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  print(json.dumps(out))


COMMANDS = dict(index=index_cmd, ask=ask_cmd, eval=eval_cmd)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in COMMANDS:
    sys.exit(f'usage: rag.py {"|".join(COMMANDS)} --flags (see the docstring).')
  try:
    COMMANDS[argv[1]]()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
