"""The sweep plumbing (sweep.py) and the privacy table built on it."""

import dataclasses
import json
import os

import pytest

from dssgd_jax.tools import privacy_table
from dssgd_jax.tools import sweep
from dssgd_jax.errors import ConfigError
from dssgd_jax.run import build
from dssgd_jax.run import config as config_lib

TINY = dict(dataset="digits", model="digits_mlp", num_participants=3,
            samples_per_participant=30, batch_size=10, learning_rate=0.1,
            eval_examples=60, progress=False)
SVT = dict(svt_upload_fraction=0.01, svt_clip_bound=0.01,
           svt_threshold=0.001)


def _base(tmp_path, **kw):
  return build.validate(config_lib.Config(
      workdir=str(tmp_path), **{**TINY, "epochs": 2, **kw}))


def _run(tmp_path, key="dssgd_0.1", **kw):
  base = _base(tmp_path, **kw)
  return sweep.Run(key, "DSSGD θu = 0.1",
                   sweep.run_config(base, key, "dssgd", upload_fraction=0.1))


# ----------------------------------------------------------------------------
# List flags.


def _positive_ints(name, values):
  return sweep.parse_list(name, values, int, lambda x: x > 0,
                          "a positive integer")


@pytest.mark.parametrize("parse,name,values,message", [
    (_positive_ints, "batch_sizes", ["1", "x"],
     "--batch_sizes=1,x: 'x' is not a positive integer."),
    (_positive_ints, "batch_sizes", ["1", "0"],
     "--batch_sizes=1,0: 0 is not a positive integer."),
    (_positive_ints, "batch_sizes", ["2", "2"],
     "--batch_sizes=2,2 lists 2 twice."),
    (sweep.positive_numbers, "svt_epsilons", ["1", "inf"],
     "--svt_epsilons=1,inf: inf is not a positive number."),
    (sweep.positive_numbers, "svt_epsilons", ["a"],
     "--svt_epsilons=a: 'a' is not a positive number."),
    (sweep.fractions, "upload_fractions", ["0.1", "0.10"],
     "--upload_fractions=0.1,0.10 lists 0.10 twice."),
    (sweep.fractions, "upload_fractions", ["1.5"],
     "--upload_fractions=1.5: 1.5 is not a fraction in (0, 1]."),
    (lambda n, v: sweep.parse_choices(n, v, ("centralized", "standalone")),
     "privacy_baselines", ["gossip"],
     "--privacy_baselines=gossip: 'gossip' is not one of: centralized, "
     "standalone."),
    (lambda n, v: sweep.parse_choices(n, v, ("centralized", "standalone")),
     "privacy_baselines", ["standalone", "standalone"],
     "--privacy_baselines=standalone,standalone lists standalone twice."),
])
def test_a_bad_list_flag_is_one_sentence_naming_it(parse, name, values,
                                                   message):
  with pytest.raises(ConfigError) as e:
    parse(name, values)
  assert str(e.value) == message


def test_list_flags_convert_in_order():
  assert _positive_ints("batch_sizes", ["32", "1"]) == [32, 1]
  assert sweep.fractions("upload_fractions", ["1", "0.001"]) == [1.0, 0.001]
  assert sweep.positive_numbers("svt_epsilons", []) == []
  assert sweep.parse_choices("baselines", ["fedavg"],
                             ("standalone", "fedavg")) == ["fedavg"]


def test_a_run_lives_under_the_workdir(tmp_path):
  run = _run(tmp_path)
  assert run.config.workdir == os.path.join(str(tmp_path), "dssgd_0.1")
  assert run.config.algorithm == "dssgd" and run.config.upload_fraction == 0.1
  with pytest.raises(ConfigError, match="--workdir is required"):
    sweep.require_workdir(_base(tmp_path).replace(workdir=""), "the runs")


# ----------------------------------------------------------------------------
# Completeness, divergence, results.


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if isinstance(obj, list):
      f.write("".join(json.dumps(o) + "\n" for o in obj))
    else:
      json.dump(obj, f)


def _metrics(epochs):
  return [{"epoch": e, "participant_accuracy_mean": 0.1 * e,
           "participant_accuracy_min": 0.05 * e,
           "participant_accuracy_max": 0.2 * e, "server_accuracy": None,
           "bytes_up": 8.0, "bytes_down": 16.0, "elapsed_s": 1.5 * e}
          for e in range(1, epochs + 1)]


def test_complete_diverged_and_result_follow_the_run_files(tmp_path):
  run = _run(tmp_path)
  workdir = run.config.workdir
  assert not sweep.is_complete(run) and sweep.diverged(run) is None
  assert sweep.result(run)["status"] == "incomplete"

  _write(os.path.join(workdir, "metrics.jsonl"), _metrics(1))
  _write(os.path.join(workdir, sweep.DIVERGED), {"epoch": 2, "message": "x"})
  assert sweep.diverged(run) == {"epoch": 2, "message": "x"}
  res = sweep.result(run)
  assert res["status"] == "diverged" and res["diverged_at_epoch"] == 2
  assert res["best_accuracy"] == pytest.approx(0.1)

  os.remove(os.path.join(workdir, sweep.DIVERGED))
  _write(os.path.join(workdir, "metrics.jsonl"), _metrics(3))
  _write(os.path.join(workdir, sweep.SUMMARY), {"epochs": 2})
  assert sweep.is_complete(run)
  res = sweep.result(run)  # --epochs=2: the third line is not counted
  assert res["status"] == "complete" and res["epochs_done"] == 2
  assert res["best_epoch"] == 2 and res["elapsed_s"] == 3.0
  assert res["bytes_up_per_epoch"] == 8.0 and res["bytes_up_total"] == 16.0
  assert res["config"] == dataclasses.asdict(run.config)
  assert list(res)[:2] == ["algorithm", "upload_fraction"]


def test_execute_skips_complete_and_diverged_runs_without_loading_data(
    tmp_path):
  done, failed = _run(tmp_path, "a"), _run(tmp_path, "b")
  _write(os.path.join(done.config.workdir, sweep.SUMMARY), {"epochs": 2})
  _write(os.path.join(failed.config.workdir, sweep.DIVERGED), {"epoch": 1})
  logs = []
  assert sweep.execute([done, failed], logs.append, "tool") is None
  assert logs == ["[tool] a: complete, skipped.",
                  "[tool] b: diverged earlier, skipped."]


def test_an_existing_run_with_other_flags_is_refused(tmp_path):
  run = _run(tmp_path)
  sweep.check_existing([run])  # no directory yet
  old = dict(dataclasses.asdict(run.config), learning_rate=0.5)
  _write(os.path.join(run.config.workdir, "config.json"), old)
  _write(os.path.join(run.config.workdir, "checkpoint.npz"), {})
  with pytest.raises(ConfigError, match="--learning_rate=0.5"):
    sweep.check_existing([run])


def test_a_cached_audit_must_be_current_and_complete(tmp_path):
  workdir = str(tmp_path)
  ckpt, path = tmp_path / "checkpoint.npz", tmp_path / "audit.json"
  ckpt.write_bytes(b"")
  audit = {"audit_seed": 0, "num_params": 10, "canary": {"canaries": 0},
           "attacks": {"loss": {}, "margin": {}, "calibrated": {}}}
  _write(str(path), {k: v for k, v in audit.items() if k != "canary"})
  os.utime(ckpt, (1, 1))
  assert sweep.cached_audit(workdir, 0) is None  # from before canaries
  _write(str(path), audit)
  assert sweep.cached_audit(workdir, 0) == audit
  assert sweep.cached_audit(workdir, 1) is None  # another seed
  _write(str(path), dict(audit, attacks={"loss": {}}))
  assert sweep.cached_audit(workdir, 0) is None  # not every attack
  assert sweep.cached_audit(workdir, 0, ("loss",)) is not None
  os.utime(path, (0, 0))
  assert sweep.cached_audit(workdir, 0, ("loss",)) is None  # older


# ----------------------------------------------------------------------------
# Outputs.


def test_outputs_are_replaced_whole(tmp_path):
  path = str(tmp_path / "t.csv")
  sweep.write_text(path, "a,b\r\n1,2\r\n")
  with open(path, newline="") as f:
    assert f.read() == "a,b\r\n1,2\r\n"  # as given
  sweep.write_json(path, {"x": [1]})
  with open(path) as f:
    assert f.read() == json.dumps({"x": [1]}, indent=2)
  assert os.listdir(tmp_path) == ["t.csv"]  # no .tmp left


def test_an_unwritable_output_is_one_sentence_naming_it(tmp_path):
  path = str(tmp_path / "missing" / "table.md")
  with pytest.raises(ConfigError) as e:
    sweep.write_text(path, "x")
  assert str(e.value).startswith(f"Cannot write {path}: ")
  assert "\n" not in str(e.value)
  afile = tmp_path / "a_file"
  afile.write_text("")
  with pytest.raises(ConfigError) as e:
    sweep.make_workdir(str(afile / "sweep"))
  assert str(e.value) == (f"--workdir={afile / 'sweep'} cannot be created: "
                          "Not a directory.")


# ----------------------------------------------------------------------------
# The privacy table on the sweep.


def test_privacy_table_plan(tmp_path):
  base = _base(tmp_path, download_fraction=1.0)
  rows = privacy_table.plan(base, ["centralized", "standalone"], ["0.1"],
                            ["1", "10"], svt_download_fractions=["1", "0.1"],
                            svt_download_rule="most_updated", **SVT)
  assert [r.key for r in rows] == [
      "centralized", "standalone", "dssgd_0.1", "svt_0.01_eps1",
      "svt_0.01_eps10", "svt_0.01_eps1_dl0.1_most_updated",
      "svt_0.01_eps10_dl0.1_most_updated"]
  assert rows[-1].label == ("DSSGD θu = 0.01, θd = 0.1 (most_updated) + SVT, "
                            "ε = 10/epoch")
  assert all(r.config.workdir == os.path.join(str(tmp_path), r.key)
             for r in rows)
  assert rows[0].config.protocol == "parallel"
  assert rows[2].config.noise == "none"
  assert rows[-1].config.noise == "svt" and rows[-1].config.epsilon == 10
  assert rows[-1].config.download_fraction == 0.1


@pytest.mark.parametrize("lists,message", [
    ((["x"], [], []), "--privacy_baselines=x: 'x' is not one of: "
     "centralized, standalone."),
    (([], ["1.5"], []), "--privacy_upload_fractions=1.5: 1.5 is not a "
     "fraction in (0, 1]."),
    (([], ["0.1", "0.1"], []), "--privacy_upload_fractions=0.1,0.1 lists 0.1 "
     "twice."),
    (([], [], ["0"]), "--svt_epsilons=0: 0 is not a positive number."),
    (([], [], []), "--privacy_baselines, --privacy_upload_fractions and "
     "--svt_epsilons are all empty: the table has no rows."),
])
def test_privacy_table_bad_lists(lists, message, tmp_path):
  with pytest.raises(ConfigError) as e:
    privacy_table.plan(_base(tmp_path), *lists, **SVT)
  assert str(e.value) == message


@pytest.mark.slow(seconds=18)
def test_privacy_table_runs_audits_and_reuses(tmp_path):
  base = _base(tmp_path, epochs=1)
  kw = dict(baselines=["standalone"], upload_fractions=[],
            svt_epsilons=["10"], **SVT)
  logs = []
  text = privacy_table.privacy_table(base, log=logs.append, **kw)
  assert (tmp_path / "privacy_table.md").read_text() == text
  claimed, membership = text.split("## Claimed against measured")[1].split(
      "## Membership inference against the models")
  for table in (claimed, membership):
    lines = [l for l in table.splitlines() if l.startswith("| ")]
    assert [l.split(" | ")[0] for l in lines[1:]] == [
        "| Standalone", "| DSSGD θu = 0.01 + SVT, ε = 10/epoch"]
    assert "0 (shares nothing)" in lines[1] and "10 (10/epoch × 1)" in lines[2]
  assert "not audited (--canaries=0)" in claimed
  results = json.loads((tmp_path / "privacy_table.json").read_text())
  assert [r["key"] for r in results["rows"]] == ["standalone", "svt_0.01_eps10"]
  assert sum("run " in l and "/2:" in l for l in logs) == 2
  audits = {k: os.path.getmtime(tmp_path / k / "audit.json")
            for k in ("standalone", "svt_0.01_eps10")}

  logs.clear()  # a rerun runs nothing and audits nothing again
  assert privacy_table.privacy_table(base, log=logs.append, **kw) == text
  assert sum("complete, skipped" in l for l in logs) == 2
  assert not any("run 1/" in l for l in logs)
  for k, t in audits.items():
    assert os.path.getmtime(tmp_path / k / "audit.json") == t
