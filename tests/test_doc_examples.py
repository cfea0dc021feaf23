"""The Python examples of README.md and docs/api.md run as written.

Each block is read from its file and run in a fresh process in a temporary
directory (its ``runs/...`` paths land there), with only the number of
epochs cut down (named below). What it prints is checked.
"""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks(doc: str) -> list[str]:
  with open(os.path.join(REPO, doc)) as f:
    text = f.read()
  return [b for b in re.findall(r"```python\n(.*?)```", text, re.S)
          if not b.lstrip().startswith(">>>")]


def _run(code: str, tmp_path, *cuts) -> str:
  for old, new in cuts:
    assert old in code, f"the example no longer holds {old!r}"
    code = code.replace(old, new)
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow(seconds=15)
def test_the_readme_plan_example_runs(tmp_path):
  (code,) = _blocks("README.md")
  out = _run(code, tmp_path, ("epochs=20,", "epochs=2,"))
  assert "Claim(epsilon=20.0, delta=0.0" in out  # plan.claim(20)
  summary = out.strip().splitlines()[-1]
  assert summary.startswith("dssgd: 2 epochs, participant accuracy ")
  assert "epsilon 2," in summary  # 1 per epoch, from the rule that ran
  assert (tmp_path / "runs" / "custom" / "summary.json").exists()


@pytest.mark.slow(seconds=20)
def test_the_api_examples_run(tmp_path):
  # The first two blocks; the last one lists signatures, not a program.
  run_layer, by_hand = _blocks("docs/api.md")[:2]
  out = _run(run_layer, tmp_path,
             ('workdir="runs/digits"', 'epochs=2, workdir="runs/digits"'))
  assert "Audit of" in out and "participant accuracy" in out, out
  out = _run(by_hand, tmp_path, ("for e in range(10):", "for e in range(2):"))
  lines = out.strip().splitlines()
  assert [l.split()[0] for l in lines[:2]] == ["1", "2"]
  assert "uploaded 1725 of 17258 entries" in lines[0]
  assert lines[-1] == ("no rule adds noise, so the uploaded values are the "
                       "participant's update itself.")  # why no guarantee
