"""plot.py (figures of a run or a sweep).

It works on files alone, so these tests write synthetic metrics and need no
training.
"""

import json
import os
import struct
import subprocess
import sys

import pytest

from dssgd_jax.run import figures as plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(epochs, acc0=0.3, up=800.0):
  rows = []
  for e in range(1, epochs + 1):
    acc = acc0 + 0.05 * e
    rows.append(dict(epoch=e, participant_accuracy_mean=acc,
                     participant_accuracy_min=acc - 0.1,
                     participant_accuracy_max=acc + 0.05,
                     server_accuracy=acc + 0.01, train_loss=2.0 / e,
                     uploaded_entries=up / 8, downloaded_entries=100.0,
                     bytes_up=up, bytes_down=400.0, epsilon_spent=None,
                     wall_time_s=0.1, elapsed_s=0.1 * e))
  return rows


def _write_run(path, rows, torn=False, algorithm="dssgd"):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
    if torn:
      f.write('{"epoch": 99, "participant_acc')  # a run writing right now
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dict(algorithm=algorithm, upload_fraction=0.1, dataset="digits",
                   model="digits_mlp", num_participants=4,
                   samples_per_participant=50, batch_size=10,
                   learning_rate=0.1), f)


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_MAGIC, path
  return struct.unpack(">II", head[16:24])


def test_plot_a_running_run(tmp_path):
  _write_run(tmp_path, _rows(5), torn=True)
  paths = plot.plot(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == [
      "accuracy.png", "accuracy_vs_bytes.png"]
  for p in paths:
    w, h = _png_size(p)
    assert w > 400 and h > 300
    assert os.path.getsize(p) > 10_000  # axes, curves and text, not blank


def test_plot_a_sweep_directory_cli(tmp_path):
  _write_run(tmp_path / "dssgd_0.1", _rows(4))
  _write_run(tmp_path / "standalone", _rows(4, 0.2, up=0.0),
             algorithm="standalone")
  _write_run(tmp_path / "fedavg", _rows(2, 0.1, up=4e4), algorithm="fedavg")
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.plot",
                        str(tmp_path)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
  assert out.returncode == 0, out.stderr
  for name in ("figure.png", "figure_bytes.png"):
    assert str(tmp_path / name) in out.stdout
    _png_size(tmp_path / name)


def test_plot_errors_are_one_line(tmp_path):
  for args in ([str(tmp_path / "missing")], [str(tmp_path)], []):
    out = subprocess.run([sys.executable, "-m", "dssgd_jax.plot", *args],
                         capture_output=True, text=True, cwd=REPO,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert out.stderr.startswith("error:")


def test_plot_help():
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.plot", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  assert "python -m dssgd_jax.plot WORKDIR" in out.stdout + out.stderr


@pytest.mark.parametrize("name", ["config.json", "reproduce.json"])
def test_corrupt_json_is_one_line(tmp_path, name):
  _write_run(tmp_path / "r", _rows(2))
  target = tmp_path / "r" / name if name == "config.json" else tmp_path / name
  target.write_text("{not json")
  workdir = tmp_path / "r" if name == "config.json" else tmp_path
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.plot", str(workdir)],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       check=False)
  assert out.returncode == 2, out.stderr
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), out.stderr
  assert str(target) in lines[0]
