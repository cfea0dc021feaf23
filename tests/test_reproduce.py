"""The Table 4 command (reproduce.py) end to end on the bundled digits."""

import csv
import json
import os
import subprocess
import sys

import pytest

from dssgd_jax.run import build

from dssgd_jax.run import config as config_lib
from dssgd_jax.tools import reproduce
from dssgd_jax.tools import sweep as sweep_lib
from dssgd_jax.errors import ConfigError

from cli_helpers import jit_env as _jit_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ARGS = ["--flagfile=configs/quickstart.cfg", "--epochs=3",
        "--model=digits_mlp", "--num_participants=6",
        "--samples_per_participant=60", "--eval_examples=120",
        "--upload_fractions=1,0.1,0.001", "--noprogress"]
ROWS = ["centralized", "dssgd_1", "dssgd_0.1", "dssgd_0.001", "standalone",
        "fedavg"]


@pytest.fixture(scope="module")
def env():
  return _jit_env()


def _reproduce(args, env):
  return subprocess.run([sys.executable, "-m", "dssgd_jax.reproduce", *args],
                        capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=600)


@pytest.mark.slow(seconds=60)
def test_table_figures_results_and_a_rerun_that_skips(tmp_path, env):
  # One test, so that the sweep runs once whichever worker runs it.
  workdir = tmp_path / "table"
  out = _reproduce([*ARGS, f"--workdir={workdir}"], env)
  assert out.returncode == 0, out.stderr
  table = (workdir / "table.md").read_text()
  assert table in out.stdout  # also printed
  for label in ("Centralized SGD", "DSSGD θu = 1 ", "DSSGD θu = 0.1 ",
                "DSSGD θu = 0.001 ", "Standalone", "FedAvg"):
    line = next(l for l in table.splitlines() if l.startswith(f"| {label}"))
    best = float(line.split("|")[2])
    assert 0.0 < best <= 1.0, line
  assert "M = 16, k = 0.05" in table  # the preset's column
  assert "paper" not in table.splitlines()[4]  # digits is not in the paper

  for name in ("figure.png", "figure_bytes.png"):
    data = (workdir / name).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000, name

  results = json.loads((workdir / "results.json").read_text())
  by_row = {r["row"]: r for r in results["runs"]}
  assert sorted(by_row) == sorted(ROWS)
  assert all(r["status"] == "complete" for r in by_row.values())
  d = by_row["dssgd_1"]["metrics"][0]["num_params"]
  # Communication per participant per epoch (SPEC section 6).
  assert by_row["dssgd_1"]["bytes_up_per_epoch"] == 4 * d  # dense
  assert by_row["dssgd_0.1"]["bytes_up_per_epoch"] == 8 * -(-d // 10)
  assert by_row["dssgd_0.001"]["bytes_up_per_epoch"] == 8 * -(-d // 1000)
  assert by_row["dssgd_0.1"]["bytes_down_per_epoch"] == 4 * d  # θd = 1
  assert by_row["fedavg"]["bytes_up_per_epoch"] == 4 * d
  for row in ("centralized", "standalone"):
    assert by_row[row]["bytes_up_total"] == 0
  assert by_row["fedavg"]["accuracy_metric"] == "server_accuracy"

  with open(workdir / "results.csv") as f:
    lines = list(csv.DictReader(f))
  assert len(lines) == len(ROWS) * 3
  assert {l["run"] for l in lines} == {f"{r}_bs16_lr0.05" for r in ROWS}
  for r in ROWS:
    summary = json.loads((workdir / f"{r}_bs16_lr0.05" /
                          "summary.json").read_text())
    assert summary["epochs"] == 3

  # A rerun of the same command skips every complete run.
  ckpts = {r: os.path.getmtime(workdir / f"{r}_bs16_lr0.05" /
                               "checkpoint.npz") for r in ROWS}
  table = (workdir / "table.md").read_text()
  out = _reproduce([*ARGS, f"--workdir={workdir}"], env)
  assert out.returncode == 0, out.stderr
  assert out.stderr.count("complete, skipped") == len(ROWS)
  assert "run 1/" not in out.stderr
  for r, t in ckpts.items():
    assert os.path.getmtime(workdir / f"{r}_bs16_lr0.05" /
                            "checkpoint.npz") == t
  assert (workdir / "table.md").read_text() == table


def test_a_diverging_row_is_reported_and_the_sweep_goes_on(tmp_path):
  # Huge upload noise overflows the server's vector after epoch 1, so DSSGD
  # diverges in epoch 2; the standalone baseline runs without noise.
  base = build.validate(config_lib.Config(
      workdir=str(tmp_path), dataset="digits", model="digits_mlp",
      num_participants=3, samples_per_participant=30, batch_size=10,
      learning_rate=0.1, epochs=2, eval_examples=60, protocol="parallel",
      noise="laplace", noise_scale=1e30, progress=False))
  logs = []
  table = reproduce.reproduce(base, upload_fractions=["0.1"],
                              baselines=["standalone"], log=logs.append)
  line = next(l for l in table.splitlines() if l.startswith("| DSSGD"))
  assert "diverged, epoch 2" in line
  assert any("diverged" in l and "Epoch 2" in l for l in logs)
  standalone = next(l for l in table.splitlines()
                    if l.startswith("| Standalone"))
  assert "diverged" not in standalone
  # A rerun does not retry the diverged run.
  logs.clear()
  reproduce.reproduce(base, upload_fractions=["0.1"],
                      baselines=["standalone"], log=logs.append)
  assert any("diverged earlier, skipped" in l for l in logs)
  assert not any("run 1/" in l for l in logs)


def test_completeness_follows_the_requested_epochs(tmp_path):
  base = build.validate(config_lib.Config(
      workdir=str(tmp_path), dataset="digits", num_participants=4,
      samples_per_participant=50, epochs=3))
  _, _, runs = reproduce.plan(base, [], [], ["0.1"], [])
  (run,) = runs
  assert run.key == "dssgd_0.1_bs32_lr0.01"
  assert run.label == "DSSGD θu = 0.1, batch size 32, learning rate 0.01"
  assert not sweep_lib.is_complete(run)
  os.makedirs(run.config.workdir)
  summary = os.path.join(run.config.workdir, "summary.json")
  with open(summary, "w") as f:
    json.dump({"epochs": 2}, f)
  assert not sweep_lib.is_complete(run)  # --epochs=3 asks for more
  with open(summary, "w") as f:
    json.dump({"epochs": 3}, f)
  assert sweep_lib.is_complete(run)


def test_plan_rows_columns_and_overrides(tmp_path):
  base = build.validate(config_lib.Config(
      workdir=str(tmp_path), dataset="digits", num_participants=4,
      samples_per_participant=50, noise="laplace", noise_scale=1e-3))
  rows, columns, runs = reproduce.plan(
      base, ["1", "32"], ["0.01", "0.001"], ["0.1", "0.01"],
      ["centralized", "standalone", "fedavg"])
  assert rows == ["centralized", "dssgd_0.1", "dssgd_0.01", "standalone",
                  "fedavg"]
  assert [c[0] for c in columns] == ["bs1_lr0.01", "bs1_lr0.001",
                                     "bs32_lr0.01", "bs32_lr0.001"]
  assert len(runs) == 20 and len({r.config.workdir for r in runs}) == 20
  for r in runs:
    if r.row == "fedavg":
      assert r.config.protocol == "parallel" and r.config.noise == "none"
    if r.row.startswith("dssgd"):
      assert r.config.noise == "laplace"  # the preset's noise applies


@pytest.mark.parametrize("lists,flag", [
    ((["0"], [], ["0.1"], []), "--batch_sizes"),
    ((["x"], [], ["0.1"], []), "--batch_sizes"),
    ((["64"], [], ["0.1"], []), "--batch_sizes"),  # > 50 samples
    (([], ["-1"], ["0.1"], []), "--learning_rates"),
    (([], [], ["1.5"], []), "--upload_fractions"),
    (([], [], ["0"], []), "--upload_fractions"),
    (([], [], ["0.1", "0.1"], []), "--upload_fractions"),
    (([], [], [], ["gossip"]), "--baselines"),
    (([], [], [], ["standalone", "standalone"]), "--baselines"),
    (([], [], [], []), "--upload_fractions"),
])
def test_bad_sweep_flags(lists, flag, tmp_path):
  base = build.validate(config_lib.Config(
      workdir=str(tmp_path), dataset="digits", num_participants=4,
      samples_per_participant=50))
  with pytest.raises(ConfigError, match=flag):
    reproduce.plan(base, *lists)


def test_bad_sweep_flag_through_the_cli(tmp_path, env):
  out = _reproduce([*ARGS, f"--workdir={tmp_path}", "--batch_sizes=1,0"],
                   env)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: --batch_sizes=1,0: 0 is not a positive integer."]
  assert os.listdir(tmp_path) == []  # nothing started


def test_paper_column_for_svhn():
  base = build.validate(config_lib.Config(
      workdir="/nonexistent", dataset="svhn_cropped", num_participants=4,
      samples_per_participant=50))
  rows, columns, runs = reproduce.plan(base, [], [], ["0.1", "0.01"],
                                       ["centralized", "standalone"])
  results = {r.key: {"best_accuracy": 0.5, "status": "complete",
                     "bytes_up_per_epoch": 8.0, "elapsed_s": 1.0}
             for r in runs}
  table = reproduce.markdown_table(base, rows, columns, results)
  assert "paper (SVHN" in table
  for row, paper in (("Centralized SGD", "0.8819"), ("DSSGD θu = 0.1 ",
                                                      "0.8274"),
                     ("DSSGD θu = 0.01 ", "0.7548"), ("Standalone", "0.5211")):
    line = next(l for l in table.splitlines() if l.startswith(f"| {row}"))
    assert f"| {paper} |" in line, line


def test_help():
  out = subprocess.run([sys.executable, "-m", "dssgd_jax.reproduce", "--help"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
  text = out.stdout + out.stderr
  for needle in ("--batch_sizes", "--learning_rates", "--upload_fractions",
                 "--baselines", "table.md", "figure.png"):
    assert needle in text, needle
