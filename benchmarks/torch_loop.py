"""The PyTorch baseline of ``python -m dssgd_jax.bench``: a Python loop over
participants doing the work of one DSSGD epoch with the same models.

Per participant: download (copy the server vector into the model), one local
epoch of plain minibatch SGD (same batch size, shuffled, last batch partial),
Δw, the ``largest`` θu·D entries by ``torch.topk`` on |Δw|, and the server's
scatter-add. PyTorch is optional (``pip install torch``); the benchmark reports
``null`` for the PyTorch columns without it.
"""

import math
import time

import numpy as np

try:
  import torch
  from torch import nn
except ImportError:  # pragma: no cover - exercised where torch is absent
  torch = None


def available() -> bool:
  return torch is not None


def _svhn_cnn():
  return nn.Sequential(
      nn.Conv2d(3, 64, 5), nn.Tanh(), nn.MaxPool2d(2),
      nn.Conv2d(64, 64, 5), nn.Tanh(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(1600, 128), nn.Tanh(), nn.Linear(128, 10))


def _mnist_cnn():
  return nn.Sequential(
      nn.Conv2d(1, 32, 5), nn.Tanh(), nn.MaxPool2d(3, 3),
      nn.Conv2d(32, 64, 5), nn.Tanh(), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(256, 200), nn.Tanh(), nn.Linear(200, 10))


def _mnist_mlp():
  return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(),
                       nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


MODELS = {"svhn_cnn": _svhn_cnn, "mnist_cnn": _mnist_cnn,
          "mnist_mlp": _mnist_mlp}


def _download(server, params):
  """Copies the server vector into the model's parameters (θd = 1).

  A copy, not ``vector_to_parameters(server, params)``: that makes every
  parameter a view of ``server``, so the local epoch would write into the
  server vector itself and Δw (local - server) would be exactly zero.
  """
  offset = 0
  for p in params:
    n = p.numel()
    p.copy_(server[offset:offset + n].view_as(p))
    offset += n


class TorchDSSGD:
  """P participants' models, their data, a server vector, one epoch at a time.

  Args:
    model: a key of :data:`MODELS`.
    images: (P, n, H, W, C) float32 numpy (converted to NCHW once).
    labels: (P, n) int.
    batch_size: M.
    upload_fraction: θu.
    learning_rate: k.
    threads: torch intra-op threads (None: PyTorch's default).
    device: ``cpu`` or ``cuda``.
  """

  def __init__(self, model, images, labels, batch_size, upload_fraction,
               learning_rate=0.01, threads=None, seed=0, device="cpu"):
    if torch is None:
      raise ImportError("PyTorch is not installed")
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(seed)
    self.num = images.shape[0]
    self.batch_size = batch_size
    self.lr = learning_rate
    self.device = torch.device(device)
    self.x = torch.from_numpy(np.ascontiguousarray(
        np.transpose(images, (0, 1, 4, 2, 3)))).float().to(self.device)
    self.y = torch.from_numpy(np.asarray(labels)).long().to(self.device)
    self.models = [MODELS[model]().to(self.device) for _ in range(self.num)]
    self.params = [list(m.parameters()) for m in self.models]
    flat = torch.nn.utils.parameters_to_vector(self.params[0]).detach()
    self.server = flat.clone()
    self.d = flat.numel()
    self.count = min(self.d, math.ceil(upload_fraction * self.d - 1e-9))
    self.loss_fn = nn.CrossEntropyLoss()
    self.gen = torch.Generator().manual_seed(seed)
    # The last epoch's uploads, one (indices, values) pair per participant.
    self.last_uploads = []

  def epoch(self) -> float:
    """One DSSGD epoch (parallel protocol semantics); returns seconds."""
    t0 = time.perf_counter()
    n = self.x.shape[1]
    updates = []
    for i in range(self.num):
      model, params = self.models[i], self.params[i]
      with torch.no_grad():
        _download(self.server, params)
      before = self.server  # not written by the local epoch: params are copies
      perm = torch.randperm(n, generator=self.gen).to(self.device)
      for s in range(0, n, self.batch_size):
        idx = perm[s:s + self.batch_size]
        xb, yb = self.x[i, idx], self.y[i, idx]
        for p in params:
          p.grad = None
        loss = self.loss_fn(model(xb), yb)
        loss.backward()
        with torch.no_grad():
          for p in params:
            p.add_(p.grad, alpha=-self.lr)
      with torch.no_grad():
        delta = torch.nn.utils.parameters_to_vector(params) - before
        _, top = torch.topk(delta.abs(), self.count, sorted=False)
        updates.append((top, delta[top]))
    with torch.no_grad():
      server = self.server.clone()
      for top, vals in updates:
        server.index_add_(0, top, vals)
      self.server = server
    self.last_uploads = updates
    if self.device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - t0
