"""The OpenAI-compatible HTTP API (FastAPI) over an lm.serve.engine.Engine.

GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE when stream=true),
GET /health, GET /metrics (Prometheus text). With a retriever (scripts/serve.py --index,
lm/rag) a chat request is grounded: the last user message is the question, its top-k chunks
go into that message (lm/rag/pipeline.prompt; the lowest-ranked dropped while the prompt
does not fit), and the response carries them as "sources" (in the first chunk when
streaming). Bodies are parsed here rather than by
FastAPI's validation, so every bad request gets OpenAI's error shape
{"error": {"message", "type", "param", "code"}} with 400 (not 422). echo + logprobs give
the prompt's log-probs of lm.eval.scoring.score (what scripts/score.py prints), so
lm-eval-harness' local-completions scores exactly as the offline evaluation does.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import threading
import time
import uuid
from typing import Literal

import fastapi
from fastapi import exceptions as fastapi_exceptions
from fastapi import responses
import jax
import jax.numpy as jnp
import numpy as np
import prometheus_client as prom
import pydantic
from pydantic import ConfigDict, Field
from starlette import exceptions as starlette_exceptions
import uvicorn

from lm.data import instruct
from lm.eval import scoring
from lm.infer import sampling
from lm.serve import engine as engine_lib

# -- request schemas ------------------------------------------------------------------------


class _Strict(pydantic.BaseModel):
  model_config = ConfigDict(extra='forbid', strict=True)


class StreamOptions(_Strict):
  include_usage: bool = False


class _Common(_Strict):
  model: str | None = None
  max_tokens: int | None = Field(None, ge=0)
  temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
  top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
  top_k: int = Field(0, ge=0)  # an extension (vLLM's too)
  n: int = Field(1, ge=1, le=16)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  ignore_eos: bool = False  # an extension (vLLM's too), for benchmarks
  presence_penalty: Literal[0] = 0  # accepted at OpenAI's default only
  frequency_penalty: Literal[0] = 0


class CompletionRequest(_Common):
  prompt: str | list[str] | list[int] | list[list[int]]
  logprobs: int | None = Field(None, ge=0, le=5)
  echo: bool = False
  best_of: int | None = None


class _Part(_Strict):
  type: Literal['text']
  text: str


class Message(_Strict):
  role: Literal['system', 'user', 'assistant']
  content: str | list[_Part]
  name: str | None = None


class ChatRequest(_Common):
  messages: list[Message] = Field(min_length=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=engine_lib.TOP)
  max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
  def __init__(self, status: int, message: str, type_: str = 'invalid_request_error',
               param: str | None = None, code: str | None = None, headers=None):
    super().__init__(message)
    self.status, self.message, self.type = status, message, type_
    self.param, self.code, self.headers = param, code, headers


def _error(status, message, type_='invalid_request_error', param=None, code=None, headers=None):
  return responses.JSONResponse(
      dict(error=dict(message=message, type=type_, param=param, code=code)), status, headers)


# -- metrics --------------------------------------------------------------------------------

class Metrics:
  """Prometheus metrics of one app (its own registry: several apps may share a process)."""

  def __init__(self, engine):
    r = self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter('lm_requests', 'HTTP requests by endpoint and status',
                                 ['endpoint', 'status'], registry=r)
    self.tokens_in = prom.Counter('lm_prompt_tokens', 'Prompt tokens', registry=r)
    self.tokens_out = prom.Counter('lm_generation_tokens', 'Generated tokens', registry=r)
    prom.Gauge('lm_queue_depth', 'Sequences waiting for a slot', registry=r).set_function(
        lambda: engine.queue_depth)
    prom.Gauge('lm_batch_occupancy', 'Decode slots in use', registry=r).set_function(
        lambda: engine.occupancy)
    prom.Gauge('lm_batch_slots', 'Decode slots', registry=r).set(engine.slots)
    buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)
    self.ttft = prom.Histogram('lm_time_to_first_token_seconds', 'Time to first token',
                               buckets=buckets, registry=r)
    self.itl = prom.Histogram('lm_inter_token_latency_seconds', 'Time between tokens',
                              buckets=buckets, registry=r)


# -- the app --------------------------------------------------------------------------------

class Server:
  """What the handlers share: engine, tokenizer, chat template, model id, key, metrics."""

  def __init__(self, engine, config, *, model_id: str, api_key: str | None = None,
               retriever=None, rag_k: int = 1):
    self.engine, self.tokenizer = engine, engine.tokenizer
    self.model_id, self.api_key = model_id, api_key
    self.retriever, self.rag_k = retriever, rag_k  # an lm.rag.pipeline.Retriever, or None
    self.config = config
    self.metrics = Metrics(engine)
    self._template = None

  @property
  def template(self):
    if self._template is None:
      self._template = instruct.chat_template(self.config, self.tokenizer)
    return self._template

  def warmup(self):
    """Compiles the echo path (prompt log-probs) for every bucket, as the engine's."""
    model, params = self.engine.model, self.engine.params
    for n in sorted({scoring.bucket(b, model.cfg.max_len) for b in self.engine.buckets}):
      scoring.score(model, params, [[0] * n])
      _prompt_tops(model, params, [[0] * n])


@functools.partial(jax.jit, static_argnames=('model',))
def _tops(model, params, tokens_BT):
  logits_BTV = model.apply({'params': params}, tokens_BT)
  logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
  return jax.lax.top_k(logp_BTV, min(5, logp_BTV.shape[-1]))


def _prompt_tops(model, params, sequences):
  """Top-5 (log-prob, id) after each prompt token but the last, padded as scoring does."""
  length = scoring.bucket(max(map(len, sequences)), model.cfg.max_len)
  tokens = np.zeros((len(sequences), length), np.int32)
  for row, ids in zip(tokens, sequences):
    row[:len(ids)] = ids
  lp, ids = (np.asarray(x) for x in _tops(model, params, jnp.asarray(tokens)))
  return [(lp[i, :len(s) - 1], ids[i, :len(s) - 1]) for i, s in enumerate(sequences)]


def _param_of(err: pydantic.ValidationError) -> tuple[str, str]:
  e = err.errors()[0]
  loc = [str(x) for x in e['loc'] if not str(x).startswith(('list[', 'str', 'int'))]
  param = '.'.join(loc) or None
  kind = 'unknown field' if e['type'] == 'extra_forbidden' else e['msg']
  return param, f'{param}: {kind}' if param else kind


async def _parse(request: fastapi.Request, cls):
  raw = await request.body()
  try:
    data = json.loads(raw.decode('utf-8'))
  except UnicodeDecodeError:
    raise ApiError(400, 'The request body is not valid UTF-8.', code='invalid_json') from None
  except ValueError as e:
    raise ApiError(400, f'The request body is not valid JSON ({e}).', code='invalid_json') from None
  if not isinstance(data, dict):
    raise ApiError(400, 'The request body must be a JSON object.', code='invalid_json')
  try:
    return cls.model_validate(data)
  except pydantic.ValidationError as e:
    param, message = _param_of(e)
    raise ApiError(400, message, param=param, code='invalid_value') from None


def create_app(server: Server) -> fastapi.FastAPI:
  app = fastapi.FastAPI(title='lm', docs_url=None, redoc_url=None, openapi_url=None)
  eng, tok, metrics = server.engine, server.tokenizer, server.metrics

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    metrics.requests.labels(request.url.path, str(e.status)).inc()
    return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

  @app.exception_handler(fastapi_exceptions.RequestValidationError)
  async def validation_error(request, e):
    metrics.requests.labels(request.url.path, '400').inc()
    return _error(400, str(e.errors()[:1]), code='invalid_value')

  @app.exception_handler(starlette_exceptions.HTTPException)
  async def http_error(request, e):
    return _error(e.status_code, str(e.detail), 'invalid_request_error' if e.status_code < 500
                  else 'server_error', headers=getattr(e, 'headers', None))

  @app.exception_handler(Exception)
  async def server_error(request, e):
    metrics.requests.labels(request.url.path, '500').inc()
    return _error(500, f'Internal error: {type(e).__name__}: {e}', 'server_error')

  def check(request: fastapi.Request, model: str | None = None):
    if server.api_key is not None:
      if request.headers.get('authorization', '') != f'Bearer {server.api_key}':
        raise ApiError(401, 'Incorrect API key provided.', 'invalid_request_error',
                       code='invalid_api_key')
    if model is not None and model != server.model_id:
      raise ApiError(404, f'The model {model!r} does not exist; this server has '
                     f'{server.model_id!r} (GET /v1/models).', param='model',
                     code='model_not_found')

  @app.get('/health')
  async def health():
    if not eng.alive():
      return _error(503, 'The engine is not running.', 'server_error')
    return dict(status='ok', queue_depth=eng.queue_depth, occupancy=eng.occupancy)

  @app.get('/metrics')
  async def metrics_text():
    return responses.Response(prom.generate_latest(metrics.registry),
                              media_type=prom.CONTENT_TYPE_LATEST)

  @app.get('/v1/models')
  async def list_models(request: fastapi.Request):
    check(request)
    return dict(object='list', data=[dict(id=server.model_id, object='model', created=0,
                                          owned_by='lm', max_model_len=eng.max_len)])

  def prompts_of(req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of each prompt (the text of ids: their decoding, for echo)."""
    p = req.prompt
    if isinstance(p, str):
      p = [p]
    elif p and isinstance(p[0], int):
      p = [p]
    if not p:
      raise ApiError(400, 'prompt is empty.', param='prompt')
    out = []
    for x in p:
      if isinstance(x, str):
        try:
          out.append(sampling.encode_prompt(tok, x))
        except Exception as e:  # e.g. lone surrogates
          raise ApiError(400, f'prompt cannot be encoded: {e}', param='prompt') from None
      else:
        if not x or any(not 0 <= t < eng.model.cfg.vocab_size for t in x):
          raise ApiError(400, f'prompt token ids must be non-empty and in [0, '
                         f'{eng.model.cfg.vocab_size}).', param='prompt')
        out.append(list(x))
    return out, [x if isinstance(x, str) else tok.decode(x) for x in p]

  def sampling_of(req, max_tokens: int, j: int) -> engine_lib.Sampling:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or any(not s for s in stop):
      raise ApiError(400, 'stop takes up to 4 non-empty strings.', param='stop')
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), 'little')
    return engine_lib.Sampling(max_tokens=max_tokens, temperature=req.temperature,
                               top_k=min(req.top_k, eng.model.cfg.vocab_size),
                               top_p=req.top_p, seed=seed + j, stop=tuple(stop),
                               ignore_eos=req.ignore_eos)

  def check_length(ids, max_tokens):
    if len(ids) + max_tokens > eng.max_len:
      raise ApiError(400, f'This model\'s context is {eng.max_len} tokens; the prompt has '
                     f'{len(ids)} and max_tokens is {max_tokens}. Shorten one of them.',
                     param='max_tokens' if len(ids) < eng.max_len else 'prompt',
                     code='context_length_exceeded')

  def launch(prompts, reqs_per_prompt, make_sampling):
    """Queues n sequences per prompt; returns (seqs, asyncio queue of (choice, event))."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seqs = []
    t0 = engine_lib.now()
    for i, ids in enumerate(prompts):
      for j in range(reqs_per_prompt):
        last = [None]

        def emit(ev, k=len(seqs), last=last):
          if ev[0] == 'token' and ev[1] is not None:
            t = engine_lib.now()
            if last[0] is None:
              metrics.ttft.observe(t - t0)
            else:
              metrics.itl.observe(t - last[0])
            last[0] = t
            metrics.tokens_out.inc()
          with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (k, ev))
        seqs.append(engine_lib.Sequence(ids, make_sampling(j), emit))
    if seqs and not eng.submit(seqs):
      raise ApiError(429, f'The queue is full ({eng.max_queue} waiting); retry shortly.',
                     'rate_limit_error', code='queue_full', headers={'Retry-After': '1'})
    metrics.tokens_in.inc(sum(map(len, prompts)))
    return seqs, queue

  def sse(chunks):
    async def stream():
      async for chunk in chunks:
        yield f'data: {json.dumps(chunk)}\n\n'
      yield 'data: [DONE]\n\n'
    return responses.StreamingResponse(stream(), media_type='text/event-stream',
                                       headers={'Cache-Control': 'no-cache'})

  async def events(seqs, queue, request=None):
    """(choice, event) until every sequence is done; cancels the rest if abandoned, or
    when `request`'s client disconnects (a streamed response watches for that itself)."""
    left = len(seqs)

    async def watch():
      while (await request.receive())['type'] != 'http.disconnect':
        pass
      for s in seqs:
        s.cancel()
    watcher = asyncio.create_task(watch()) if request is not None and seqs else None
    try:
      while left:
        k, ev = await queue.get()
        left -= ev[0] == 'done'
        if ev[1] == 'error':
          raise ApiError(500, f'The engine failed: {eng.error!r}', 'server_error')
        yield k, ev
    finally:
      for s in seqs:
        s.cancel()
      if watcher is not None:
        watcher.cancel()

  def token_str(t: int) -> str:
    return tok.decode([t])

  # -- completions ------------------------------------------------------------------------

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request):
    req = await _parse(request, CompletionRequest)
    check(request, req.model)
    if req.best_of not in (None, req.n):
      raise ApiError(400, 'best_of is not supported (leave it out or equal to n).',
                     param='best_of')
    prompts, prompt_texts = prompts_of(req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    for ids in prompts:
      check_length(ids, max_tokens)
    want_lp = req.logprobs is not None
    scored = tops = None
    if req.echo and want_lp:
      scored = await asyncio.to_thread(scoring.score, eng.model, eng.params, prompts)
      tops = await asyncio.to_thread(_prompt_tops, eng.model, eng.params, prompts)
    n = req.n
    seqs, queue = (launch(prompts, n, lambda j: sampling_of(req, max_tokens, j))
                   if max_tokens > 0 else ([], None))
    rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())

    def echo_logprobs(i: int) -> dict:
      ids, lp = scored[i]['token_ids'], scored[i]['token_logprobs']
      top_lp, top_id = tops[i]
      top = [None]
      for t, (ls, js) in enumerate(zip(top_lp.tolist(), top_id.tolist())):
        d = {token_str(j): v for j, v in zip(js[:req.logprobs], ls[:req.logprobs])}
        d[token_str(ids[t + 1])] = lp[t + 1]  # the scored value, exactly
        top.append(d)
      strs = [token_str(t) for t in ids]
      return dict(tokens=strs, token_logprobs=lp, top_logprobs=top,
                  text_offset=list(np.cumsum([0] + [len(s) for s in strs[:-1]]).tolist()))

    def token_logprobs(ev, offset: int) -> dict:
      _, t, _, lp, top = ev
      if t is None:
        return dict(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
      return dict(tokens=[token_str(t)], token_logprobs=[lp],
                  top_logprobs=[{token_str(j): v for j, v in top[:req.logprobs]}],
                  text_offset=[offset])

    usage_in = sum(map(len, prompts))

    if req.stream:
      async def chunks():
        def chunk(k, text, lp=None, finish=None):
          return dict(id=rid, object='text_completion', created=created, model=server.model_id,
                      choices=[dict(index=k, text=text, logprobs=lp, finish_reason=finish)])
        offsets = [0] * (len(prompts) * n)
        if req.echo:
          for k in range(len(offsets)):
            offsets[k] = len(prompt_texts[k // n])
            yield chunk(k, prompt_texts[k // n], echo_logprobs(k // n) if want_lp else None)
        if not seqs:
          for k in range(len(offsets)):
            yield chunk(k, '', None, 'length')
        out_tokens = 0
        async for k, ev in events(seqs, queue):
          if ev[0] == 'done':
            yield chunk(k, '', None, 'length' if ev[1] == 'length' else 'stop')
            continue
          out_tokens += ev[1] is not None
          if ev[2] or want_lp:
            yield chunk(k, ev[2], token_logprobs(ev, offsets[k]) if want_lp else None)
          offsets[k] += len(ev[2])
        if req.stream_options and req.stream_options.include_usage:
          yield dict(id=rid, object='text_completion', created=created, model=server.model_id,
                     choices=[], usage=dict(prompt_tokens=usage_in, completion_tokens=out_tokens,
                                            total_tokens=usage_in + out_tokens))
        metrics.requests.labels('/v1/completions', '200').inc()
      return sse(chunks())

    k_all = len(prompts) * n
    texts, finish = [''] * k_all, ['length'] * k_all
    lps = [None] * k_all
    if want_lp:
      lps = [echo_logprobs(k // n) if req.echo else token_logprobs((0, None, 0, 0, 0), 0)
             for k in range(k_all)]
    out_tokens = 0
    async for k, ev in events(seqs, queue, request):
      if ev[0] == 'done':
        finish[k] = 'length' if ev[1] == 'length' else 'stop'
        continue
      out_tokens += ev[1] is not None
      if want_lp and ev[1] is not None:
        base = (len(prompt_texts[k // n]) if req.echo else 0) + len(texts[k])
        for key, v in token_logprobs(ev, base).items():
          lps[k][key] = lps[k][key] + v
      texts[k] += ev[2]
    choices = [dict(index=k, text=(prompt_texts[k // n] if req.echo else '') + texts[k],
                    logprobs=lps[k], finish_reason=finish[k]) for k in range(k_all)]
    metrics.requests.labels('/v1/completions', '200').inc()
    return dict(id=rid, object='text_completion', created=created, model=server.model_id,
                choices=choices, usage=dict(prompt_tokens=usage_in, completion_tokens=out_tokens,
                                            total_tokens=usage_in + out_tokens))

  # -- chat -------------------------------------------------------------------------------

  @app.post('/v1/chat/completions')
  async def chat(request: fastapi.Request):
    req = await _parse(request, ChatRequest)
    check(request, req.model)
    messages = [dict(role=m.role, content=m.content if isinstance(m.content, str)
                     else ''.join(p.text for p in m.content)) for m in req.messages]
    sources, last = [], max((i for i, m in enumerate(messages) if m['role'] == 'user'),
                            default=None)
    if server.retriever is not None and last is not None:
      question = messages[last]['content']
      sources = (await asyncio.to_thread(server.retriever.retrieve, [question],
                                         server.rag_k))[0]
    while True:  # without retrieval once; with it, until the passages left fit
      if sources:
        from lm.rag import pipeline  # lazy: only a grounded server needs it
        messages[last] = dict(messages[last], content=pipeline.prompt(
            question, [c['text'] for c in sources]))
      try:
        text = server.template.render(messages, add_generation_prompt=True)
        ids = instruct.encode_text(tok, text).tolist()
      except Exception as e:  # a template's raise_exception, unencodable text
        raise ApiError(400, f'The messages cannot go through the chat template: {e}',
                       param='messages') from None
      if not sources or len(ids) < eng.max_len:
        break
      sources.pop()
      if not sources:
        messages[last] = dict(messages[last], content=pipeline.prompt(question, []))
    if not ids:
      raise ApiError(400, 'The messages render to no tokens.', param='messages')
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
      max_tokens = max(1, eng.max_len - len(ids))
    if max_tokens < 1:
      raise ApiError(400, 'max_tokens must be at least 1.', param='max_tokens')
    check_length(ids, max_tokens)
    n_top = req.top_logprobs or 0
    seqs, queue = launch([ids], req.n, lambda j: sampling_of(req, max_tokens, j))
    rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())

    def entry(ev):
      _, t, _, lp, top = ev
      s = token_str(t)
      return dict(token=s, logprob=lp, bytes=list(s.encode('utf-8', 'replace')),
                  top_logprobs=[dict(token=token_str(j), logprob=v,
                                     bytes=list(token_str(j).encode('utf-8', 'replace')))
                                for j, v in top[:n_top]])

    if req.stream:
      async def chunks():
        def chunk(k, delta, lp=None, finish=None):
          return dict(id=rid, object='chat.completion.chunk', created=created,
                      model=server.model_id, choices=[dict(index=k, delta=delta, logprobs=lp,
                                                           finish_reason=finish)])
        for k in range(req.n):
          first = chunk(k, dict(role='assistant', content=''))
          yield dict(first, sources=sources) if server.retriever is not None else first
        out_tokens = 0
        async for k, ev in events(seqs, queue):
          if ev[0] == 'done':
            yield chunk(k, {}, None, 'length' if ev[1] == 'length' else 'stop')
            continue
          out_tokens += ev[1] is not None
          lp = dict(content=[entry(ev)]) if req.logprobs and ev[1] is not None else None
          if ev[2] or lp:
            yield chunk(k, dict(content=ev[2]), lp)
        if req.stream_options and req.stream_options.include_usage:
          yield dict(id=rid, object='chat.completion.chunk', created=created,
                     model=server.model_id, choices=[],
                     usage=dict(prompt_tokens=len(ids), completion_tokens=out_tokens,
                                total_tokens=len(ids) + out_tokens))
        metrics.requests.labels('/v1/chat/completions', '200').inc()
      return sse(chunks())

    texts, finish = [''] * req.n, ['length'] * req.n
    lps = [[] for _ in range(req.n)]
    out_tokens = 0
    async for k, ev in events(seqs, queue, request):
      if ev[0] == 'done':
        finish[k] = 'length' if ev[1] == 'length' else 'stop'
        continue
      out_tokens += ev[1] is not None
      if ev[1] is not None and req.logprobs:
        lps[k].append(entry(ev))
      texts[k] += ev[2]
    metrics.requests.labels('/v1/chat/completions', '200').inc()
    choices = [dict(index=k, message=dict(role='assistant', content=texts[k]),
                    logprobs=dict(content=lps[k]) if req.logprobs else None,
                    finish_reason=finish[k]) for k in range(req.n)]
    out = dict(id=rid, object='chat.completion', created=created, model=server.model_id,
               choices=choices, usage=dict(prompt_tokens=len(ids), completion_tokens=out_tokens,
                                           total_tokens=len(ids) + out_tokens))
    return dict(out, sources=sources) if server.retriever is not None else out

  return app


class UvicornServer(uvicorn.Server):
  """uvicorn, except that SIGTERM/SIGINT end it with exit status 0: stop accepting,
  finish the in-flight requests (streams included), return. on_started() runs once the
  port is open."""
  on_started = None

  async def startup(self, sockets=None):
    await super().startup(sockets)
    if self.started and self.on_started is not None:
      self.on_started()

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    old = {s: signal.signal(s, lambda *_: setattr(self, 'should_exit', True))
           for s in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def make_server(app, host: str = '127.0.0.1', port: int = 8000, **kwargs) -> UvicornServer:
  config = uvicorn.Config(app, host=host, port=port, log_level='warning', access_log=False,
                          timeout_keep_alive=5, **kwargs)
  return UvicornServer(config)
