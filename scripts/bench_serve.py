"""Drives the OpenAI-compatible server with N concurrent streams; prints one JSON line.

  python scripts/bench_serve.py --workdir=DIR [--concurrency=16 --requests=64 --max_tokens=64
                                --prompt_len=32 --max_batch=16]   # starts scripts/serve.py
  python scripts/bench_serve.py --url=http://127.0.0.1:8000 [...]   # a running server

Every request is a streamed completion of --prompt_len random token ids with
ignore_eos, so each makes exactly --max_tokens tokens. Reported: requests/s, output
tokens/s (all streams together), p50/p99 time to first token and inter-token latency,
each from the client's side (HTTP and SSE included).
"""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags
import numpy as np

_URL = flags.DEFINE_string('url', None, 'A running server (else --workdir starts one).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory to serve for the benchmark.')
_CONCURRENCY = flags.DEFINE_integer('concurrency', 16, 'Streams at once.')
_REQUESTS = flags.DEFINE_integer('requests', 0, 'Requests in all (0: 4 x concurrency).')
_MAX_TOKENS = flags.DEFINE_integer('max_tokens', 64, 'Tokens each request makes.')
_PROMPT_LEN = flags.DEFINE_integer('prompt_len', 32, 'Prompt tokens of each request.')
_MAX_BATCH = flags.DEFINE_integer('max_batch', 16, 'Decode slots of the server started here.')
_API_KEY = flags.DEFINE_string('api_key', None, 'Bearer key of the server.')
_HF_BASELINE = flags.DEFINE_bool('hf_baseline', False, 'Also time transformers\' generate '
                                 '(PyTorch, float32, KV cache) on --workdir exported to HF.')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(workdir: str, max_batch: int, max_len: int):
  port = _free_port()
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'serve.py')
  proc = subprocess.Popen([sys.executable, script, f'--workdir={workdir}', f'--port={port}',
                           f'--max_batch={max_batch}', f'--max_len={max_len}',
                           f'--max_queue={max(64, _REQUESTS.value)}'],
                          stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
  line = proc.stdout.readline()
  if 'serving' not in line:
    proc.kill()
    sys.exit(f'error: the server did not start ({line.strip()!r}).')
  return proc, f'http://127.0.0.1:{port}'


async def _bench(url: str, concurrency: int, requests: int, model: str | None):
  import httpx
  rng = np.random.default_rng(0)
  headers = {'Authorization': f'Bearer {_API_KEY.value}'} if _API_KEY.value else {}
  ttft, itl, tokens, rates = [], [], [0], []
  todo = iter(range(requests))

  async def worker(http):
    for _ in todo:
      body = dict(prompt=rng.integers(1, 200, _PROMPT_LEN.value).tolist(), stream=True,
                  max_tokens=_MAX_TOKENS.value, temperature=0, ignore_eos=True, logprobs=0)
      if model:
        body['model'] = model
      t0, last, first, n = time.perf_counter(), None, None, 0
      async with http.stream('POST', '/v1/completions', json=body) as r:
        if r.status_code != 200:
          raise RuntimeError(f'HTTP {r.status_code}: {(await r.aread())[:300]!r}')
        async for line in r.aiter_lines():
          if not line.startswith('data: {'):
            continue
          chunk = json.loads(line[6:])
          lp = chunk['choices'][0]['logprobs'] if chunk['choices'] else None
          if not lp or not lp['tokens']:  # the finish chunk
            continue
          t = time.perf_counter()
          (ttft.append(t - t0) if last is None else itl.append(t - last))
          last, first = t, t if last is None else first
          tokens[0] += 1
          n += 1
      if n > 1:
        rates.append((n - 1) / (last - first))

  async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as http:
    models = (await http.get('/v1/models')).json()['data']
    model = model or models[0]['id']
    start = time.perf_counter()
    await asyncio.gather(*(worker(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
  ms = lambda xs, q: round(1000 * float(np.percentile(xs, q)), 2) if xs else None
  return dict(concurrency=concurrency, requests=requests, max_tokens=_MAX_TOKENS.value,
              prompt_len=_PROMPT_LEN.value, wall_s=round(wall, 3),
              requests_per_sec=round(requests / wall, 3),
              output_tokens_per_sec=round(tokens[0] / wall, 1),
              ttft_p50_ms=ms(ttft, 50), ttft_p99_ms=ms(ttft, 99),
              itl_p50_ms=ms(itl, 50), itl_p99_ms=ms(itl, 99),
              stream_decode_tokens_per_sec=round(float(np.median(rates)), 1) if rates else None)


def _hf_generate(workdir: str) -> float:
  """transformers' generate decode tokens/s on one stream: the run exported to HF, float32,
  KV cache on, greedy, --max_tokens after a --prompt_len prompt; prefill time excluded
  (generate of max_tokens minus generate of 1 token), best of 3."""
  import tempfile
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as hf_dir:
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'convert_checkpoint.py')
    subprocess.run([sys.executable, script, f'--workdir={workdir}', f'--to_hf={hf_dir}'],
                   check=True, stdout=subprocess.DEVNULL)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
  ids = torch.tensor(np.random.default_rng(0).integers(1, 200, (1, _PROMPT_LEN.value)))

  def timed(n):
    best = float('inf')
    for _ in range(3):
      t0 = time.perf_counter()
      with torch.no_grad():
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                       pad_token_id=0)
      best = min(best, time.perf_counter() - t0)
    return best
  timed(2)  # warm-up
  n = _MAX_TOKENS.value
  return round((n - 1) / (timed(n) - timed(1)), 1)


def main(argv):
  del argv
  if (_URL.value is None) == (_WORKDIR.value is None):
    sys.exit('Pass exactly one of --url=http://HOST:PORT or --workdir=DIR.')
  requests = _REQUESTS.value or 4 * _CONCURRENCY.value
  proc, url = None, _URL.value
  if _WORKDIR.value:
    proc, url = _start(_WORKDIR.value, _MAX_BATCH.value, _PROMPT_LEN.value + _MAX_TOKENS.value)
  try:
    result = asyncio.run(_bench(url, _CONCURRENCY.value, requests, None))
  finally:
    if proc is not None:
      proc.send_signal(signal.SIGTERM)
      proc.wait(60)
  if _HF_BASELINE.value:
    if not _WORKDIR.value:
      sys.exit('--hf_baseline needs --workdir.')
    result['hf_generate_decode_tokens_per_sec'] = _hf_generate(_WORKDIR.value)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
