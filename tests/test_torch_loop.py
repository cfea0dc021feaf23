"""benchmarks/torch_loop.py (the PyTorch baseline of ``dssgd_jax.bench``) does
the DSSGD work it claims: each participant downloads a *copy* of the server
vector, trains one local epoch, and uploads the largest θu·D entries of
Δw = new local - downloaded; the server adds the uploads.

Regression: the download used ``vector_to_parameters(server, params)``, which
made the parameters views of the server vector, so training wrote into the
server and every Δw seen by ``torch.topk`` was exactly zero.

PyTorch is an optional extra (``pip install -e .[torch]``); without it these
tests are skipped.
"""

import importlib.util
import math
import os

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="PyTorch (the optional [torch] extra) is not installed; "
    "benchmarks/torch_loop.py is the PyTorch baseline and needs it")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "benchmarks", "torch_loop.py")


def _load_torch_loop():
  spec = importlib.util.spec_from_file_location("dssgd_torch_loop_test",
                                                _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


torch_loop = _load_torch_loop()

SEED = 3
BATCH = 16
SAMPLES = 40  # batches of 16, 16 and a partial 8
THETA_U = 0.1
LR = 0.1


def _data(num, shape, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num, SAMPLES) + shape).astype(np.float32)
  labels = rng.integers(0, 10, (num, SAMPLES)).astype(np.int64)
  return images, labels


def _batch_orders(num):
  """The loop's shuffles: one torch.randperm per participant, in order, from
  a generator seeded with ``seed``."""
  gen = torch.Generator().manual_seed(SEED)
  return [torch.randperm(SAMPLES, generator=gen).numpy() for _ in range(num)]


# -- A plain numpy reference of one participant's epoch of the MLP. ----------


def _mlp_unflatten(vec):
  """torch's parameters() order and layout for mnist_mlp (784-128-64-10):
  Linear weights are (out, in), row-major."""
  shapes = [(128, 784), (128,), (64, 128), (64,), (10, 64), (10,)]
  out, o = [], 0
  for s in shapes:
    n = int(np.prod(s))
    out.append(vec[o:o + n].reshape(s))
    o += n
  assert o == vec.size
  return out


def _mlp_flatten(params):
  return np.concatenate([p.reshape(-1) for p in params])


def _mlp_grads(params, x, y):
  """Gradients of the mean softmax cross-entropy of the ReLU MLP (float64)."""
  w1, b1, w2, b2, w3, b3 = params
  z1 = x @ w1.T + b1
  h1 = np.maximum(z1, 0)
  z2 = h1 @ w2.T + b2
  h2 = np.maximum(z2, 0)
  logits = h2 @ w3.T + b3
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  g = p.copy()
  g[np.arange(len(y)), y] -= 1.0
  g /= len(y)
  gw3, gb3 = g.T @ h2, g.sum(0)
  g2 = (g @ w3) * (z2 > 0)
  gw2, gb2 = g2.T @ h1, g2.sum(0)
  g1 = (g2 @ w2) * (z1 > 0)
  gw1, gb1 = g1.T @ x, g1.sum(0)
  return [gw1, gb1, gw2, gb2, gw3, gb3]


def _numpy_mlp_delta(server, images, labels, order):
  """Δw of one local epoch of plain SGD from ``server`` (float64 numpy)."""
  params = _mlp_unflatten(server.astype(np.float64))
  x = np.transpose(images, (0, 3, 1, 2)).reshape(len(images), -1)
  x = x.astype(np.float64)
  for s in range(0, len(order), BATCH):
    idx = order[s:s + BATCH]
    grads = _mlp_grads(params, x[idx], labels[idx])
    params = [p - LR * g for p, g in zip(params, grads)]
  return _mlp_flatten(params) - server.astype(np.float64)


# -- A separate plain PyTorch loop for the CNNs. -----------------------------


def _torch_delta(model_name, server, images, labels, order):
  """Δw of one local epoch on a fresh module: load a copy of ``server``,
  plain SGD with torch.autograd.grad, no optimizer and no shared storage."""
  model = torch_loop.MODELS[model_name]()
  params = list(model.parameters())
  start = torch.from_numpy(server.copy())
  with torch.no_grad():
    o = 0
    for p in params:
      p.copy_(start[o:o + p.numel()].reshape(p.shape))
      o += p.numel()
  x = torch.from_numpy(np.ascontiguousarray(np.transpose(images,
                                                         (0, 3, 1, 2))))
  y = torch.from_numpy(labels)
  loss_fn = torch.nn.CrossEntropyLoss()
  for s in range(0, len(order), BATCH):
    idx = torch.from_numpy(order[s:s + BATCH])
    loss = loss_fn(model(x[idx]), y[idx])
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
      for p, g in zip(params, grads):
        p -= LR * g
  new = torch.cat([p.detach().reshape(-1) for p in params]).numpy()
  return new.astype(np.float64) - server.astype(np.float64)


# -- Checks. -----------------------------------------------------------------


def _check_upload(top, vals, ref_delta, count, rtol, atol):
  """(top, vals) is a top-``count`` selection of |ref_delta| with its values."""
  top, vals = top.numpy(), vals.numpy().astype(np.float64)
  assert top.shape == (count,) and vals.shape == (count,)
  assert len(np.unique(top)) == count
  mag = np.abs(ref_delta)
  assert mag.max() > 1e-4  # the epoch moved the weights
  assert np.abs(vals).max() > 1e-4  # the old bug: every uploaded value was 0
  np.testing.assert_allclose(vals, ref_delta[top], rtol=rtol, atol=atol)
  rest = np.ones(ref_delta.size, bool)
  rest[top] = False
  # The largest entries of the reference Δw, up to float ties at the cut.
  assert mag[top].min() >= mag[rest].max() - 2 * atol


def _run_epoch(model_name, shape, num, rtol, atol, reference):
  images, labels = _data(num, shape)
  tl = torch_loop.TorchDSSGD(model_name, images, labels, BATCH, THETA_U,
                             learning_rate=LR, seed=SEED)
  server0 = tl.server.clone().numpy()
  count = math.ceil(THETA_U * tl.d - 1e-9)
  assert tl.count == count
  tl.epoch()
  server1 = tl.server.numpy()
  uploads = tl.last_uploads
  assert len(uploads) == num
  orders = _batch_orders(num)
  expected = np.zeros(tl.d, np.float64)
  touched = np.zeros(tl.d, bool)
  for i, (top, vals) in enumerate(uploads):
    # Parallel protocol: every participant starts from the same server.
    ref = reference(model_name, server0, images[i], labels[i], orders[i])
    _check_upload(top, vals, ref, count, rtol, atol)
    np.add.at(expected, top.numpy(), vals.numpy().astype(np.float64))
    touched[top.numpy()] = True
  # The server changed by exactly the uploads: nowhere else, and by their sum
  # where they land (the old bug wrote the whole local epoch into it).
  np.testing.assert_array_equal(server1[~touched], server0[~touched])
  np.testing.assert_allclose(server1[touched] - server0[touched],
                             expected[touched], rtol=1e-5, atol=1e-6)
  assert (server1 != server0).sum() > 0
  return tl


def _mlp_reference(model_name, server, images, labels, order):
  assert model_name == "mnist_mlp"
  return _numpy_mlp_delta(server, images, labels, order)


def test_mlp_uploads_equal_numpy_reference():
  _run_epoch("mnist_mlp", (28, 28, 1), num=2, rtol=1e-4, atol=2e-6,
             reference=_mlp_reference)


@pytest.mark.parametrize("model_name,shape", [("mnist_cnn", (32, 32, 1)),
                                              ("svhn_cnn", (32, 32, 3))])
def test_cnn_uploads_equal_plain_torch_loop(model_name, shape):
  _run_epoch(model_name, shape, num=2, rtol=1e-4, atol=2e-6,
             reference=_torch_delta)


def test_second_epoch_starts_from_updated_server():
  """Epoch 2 downloads the server after epoch 1's uploads (not the local
  models): its Δw matches the numpy reference from that server."""
  images, labels = _data(2, (28, 28, 1), seed=1)
  tl = torch_loop.TorchDSSGD("mnist_mlp", images, labels, BATCH, THETA_U,
                             learning_rate=LR, seed=SEED)
  tl.epoch()
  server1 = tl.server.clone().numpy()
  gen = torch.Generator().manual_seed(SEED)
  orders = [torch.randperm(SAMPLES, generator=gen).numpy() for _ in range(4)]
  tl.epoch()
  for i, (top, vals) in enumerate(tl.last_uploads):
    ref = _numpy_mlp_delta(server1, images[i], labels[i], orders[2 + i])
    _check_upload(top, vals, ref, tl.count, rtol=1e-4, atol=2e-6)
