"""A short DSSGD run on real Fashion-MNIST, offline (Debian's package)."""

import os

import pytest

from dssgd_jax.run import build

from dssgd_jax.run import config as config_lib
from dssgd_jax.run import experiment

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian's dataset-fashion-mnist is not installed "
           "(apt-get install dataset-fashion-mnist)")
def test_short_dssgd_run_on_fashion_mnist_beats_chance(tmp_path):
  cfg = build.validate(config_lib.Config(
      workdir=str(tmp_path), dataset="fashion_mnist", model="mnist_mlp",
      data_source="files", num_participants=5, samples_per_participant=200,
      epochs=3, batch_size=16, learning_rate=0.05, upload_fraction=0.1,
      protocol="round_robin", eval_examples=2000, progress=False))
  summary = experiment.run(cfg)
  # 10 classes: chance is 0.10.
  assert summary["final_participant_accuracy_mean"] > 0.55
  assert summary["final_server_accuracy"] > 0.55
