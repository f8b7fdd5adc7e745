"""Interpretability tools (lm/interpret/tools.py) against transformers on an imported GPT-2:
attention probabilities, the logit lens, gradient x input; integrated gradients' completeness."""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')
torch = pytest.importorskip('torch')

from test_convert_hf import hf_dir, hf_model, imported  # noqa: E402

from lm.interpret import tools  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDS = [5, 17, 3, 99, 250, 7, 42, 8]


@pytest.fixture(scope='module')
def gpt2():
  model, params, _, tokenizer = tools.load(imported('gpt2')[0])
  eager = transformers.AutoModelForCausalLM.from_pretrained(  # returns its attentions
      hf_dir('gpt2'), attn_implementation='eager').eval()
  with torch.no_grad():
    out = eager(torch.tensor([IDS]), output_attentions=True, output_hidden_states=True)
  return model, params, tokenizer, out


def test_attention_maps_equal_transformers(gpt2):
  model, params, _, out = gpt2
  probs = tools.attention_maps(model, params, IDS)
  want = np.stack([a[0].numpy() for a in out.attentions])  # [L, N, T, T]
  assert probs.shape == want.shape == (2, 4, 8, 8)
  np.testing.assert_allclose(probs, want, atol=1e-5)
  assert np.allclose(probs.sum(-1), 1) and np.all(np.triu(probs, 1) == 0)  # causal


def test_logit_lens_equals_transformers_hidden_states_through_the_head(gpt2):
  model, params, _, out = gpt2
  lens = tools.logit_lens(model, params, IDS)
  hf = hf_model(hf_dir('gpt2'))
  with torch.no_grad():  # block outputs (the last one already has ln_f), then the head
    hidden = [hf.transformer.ln_f(h) for h in out.hidden_states[1:-1]] + [out.hidden_states[-1]]
    want = np.stack([torch.log_softmax(hf.lm_head(h)[0], -1).numpy() for h in hidden])
  np.testing.assert_allclose(lens, want, atol=2e-4)
  np.testing.assert_allclose(lens[-1], torch.log_softmax(out.logits[0], -1).numpy(), atol=2e-4)


def test_gradient_x_input_equals_torch_and_integrated_gradients_are_complete(gpt2):
  model, params, _, _ = gpt2
  target = 11
  a = tools.attributions(model, params, IDS, target, method='grad_x_input')
  hf = hf_model(hf_dir('gpt2'))
  embeds = hf.transformer.wte(torch.tensor([IDS])).detach().requires_grad_(True)
  logp = torch.log_softmax(hf(inputs_embeds=embeds).logits[0, -1], -1)[target]
  logp.backward()
  want = (embeds.grad * embeds).sum(-1)[0].detach().numpy()
  np.testing.assert_allclose(a.scores, want, rtol=1e-3, atol=1e-5)
  assert a.output == pytest.approx(float(logp), abs=1e-4)
  ig = tools.attributions(model, params, IDS, target, steps=64)
  assert ig.completeness_error < 0.01  # sum of attributions = output - baseline, within 1%
  assert ig.scores.sum() == pytest.approx(ig.output - ig.baseline_output, rel=0.01)
  with pytest.raises(ValueError, match='integrated_gradients'):
    tools.attributions(model, params, IDS, target, method='saliency')


def test_script_writes_each_view(tmp_path):
  workdir = imported('gpt2')[0]
  for what, files in [('attribution', ['attribution.png', 'attribution.json'])]:
    proc = subprocess.run([sys.executable, str(ROOT / 'scripts' / 'interpret.py'),
                           f'--workdir={workdir}', '--prompt=Hello world', f'--what={what}',
                           f'--out={tmp_path}', '--steps=16'], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for f in files:
      assert (tmp_path / f).stat().st_size > 0
  result = json.loads((tmp_path / 'attribution.json').read_text())
  assert result['completeness_error'] < 0.01 and len(result['scores']) == len(result['tokens'])
