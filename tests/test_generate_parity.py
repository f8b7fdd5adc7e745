"""Greedy and beam search equal transformers' `generate` token for token (a GPT-2 and a T5 of
random weights, imported with lm.convert.hf), through the library and the CLIs.

One compile per model and decoding kind: eos_id, length_penalty and early_stopping are
traced, so every setting of a kind shares it.
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from lm.convert import hf  # noqa: E402
from conftest import subprocess_env  # noqa: E402
from lm.infer import sampling  # noqa: E402
from lm.infer.load import load_run  # noqa: E402

from test_convert_hf import save_tokenizer  # noqa: E402
from test_convert_t5 import make_t5_checkpoint  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP = tempfile.TemporaryDirectory(prefix='test_generate_parity_')
N = 10  # max_new_tokens
BEAMS = 3
# (length_penalty, early_stopping, which eos: an index into the tokens free beams produce)
BEAM_CASES = [(1.0, False, None), (1.0, False, (0, 2)), (2.0, True, (1, 4)),
              (-0.5, 'never', (0, 5)), (0.7, 'never', (1, 1)), (0.0, True, (0, 2))]


def run_script(*args):
  env = subprocess_env()
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def hf_generate(model, enc, mask, *, num_beams=1, length_penalty=1.0, early_stopping=False,
                eos=None, encdec=False):
  """transformers' outputs as lists: the new ids only, cut after EOS."""
  model.generation_config.eos_token_id = None  # only the eos asked for
  kw = dict(eos_token_id=eos) if eos is not None else {}
  with torch.no_grad():
    out = model.generate(torch.tensor(enc), attention_mask=torch.tensor(mask), do_sample=False,
                         num_beams=num_beams, length_penalty=length_penalty,
                         early_stopping=early_stopping, max_new_tokens=N, pad_token_id=0, **kw)
  rows = out[:, 1 if encdec else len(enc[0]):].tolist()
  return [r[:r.index(eos) + 1] if eos is not None and eos in r else r for r in rows]


def check_parity(model, params, hf_model, prompts, enc, mask, encdec=False):
  """Greedy and every BEAM_CASES setting against transformers; returns how many outputs
  ended early in EOS (so the test knows that EOS was exercised)."""
  early = 0
  free = hf_generate(hf_model, enc, mask, num_beams=BEAMS, encdec=encdec)
  for eos in (None, free[0][1]):
    want = hf_generate(hf_model, enc, mask, eos=eos, encdec=encdec)
    got = sampling.generate(model, params, prompts, max_new_tokens=N, temperature=0.0,
                            eos_id=eos)
    assert got == want, ('greedy', eos)
    early += sum(len(r) < N for r in got)
  for lp, stop, where in BEAM_CASES:
    eos = None if where is None else free[where[0]][where[1]]
    want = hf_generate(hf_model, enc, mask, num_beams=BEAMS, length_penalty=lp,
                       early_stopping=stop, eos=eos, encdec=encdec)
    got = sampling.generate(model, params, prompts, max_new_tokens=N, num_beams=BEAMS,
                            length_penalty=lp, early_stopping=stop, eos_id=eos)
    assert got == want, (lp, stop, eos)
    early += sum(len(r) < N for r in got)
  return early


@pytest.fixture(scope='module')
def gpt2():
  """(hf directory, lm workdir) of a random GPT-2 with large weights (peaked next-token
  distributions: no near ties between candidates)."""
  d = pathlib.Path(TMP.name) / 'hf_gpt2'
  torch.manual_seed(0)
  cfg = transformers.GPT2Config(vocab_size=320, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                initializer_range=0.5, bos_token_id=0, eos_token_id=0)
  transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
  save_tokenizer('bytelevel', d)
  hf.convert_from_hf(d, pathlib.Path(TMP.name) / 'lm_gpt2')
  return d, pathlib.Path(TMP.name) / 'lm_gpt2'


@pytest.fixture(scope='module')
def t5():
  """(hf directory, lm workdir) of a random T5 v1.1 (gated GELU, untied head), imported
  with scanned layers (the beams then gather the cache on its second axis)."""
  d = make_t5_checkpoint(pathlib.Path(TMP.name) / 'hf_t5', seed=0,
                         feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  hf.convert_from_hf(d, pathlib.Path(TMP.name) / 'lm_t5', scan_layers=True)
  return d, pathlib.Path(TMP.name) / 'lm_t5'


def test_decoder_greedy_and_beams_match_transformers(gpt2):
  d, workdir = gpt2
  model, params, _, _ = load_run(workdir)
  prompts = [[5, 6, 7, 8], [90, 100, 3, 44]]  # one length: transformers without padding
  ref = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
  early = check_parity(model, params, ref, prompts, prompts, np.ones((2, 4), np.int64).tolist())
  assert early >= 3


def test_encdec_greedy_and_beams_match_transformers(t5):
  d, workdir = t5
  model, params, config, _ = load_run(workdir)
  assert config.runtime.scan_layers
  prompts = [[5, 6, 7, 8, 9, 1], [40, 50, 60, 1]]  # ragged: right-padded for the encoder
  enc = [p + [0] * (6 - len(p)) for p in prompts]
  mask = [[1] * len(p) + [0] * (6 - len(p)) for p in prompts]
  ref = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  early = check_parity(model, params, ref, prompts, enc, mask, encdec=True)
  assert early >= 3


def test_encdec_sampling(t5):
  """Temperature and top-p for the encoder-decoder (the greedy test's compile: the
  settings are traced)."""
  model, params, _, _ = load_run(t5[1])
  prompts = [[5, 6, 7, 8, 9, 1], [40, 50, 60, 1]]
  greedy = sampling.generate(model, params, prompts, max_new_tokens=N, temperature=0.0)
  sample = lambda **kw: sampling.generate(model, params, prompts, max_new_tokens=N, **kw)
  assert sample(temperature=1.0, top_p=1e-6, seed=3) == greedy  # the nucleus: the top token
  hot = [sample(temperature=3.0, seed=s) for s in (0, 1, 0)]
  assert hot[0] == hot[2] and hot[0] != hot[1] and hot[0] != greedy


def test_sample_script_json_beams(gpt2):
  d, workdir = gpt2
  prompts = [[5, 6, 7, 8], [90, 100, 3, 44]]
  r = run_script('scripts/sample.py', f'--workdir={workdir}', '--ids=5,6,7,8;90,100,3,44',
                 f'--num_beams={BEAMS}', '--length_penalty=2.0', '--early_stopping', '--json',
                 f'--max_new_tokens={N}')
  assert r.returncode == 0, r.stderr[-3000:]
  lines = [json.loads(line) for line in r.stdout.strip().splitlines()]
  ref = transformers.GPT2LMHeadModel.from_pretrained(d).eval()
  want = hf_generate(ref, prompts, np.ones((2, 4), np.int64).tolist(), num_beams=BEAMS,
                     length_penalty=2.0, early_stopping=True, eos=0)  # the tokenizer's EOS
  tokenizer = load_run(workdir)[3]
  assert [line['prompt_ids'] for line in lines] == prompts
  assert [line['token_ids'] for line in lines] == want
  assert [line['text'] for line in lines] == [tokenizer.decode(w) for w in want]


def test_forward_script_matches_transformers_logits(t5, tmp_path):
  d, workdir = t5
  enc, dec = [5, 6, 7, 8, 9, 1], [0, 42, 226, 188]
  r = run_script('scripts/forward.py', f'--workdir={workdir}', f'--ids={",".join(map(str, enc))}',
                 f'--decoder_ids={",".join(map(str, dec))}', f'--out={tmp_path / "x.npy"}')
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / 'x.npy')
  ref = transformers.T5ForConditionalGeneration.from_pretrained(d).eval()
  with torch.no_grad():
    want = ref(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0]
  assert got.shape == (4, ref.config.vocab_size) and got.dtype == np.float32
  np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
