"""make_evaluator counts exactly what a straightforward per-model loop counts:
argmax of ``model.apply`` on every test image, compared with the label, for
each model; on either lowering, any chunk size, test sets that are not a
multiple of the chunk, and a model stack split over devices."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import evaluation
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib

NUM_MODELS = 3
NUM_TEST = 37  # prime: never a multiple of the chunk


def _setup(name, num_models=NUM_MODELS, num_test=NUM_TEST, seed=0):
  model = models_lib.get_model(name)
  shape = models_lib.INPUT_SHAPES[name]
  flat, unravel = participant_lib.flatten_params(
      models_lib.init_params(model, shape, jax.random.key(seed)))
  noise = jax.random.normal(jax.random.key(seed + 1),
                            (num_models,) + flat.shape)
  stack = np.asarray(flat[None] + 0.3 * noise, np.float32)
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_test,) + shape).astype(np.float32)
  labels = rng.integers(0, 10, num_test).astype(np.int32)
  # Model 0 predicts the first half right, so accuracies differ by model.
  first = np.asarray(jnp.argmax(model.apply(unravel(stack[0]), images), -1))
  half = num_test // 2
  labels[:half] = first[:half]
  return model, unravel, stack, images, labels


def _reference_counts(model, unravel, stack, images, labels):
  """Correct predictions of each model, one model at a time."""
  counts = []
  for p in range(stack.shape[0]):
    logits = np.asarray(model.apply(unravel(jnp.asarray(stack[p])), images))
    counts.append(int(np.sum(np.argmax(logits, -1) == labels)))
  return np.asarray(counts)


def _assert_exact(acc, counts, num):
  acc = np.asarray(acc)
  assert acc.shape == counts.shape
  # Exact counts; the division by T is float32 (XLA may multiply by 1/T).
  np.testing.assert_array_equal(np.rint(acc * num).astype(int), counts)
  np.testing.assert_allclose(acc, counts / num, rtol=3e-7, atol=0)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
@pytest.mark.parametrize("lowering,chunk", [
    (None, None), ("map", 8), ("map", 1), ("map", 64), ("vmap", None),
    ("vmap", 8)])
def test_matches_per_model_reference(name, lowering, chunk):
  model, unravel, stack, images, labels = _setup(name)
  counts = _reference_counts(model, unravel, stack, images, labels)
  assert counts[0] >= NUM_TEST // 2 and len(set(counts.tolist())) > 1
  evaluate = evaluation.make_evaluator(model.apply, unravel, images, labels,
                                       NUM_MODELS, chunk=chunk,
                                       lowering=lowering)
  _assert_exact(evaluate(jnp.asarray(stack)), counts, NUM_TEST)
  # Called again (cached program) and with a host array: the same counts.
  _assert_exact(evaluate(stack), counts, NUM_TEST)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn"])
def test_default_chunk_pads_a_partial_last_chunk(name, monkeypatch):
  """The default map chunk comes from the traced forward bytes per example;
  a small budget makes it 10 here, so 37 examples are 4 chunks of 10 with 3
  masked padding examples."""
  model, unravel, stack, images, labels = _setup(name)
  per_example = evaluation.forward_bytes_per_example(
      model.apply, unravel,
      jax.ShapeDtypeStruct(stack.shape[1:], jnp.float32),
      jax.ShapeDtypeStruct(images.shape[1:], jnp.float32))
  assert per_example > 4 * int(np.prod(images.shape[1:]))
  monkeypatch.setattr(evaluation, "_CPU_STEP_BYTES", 10 * per_example)
  monkeypatch.setattr(evaluation, "_MIN_CHUNK", 1)
  seen = []
  pad_chunks = evaluation._pad_chunks
  monkeypatch.setattr(evaluation, "_pad_chunks", lambda x, y, c: (
      seen.append(c), pad_chunks(x, y, c))[1])
  evaluate = evaluation.make_evaluator(model.apply, unravel, images, labels,
                                       NUM_MODELS, lowering="map")
  acc = evaluate(jnp.asarray(stack))
  assert seen == [10]
  _assert_exact(acc, _reference_counts(model, unravel, stack, images, labels),
                NUM_TEST)


def test_one_model_and_forward_bytes():
  """The server's evaluator (one model); the CNN's traced intermediates per
  example exceed the MLP's."""
  model, unravel, stack, images, labels = _setup("digits_cnn")
  evaluate = evaluation.make_evaluator(model.apply, unravel, images, labels, 1)
  _assert_exact(evaluate(jnp.asarray(stack[:1])),
                _reference_counts(model, unravel, stack[:1], images, labels),
                NUM_TEST)
  sizes = {}
  for name in ("digits_mlp", "digits_cnn"):
    m = models_lib.get_model(name)
    flat, unr = participant_lib.flatten_params(models_lib.init_params(
        m, (8, 8, 1), jax.random.key(0)))
    sizes[name] = evaluation.forward_bytes_per_example(
        m.apply, unr, jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        jax.ShapeDtypeStruct((8, 8, 1), jnp.float32))
  assert sizes["digits_cnn"] > sizes["digits_mlp"] > 0


def test_rejects_unknown_lowering():
  model, unravel, _, images, labels = _setup("digits_mlp")
  with pytest.raises(ValueError, match="lowering"):
    evaluation.make_evaluator(model.apply, unravel, images, labels, 3,
                              lowering="pmap")


_WORKER = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, sys.argv[1])
import test_evaluation as t
from dssgd_jax import evaluation
out = {"devices": jax.device_count()}
for name in ("digits_mlp", "digits_cnn"):
  model, unravel, stack, images, labels = t._setup(name, num_models=4)
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("participants",))
  split = jax.device_put(stack, NamedSharding(mesh, PartitionSpec(
      "participants", None)))
  ev = evaluation.make_evaluator(model.apply, unravel, images, labels, 4,
                                 chunk=8, lowering="map")
  out[name] = {
      "acc": np.asarray(ev(split)).tolist(),
      "counts": t._reference_counts(model, unravel, stack, images,
                                    labels).tolist(),
      "mesh": str(evaluation._participant_mesh(split)[1])}
print(json.dumps(out))
"""


def test_stack_split_over_devices():
  """A (P, D) stack split over a 2-device mesh is scored per device
  (shard_map) with the same counts."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      " --xla_force_host_platform_device_count=2")
  proc = subprocess.run(
      [sys.executable, "-c", _WORKER,
       os.path.dirname(os.path.abspath(__file__))],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["devices"] == 2
  for name in ("digits_mlp", "digits_cnn"):
    assert got[name]["mesh"] == "participants"
    _assert_exact(np.asarray(got[name]["acc"], np.float32),
                  np.asarray(got[name]["counts"]), NUM_TEST)
