"""The notebooks execute, cell by cell, in their small settings.

Each notebook in ``notebooks/`` is run with nbclient in a fresh Jupyter kernel
of *this* Python (so the package under test is the one imported), with the
working directory ``notebooks/`` as a user would have it, and with

* ``DSSGD_NOTEBOOK_SMALL=1``: every notebook's small setting (bundled digits,
  a few epochs; ``colab_tpu.ipynb`` also takes its CPU setting);
* ``DSSGD_NOTEBOOK_RUNS``: the run directories go to a temporary directory.

A cell that raises fails the test with the cell's traceback. The notebook is
executed in memory; the committed file is not rewritten. A second check
verifies that the committed notebooks carry the outputs of a real run (every
code cell executed, in order, without errors, and the figures present).
"""

import json
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = ("quickstart.ipynb", "custom_experiment.ipynb",
             "colab_tpu.ipynb")
CELL_TIMEOUT_S = 300
# Figures (image/png outputs) each notebook draws in any setting.
MIN_FIGURES = {"quickstart.ipynb": 2, "custom_experiment.ipynb": 2,
               "colab_tpu.ipynb": 4}


def _kernel_path(tmp_path) -> str:
  """A JUPYTER_PATH whose ``python3`` kernel is ``sys.executable``.

  Without it a ``python3`` kernelspec in the user's Jupyter directory (which
  takes precedence over this environment's) could run another Python.
  """
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "Python 3 (tests)",
      "language": "python",
  }))
  return str(tmp_path / "jupyter")


def _figures(nb) -> int:
  return sum(1 for cell in nb.cells if cell.cell_type == "code"
             for out in cell.get("outputs", [])
             if "image/png" in out.get("data", {}))


def _errors(nb) -> list[str]:
  return [f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
          for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
          for out in cell.get("outputs", []) if out.output_type == "error"]


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_in_small_setting(name, tmp_path, monkeypatch):
  monkeypatch.setenv("DSSGD_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("DSSGD_NOTEBOOK_RUNS", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("JUPYTER_PATH", _kernel_path(tmp_path))
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": NOTEBOOK_DIR}})
  client.execute()  # raises CellExecutionError with the cell's traceback
  assert not _errors(nb)
  assert _figures(nb) >= MIN_FIGURES[name], (
      f"{name} drew {_figures(nb)} figures, expected {MIN_FIGURES[name]}")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_carries_outputs_of_a_run(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  counts = [c.get("execution_count") for c in code]
  assert all(isinstance(n, int) for n in counts), (
      f"{name}: not every code cell was executed ({counts})")
  assert counts == sorted(counts) and len(set(counts)) == len(counts), (
      f"{name}: cells were not executed once each, top to bottom ({counts})")
  assert not _errors(nb), _errors(nb)
  assert _figures(nb) >= MIN_FIGURES[name]
  # Each notebook says what it shows and what a reader should see.
  intro = nb.cells[0]
  assert intro.cell_type == "markdown" and "What you should see" in (
      intro.source)
