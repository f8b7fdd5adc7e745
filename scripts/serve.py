"""An OpenAI-compatible HTTP server for a run (docs/serving.md).

  python scripts/serve.py --workdir=DIR [--host=127.0.0.1 --port=8000 --max_batch=8
                          --max_len=N --max_queue=64 --api_key=KEY --index=DIR --k=1]

Loads the run, compiles every prefill bucket and the decode step, then opens the port
(so the first request pays no compile) and prints "serving ..." once it is open.
--index: ground chat requests in an lm/rag index (scripts/rag.py index): the top --k
chunks of the last user message go into the prompt and come back as "sources".
SIGTERM or Ctrl-C: stop accepting, finish the requests in flight, exit 0.
"""
import pathlib
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (train.py, convert_checkpoint.py).')
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on.')
_PORT = flags.DEFINE_integer('port', 8000, 'Port to listen on.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 8, 'Decode slots (requests decoded at once).')
_MAX_LEN = flags.DEFINE_integer('max_len', 0, 'Context: prompt + max_tokens (0: the model\'s).')
_MAX_QUEUE = flags.DEFINE_integer('max_queue', 64, 'Waiting requests before answering 429.')
_API_KEY = flags.DEFINE_string('api_key', None, 'Require "Authorization: Bearer KEY".')
_INDEX = flags.DEFINE_string('index', None, 'A RAG index directory (scripts/rag.py index).')
_K = flags.DEFINE_integer('k', 1, 'With --index: passages per chat request.')
_MODEL_ID = flags.DEFINE_string('model_id', None, 'The model name clients use (default: the '
                                'workdir\'s name).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from lm.infer.load import load_run
  from lm.serve import api, engine
  try:
    model, params, config, tokenizer = load_run(_WORKDIR.value)
    eng = engine.Engine(model, params, tokenizer, max_batch=_MAX_BATCH.value,
                        max_len=_MAX_LEN.value, max_queue=_MAX_QUEUE.value)
    retriever = None
    if _INDEX.value:
      from lm.rag import pipeline
      retriever = pipeline.Retriever.load(_INDEX.value)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  model_id = _MODEL_ID.value or pathlib.Path(_WORKDIR.value).resolve().name
  server = api.Server(eng, config, model_id=model_id, api_key=_API_KEY.value,
                      retriever=retriever, rag_k=_K.value)
  eng.warmup()
  server.warmup()
  eng.start()
  http = api.make_server(api.create_app(server), _HOST.value, _PORT.value)
  http.on_started = lambda: print(f'serving {model_id} on http://{_HOST.value}:{_PORT.value}'
                                  f'/v1 (max_batch={eng.slots}, max_len={eng.max_len})',
                                  flush=True)
  try:
    http.run()
  finally:
    eng.stop(timeout=30)
  if not http.started:
    sys.exit(f'error: could not listen on {_HOST.value}:{_PORT.value}.')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
