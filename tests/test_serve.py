"""The OpenAI-compatible server: a real uvicorn server on 127.0.0.1, the official client.

One tiny random GPT-2 (tests/test_convert_hf.py's) behind one server for the module.
"""
import asyncio
import concurrent.futures
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

openai = pytest.importorskip('openai')
httpx = pytest.importorskip('httpx')
pytest.importorskip('fastapi')
pytest.importorskip('uvicorn')

from test_convert_hf import imported  # noqa: E402

from lm.eval import scoring  # noqa: E402
from lm.infer import sampling  # noqa: E402
from lm.infer.load import build_model  # noqa: E402
from lm.serve import api, engine  # noqa: E402

KEY = 'test-key'
SLOTS = 32


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def served():
  """(base url, engine, tokenizer): a server on a free loopback port, in a thread."""
  workdir, config, params, tokenizer = imported('gpt2')
  model = build_model(config)
  eng = engine.Engine(model, params, tokenizer, max_batch=SLOTS, max_len=64, max_queue=128)
  server = api.Server(eng, config, model_id='tiny', api_key=KEY)
  eng.warmup()
  server.warmup()
  eng.start()
  port = free_port()
  http = api.make_server(api.create_app(server), '127.0.0.1', port)
  thread = threading.Thread(target=http.run, daemon=True)
  thread.start()
  while not http.started:
    time.sleep(0.05)
  yield f'http://127.0.0.1:{port}', eng, tokenizer
  http.should_exit = True
  thread.join(10)
  eng.stop(10)


@pytest.fixture(scope='module')
def client(served):
  return openai.OpenAI(base_url=served[0] + '/v1', api_key=KEY, max_retries=0)


def greedy(client, prompt, n=12, **kw):
  out = client.completions.create(model='tiny', prompt=prompt, max_tokens=n, temperature=0, **kw)
  return out.choices[0].text


def test_completions_and_chat_with_the_openai_client(served, client):
  _, eng, tok = served
  assert [m.id for m in client.models.list().data] == ['tiny']
  text = greedy(client, 'Hello world', 16)
  streamed = client.completions.create(model='tiny', prompt='Hello world', max_tokens=16,
                                       temperature=0, stream=True)
  assert ''.join(c.choices[0].text for c in streamed) == text
  # n > 1, a list of prompts, a seed: choices in OpenAI's order, reproducible.
  many = client.completions.create(model='tiny', prompt=['Hello world', 'The quick'], n=2,
                                   max_tokens=8, temperature=1.0, seed=3, extra_body={'top_k': 50})
  assert [c.index for c in many.choices] == [0, 1, 2, 3]
  again = client.completions.create(model='tiny', prompt=['Hello world', 'The quick'], n=2,
                                    max_tokens=8, temperature=1.0, seed=3, extra_body={'top_k': 50})
  assert [c.text for c in many.choices] == [c.text for c in again.choices]
  assert many.usage.completion_tokens > 0
  # stop: the text ends before the stop string.
  if len(text) > 6:
    stop = text[3:5]
    cut = client.completions.create(model='tiny', prompt='Hello world', max_tokens=16,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == 'stop'
    parts = client.completions.create(model='tiny', prompt='Hello world', max_tokens=16,
                                      temperature=0, stop=[stop], stream=True)
    assert ''.join(c.choices[0].text for c in parts) == cut.choices[0].text
  # logprobs: one entry per generated token, the top alternatives at most 3.
  lp = client.completions.create(model='tiny', prompt='Hello world', max_tokens=6,
                                 temperature=0, logprobs=3).choices[0]
  assert ''.join(lp.logprobs.tokens) == lp.text or len(lp.logprobs.tokens) == 6
  assert all(len(t) <= 3 for t in lp.logprobs.top_logprobs)
  assert all(v <= 0 for v in lp.logprobs.token_logprobs)
  # echo + logprobs + max_tokens=0: the prompt's log-probs, as scripts/score.py's.
  ids = sampling.encode_prompt(tok, 'The quick brown fox')
  want = scoring.score(eng.model, eng.params, [ids])[0]['token_logprobs']
  echo = client.completions.create(model='tiny', prompt='The quick brown fox', max_tokens=0,
                                   echo=True, logprobs=1).choices[0]
  assert echo.text == 'The quick brown fox'
  assert echo.logprobs.token_logprobs == want
  # lm-eval-harness' local-completions log-likelihood request: a batch, max_tokens=1.
  batch = client.completions.create(model='tiny', prompt=['The quick brown fox', 'Hello'],
                                    max_tokens=1, temperature=0, logprobs=1, echo=True,
                                    seed=1234).choices
  assert batch[0].logprobs.token_logprobs[:len(want)] == want
  assert len(batch[1].logprobs.token_logprobs) == len(sampling.encode_prompt(tok, 'Hello')) + 1
  greedy_top = batch[0].logprobs.top_logprobs[len(want)]  # the generated (greedy) token's
  assert max(greedy_top.values()) == batch[0].logprobs.token_logprobs[len(want)]
  # chat: through the chat template, streamed and not, n > 1 and logprobs.
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi!'}]
  chat = client.chat.completions.create(model='tiny', messages=messages, max_tokens=10,
                                        temperature=0, logprobs=True, top_logprobs=2)
  content = chat.choices[0].message.content
  assert chat.choices[0].message.role == 'assistant'
  assert all(len(e.top_logprobs) == 2 for e in chat.choices[0].logprobs.content)
  parts = client.chat.completions.create(model='tiny', messages=messages, max_tokens=10,
                                         temperature=0, stream=True,
                                         stream_options={'include_usage': True})
  chunks = list(parts)
  assert ''.join(c.choices[0].delta.content or '' for c in chunks if c.choices) == content
  assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
  two = client.chat.completions.create(model='tiny', messages=messages, max_tokens=5, n=2,
                                       temperature=0.8, seed=1)
  assert len(two.choices) == 2


def run_alone(eng, prompt, n):
  """Token ids of one greedy request through the engine."""
  out, done = [], threading.Event()

  def emit(ev):
    if ev[0] == 'token' and ev[1] is not None:
      out.append(ev[1])
    if ev[0] == 'done':
      done.set()
  assert eng.submit([engine.Sequence(prompt, engine.Sampling(max_tokens=n, temperature=0),
                                     emit)])
  done.wait(30)
  return out


def test_batching_invariance(served, client):
  _, eng, tok = served
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 300, int(n)).tolist() for n in rng.integers(1, 40, SLOTS)]
  # The engine against lm.infer.sampling.generate (ids, EOS included).
  for p in prompts[:1]:
    want = sampling.generate(eng.model, eng.params, [p], max_new_tokens=20, temperature=0,
                             eos_id=tok.eos_id)[0]
    assert run_alone(eng, p, 20) == [t for t in want if t != tok.eos_id]
  # Over HTTP: alone, then among 31 others (different lengths, some sampled).
  alone = [greedy(client, p, 20) for p in prompts[:4]]

  def request(i):
    if i < 4:
      return greedy(client, prompts[i], 20)
    return client.completions.create(model='tiny', prompt=prompts[i], max_tokens=5 + i % 20,
                                     temperature=0.7 * (i % 2), seed=i).choices[0].text
  with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
    together = list(pool.map(request, range(SLOTS)))
  assert together[:4] == alone


BAD = [  # (body, headers, status)
  (b'{"model": "tiny", "prompt": "hi"', None, 400),  # truncated JSON
  (b'not json', None, 400),
  (b'[1, 2]', None, 400),  # not an object
  (b'{"model": "tiny", "prompt": "\xff\xfe"}', None, 400),  # invalid UTF-8
  (dict(model='tiny'), None, 400),  # no prompt
  (dict(model='tiny', prompt='hi', max_tokens='5'), None, 400),  # wrong type
  (dict(model='tiny', prompt='hi', max_tokens=-1), None, 400),
  (dict(model='tiny', prompt='hi', max_tokens=10 ** 6), None, 400),  # beyond the context
  (dict(model='tiny', prompt='hi', max_tokens=2.5), None, 400),
  (b'{"model": "tiny", "prompt": "hi", "temperature": NaN}', None, 400),
  (dict(model='tiny', prompt='hi', temperature=-1), None, 400),
  (dict(model='tiny', prompt='hi', top_p=0), None, 400),
  (dict(model='tiny', prompt='hi', n=0), None, 400),
  (dict(model='tiny', prompt='hi', stream='yes'), None, 400),
  (dict(model='tiny', prompt='hi', bogus=1), None, 400),  # unknown field
  (dict(model='tiny', prompt='x' * (1 << 20)), None, 400),  # a 1 MB prompt
  (dict(model='tiny', prompt=[]), None, 400),
  (dict(model='tiny', prompt=[1, 10 ** 6]), None, 400),  # ids outside the vocabulary
  (dict(model='tiny', prompt='hi', stop=['a'] * 5), None, 400),
  (dict(model='tiny', prompt='hi', logprobs=50), None, 400),
  (dict(model='nope', prompt='hi'), None, 404),  # unknown model
  (dict(model='tiny', prompt='hi'), {'Authorization': 'Bearer wrong'}, 401),
  (dict(model='tiny', messages=[]), None, 400, '/v1/chat/completions'),  # empty messages
  (dict(model='tiny', messages=[{'role': 'wizard', 'content': 'hi'}]), None, 400,
   '/v1/chat/completions'),  # unknown role
  (dict(model='tiny', messages=[{'role': 'user'}]), None, 400, '/v1/chat/completions'),
  (dict(model='tiny', messages='hi'), None, 400, '/v1/chat/completions'),
]


def test_malformed_requests_get_their_4xx(served, client):
  base, eng, _ = served
  with httpx.Client(base_url=base, headers={'Authorization': f'Bearer {KEY}'}) as http:
    for body, headers, status, *path in BAD:
      kw = dict(content=body) if isinstance(body, bytes) else dict(json=body)
      r = http.post(path[0] if path else '/v1/completions', headers=headers,
                    **kw)
      assert r.status_code == status, (body if len(str(body)) < 200 else '1 MB', r.text[:300])
      error = r.json()['error']
      assert set(error) == {'message', 'type', 'param', 'code'} and error['message']
    assert http.get('/v1/nothing').status_code == 404
    # A full queue: 429 with Retry-After.
    eng.max_queue, keep = 0, eng.max_queue
    try:
      r = http.post('/v1/completions', json=dict(model='tiny', prompt='hi', max_tokens=2))
    finally:
      eng.max_queue = keep
    assert r.status_code == 429 and r.headers['retry-after'] and r.json()['error']
  assert greedy(client, 'Hello world', 4) == greedy(client, 'Hello world', 4)
  assert client.with_options(api_key='wrong').models  # (the client object itself is fine)


def rss_mb() -> float:
  with open('/proc/self/status') as f:
    return next(int(line.split()[1]) for line in f if line.startswith('VmRSS')) / 1024


def test_load_mixed_streamed_and_cancelled(served):
  base, eng, _ = served
  headers = {'Authorization': f'Bearer {KEY}'}
  prompts = ['Hello world', 'The quick brown fox', 'Sphinx of black', 'Tokenizers are fun',
             'How are you', 'A', 'judge my vow, 123 456.', 'lazy dog. ' * 3]
  lengths = (4, 16)

  async def one(http, i, plain=False):
    body = dict(model='tiny', prompt=prompts[i % 8], max_tokens=lengths[i % 2], temperature=0)
    if i % 3 == 0 and not plain:  # streamed; every ninth cancelled after two chunks
      text = ''
      async with http.stream('POST', '/v1/completions', json=dict(body, stream=True)) as r:
        assert r.status_code == 200
        n = 0
        async for line in r.aiter_lines():
          if line.startswith('data: ') and line != 'data: [DONE]':
            text += json.loads(line[6:])['choices'][0]['text']
            n += 1
            if i % 9 == 0 and n == 2:
              return None  # leaving the block closes the connection mid-stream
      return text
    r = await http.post('/v1/completions', json=body)
    assert r.status_code == 200, r.text
    return r.json()['choices'][0]['text']

  async def rounds():
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60) as http:
      expected = {i: await one(http, i, plain=True) for i in range(8)}  # each alone
      sizes = []
      for _ in range(2):
        results = await asyncio.gather(*(one(http, i) for i in range(64)))
        for i, text in enumerate(results):
          if text is not None:
            assert text == expected[i % 8], i
        sizes.append(rss_mb())
      return sizes
  from jax import monitoring
  traced = []  # shapes are fixed at warm-up: nothing is traced (compiled) per request
  monitoring.register_event_duration_secs_listener(
      lambda name, *_, **__: traced.append(name) if name.endswith('jaxpr_trace_duration') else 0)
  t0, rolls = time.time(), eng.rolls
  sizes = asyncio.run(rounds())
  assert not traced
  assert eng.rolls > rolls  # the cache was shifted under running requests
  assert time.time() - t0 < 60
  assert sizes[1] - sizes[0] < 50, sizes  # no growth from round to round
  for _ in range(50):  # cancelled streams free their slots
    if eng.occupancy == 0 and eng.queue_depth == 0:
      break
    time.sleep(0.1)
  assert eng.occupancy == 0 and eng.queue_depth == 0
  # A client that gives up on a plain (not streamed) request: dropped (here while queued).
  cancelled, gate, admit = eng.cancelled, threading.Event(), eng._admit
  eng._admit = lambda: (gate.wait(), admit())  # requests wait in the queue until the gate opens
  try:
    with pytest.raises(httpx.TimeoutException):
      httpx.post(base + '/v1/completions', headers=headers, timeout=1, json=dict(
          model='tiny', prompt='Hello', max_tokens=60, ignore_eos=True, temperature=0))
    for _ in range(50):
      if eng._pending and eng._pending[0].cancelled:
        break
      time.sleep(0.1)
    assert eng._pending[0].cancelled
  finally:
    gate.set()
    eng._admit = admit
  for _ in range(50):
    if eng.cancelled > cancelled:
      break
    time.sleep(0.1)
  assert eng.cancelled > cancelled and eng.occupancy == 0
  assert httpx.get(base + '/health').json()['status'] == 'ok'
  metrics = httpx.get(base + '/metrics').text
  assert 'lm_time_to_first_token_seconds_count' in metrics and 'lm_batch_occupancy' in metrics


def test_sigterm_finishes_in_flight_streams_and_exits_0(served):
  """scripts/serve.py: SIGTERM mid-stream lets the stream finish, then exit status 0."""
  import signal
  import subprocess
  import sys
  workdir = imported('gpt2')[0]
  port = free_port()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, os.path.join(root, 'scripts', 'serve.py'),
                           f'--workdir={workdir}', f'--port={port}', f'--max_batch={SLOTS}',
                           '--max_len=64'], stdout=subprocess.PIPE, text=True)
  try:
    assert 'serving' in proc.stdout.readline()  # printed once warm, before the port opens
    url = f'http://127.0.0.1:{port}/v1/completions'
    body = dict(prompt='Hello', max_tokens=40, temperature=0, stream=True)
    with httpx.stream('POST', url, json=body, timeout=30) as r:
      lines = r.iter_lines()
      assert next(lines).startswith('data: ')
      proc.send_signal(signal.SIGTERM)
      rest = [line for line in lines if line]
    assert rest[-1] == 'data: [DONE]'
    assert proc.wait(60) == 0
  finally:
    if proc.poll() is None:
      proc.kill()
