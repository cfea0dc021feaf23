r"""Speed of one DSSGD epoch: the participant axis against loops, and the rest.

Usage::

  python -m dssgd_jax.bench            # full run (about 10-15 minutes on 2 cores)
  python -m dssgd_jax.bench --quick    # 3-4 minutes on 2 CPU cores
  python -m dssgd_jax.bench --models=svhn_cnn --batch_sizes=32

Prints human-readable tables and, as its LAST line, one JSON object. Measured
side by side in one process, repeats interleaved (round r runs every contender
once) and the median taken, because timings on a shared machine drift:

* samples/s of one DSSGD epoch (download θd = 1, one local epoch of SGD,
  ``largest`` θu = 0.1 selection, server update; 30 participants) done
  - ``axis``: the ``parallel`` protocol, one jitted program with the
    participant axis (``protocols.parallel``);
  - ``loop``: a Python loop over participants and minibatches calling a jitted
    single-participant SGD step (the FedJAX way), then jitted selection and
    server update;
  - ``epoch_loop``: a Python loop over participants calling a jitted
    single-participant local epoch (``lax.scan``) plus selection — a stronger
    loop than the FedJAX one, reported for transparency;
  - ``round_robin``: the paper's protocol (the presets'): the same epoch with
    participants one after another inside one jitted program
    (``protocols.round_robin``, a ``lax.scan``);
  - ``round_robin_4seeds``: four independent runs (``--seeds``) of it as one
    program, the seed axis lowered as ``--num_seeds`` lowers it by default
    (``lax.map`` on CPU, ``vmap`` on GPU/TPU), and ``round_robin_4seeds_vmap``
    (or ``_map``) the other lowering; samples/s count all four runs' work;
  - ``torch``: the same work with PyTorch (``benchmarks/torch_loop.py``, best
    of 1 and all threads), when PyTorch is installed (participants one after
    another, like ``round_robin``);
  at batch 32 and batch 1, for ``svhn_cnn`` and ``mnist_cnn``;
* model FLOP/s of the ``axis`` epoch (XLA's count of one training step with
  native convolutions, per example) against a 2048x2048 f32 matmul measured
  in the same rounds;
* selection on 30 x D(svhn_cnn) at θu = 0.1: exact ``largest`` against
  ``lax.top_k``, ``largest_approx`` (and its recall), ``threshold``;
* per-epoch time of selection, bounding/noise and the server update in the
  ``configs/svhn_cnn.cfg`` setting (30 x 1,000 examples) as a fraction of the
  epoch; compile time of the first epoch; XLA's peak memory estimate of the
  epoch program and the process's peak RSS.

JSON keys ``round_robin_vs_torch_b1``, ``round_robin_vs_torch_b32`` and
``seeds_axis_speedup`` (4 seeds in one program against one run at a time,
batch 32; ``seeds_axis_speedup_b1`` at batch 1) refer to ``mnist_cnn``, 30
participants (null when it is not benchmarked). The other headline keys refer
to ``svhn_cnn``, 30 participants:
``participant_axis_vs_loop_b32``, ``participant_axis_vs_loop_b1``,
``vs_torch_b32``, ``vs_torch_b1`` (null without PyTorch),
``flops_fraction_b32``, ``selection_speedup_vs_top_k``, ``overhead_fraction``,
plus ``compile_s``, ``peak_memory_mb``, ``matmul_gflops``, ``results`` (every
model/batch/contender) and the settings.

Why the harness ships inside the package (flax and optax keep theirs beside
it): the figures that matter are the accelerator ones, taken on rented GPUs,
TPU VMs and Colab, where the package is pip-installed and the repository's
``benchmarks/`` folder is not there; ``python -m dssgd_jax.bench`` then works
as it is. It builds on the library's public pieces only (rules, participant,
protocols, server) and never on the run layer's configuration.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from dssgd_jax.tools import cli
from dssgd_jax import models as models_lib
from dssgd_jax import participant as participant_lib
from dssgd_jax import privacy
from dssgd_jax import protocols
from dssgd_jax import rules
from dssgd_jax import selection as selection_lib
from dssgd_jax import server as server_lib

THETA_U = 0.1
LEARNING_RATE = 0.01
CFG_SAMPLES = 1000  # configs/svhn_cnn.cfg: samples per participant


def _torch_loop_module():
  """``benchmarks/torch_loop.py`` from the source tree, or None."""
  path = os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "benchmarks", "torch_loop.py")
  if not os.path.exists(path):
    return None
  spec = importlib.util.spec_from_file_location("dssgd_torch_loop", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod if mod.available() else None


def _block(x):
  return jax.block_until_ready(x)


def _median(xs):
  return float(statistics.median(xs))


# ---------------------------------------------------------------------------
# Contenders.


class Workload:
  """One model at one batch size: data, spec and the jitted pieces."""

  def __init__(self, model_name: str, num: int, samples: int, batch: int,
               conv_impl: str, seed: int = 0):
    self.name, self.num, self.samples, self.batch = (model_name, num, samples,
                                                     batch)
    self.shape = models_lib.INPUT_SHAPES[model_name]
    rng = np.random.default_rng(seed)
    self.images_np = rng.standard_normal(
        (num, samples) + self.shape).astype(np.float32)
    self.labels_np = rng.integers(0, 10, (num, samples)).astype(np.int32)
    self.images = jnp.asarray(self.images_np)
    self.labels = jnp.asarray(self.labels_np)
    self.model = models_lib.get_model(model_name, conv_impl=conv_impl)
    params = models_lib.init_params(self.model, self.shape,
                                    jax.random.key(seed))
    self.flat, self.unravel = participant_lib.flatten_params(params)
    self.d = int(self.flat.shape[0])
    self.rule = rules.chain(rules.select_largest(
        selection_lib.upload_count(THETA_U, self.d)))
    self.trainer = participant_lib.make_trainer(
        self.model.apply, self.unravel, batch, optax.sgd(LEARNING_RATE))
    self.update = participant_lib.make_update(self.trainer, self.rule)
    self.data = participant_lib.ParticipantData(self.images, self.labels)
    self.key = jax.random.key(seed + 1)
    self.epoch_count = 0

  def next_key(self):
    self.epoch_count += 1
    return jax.random.fold_in(self.key, self.epoch_count)

  # -- the participant axis: one program for the whole epoch.
  def build_axis(self, lowering: str, mesh=None):
    """Returns (run() -> seconds, compile s, first epoch s, XLA bytes).

    ``lowering``: ``vmap`` or ``map`` (``protocols.map_participants``). With
    ``mesh`` the participant axis is split over its devices (one CPU device
    per core with ``--cpu_devices``), as ``dssgd_jax.run.experiment`` does.
    """
    proto = protocols.parallel(self.update, server_lib.download_all(),
                               axis=protocols.ParticipantAxis(
                                   lowering,
                                   mesh if lowering == "map" else None))
    fn = jax.jit(proto.epoch, donate_argnums=(0,))
    srv = server_lib.init(jnp.array(self.flat, copy=True))  # donated
    loc = jnp.tile(self.flat[None], (self.num, 1))
    data = self.data
    if mesh is not None:
      from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
      def split(a):
        return jax.device_put(a, NamedSharding(mesh, PartitionSpec(
            "participants", *([None] * (a.ndim - 1)))))
      rep = NamedSharding(mesh, PartitionSpec())
      srv = jax.device_put(srv, rep)
      loc = split(loc)
      data = jax.tree_util.tree_map(split, data)
    t0 = time.perf_counter()
    holder = {"state": proto.init(srv, jax.vmap(self.trainer.init)(loc))}
    compiled = fn.lower(holder["state"], data, self.next_key()).compile()
    compile_s = time.perf_counter() - t0
    mem_bytes = compiled_peak_bytes(compiled)

    def run():
      t = time.perf_counter()
      state, stats = compiled(holder["state"], data, self.next_key())
      _block((state.server.params, state.local.params, stats))
      holder["state"] = state
      return time.perf_counter() - t

    t0 = time.perf_counter()
    run()  # first execution (allocations, thread pools)
    first_s = time.perf_counter() - t0
    return run, compile_s, first_s, mem_bytes

  def _program_runner(self, proto, num_seeds: int = 0,
                      seed_axis: str = "vmap") -> Callable:
    """run() -> seconds of one jitted epoch of ``proto`` (with ``num_seeds``
    > 0: that many independent runs, different initial models, as one
    program with the seed axis lowered as ``seed_axis``, exactly as
    ``--num_seeds`` runs it: :func:`dssgd_jax.protocols.over_seeds`).
    """
    srv = server_lib.init(jnp.array(self.flat, copy=True))
    loc = jnp.tile(self.flat[None], (self.num, 1))
    init_local = jax.vmap(self.trainer.init)
    state = proto.init(srv, init_local(loc))
    epoch = proto.epoch
    if num_seeds:
      noise = 1e-3 * jax.random.normal(jax.random.key(5),
                                       (num_seeds,) + self.flat.shape)
      state = jax.vmap(lambda z: proto.init(server_lib.init(self.flat + z),
                                            init_local(jnp.tile(
                                                (self.flat + z)[None],
                                                (self.num, 1)))))(noise)
      epoch = protocols.over_seeds(proto.epoch, seed_axis)
    fn = jax.jit(epoch, donate_argnums=(0,))
    holder = {"state": state}

    def keys():
      k = self.next_key()
      return jax.random.split(k, num_seeds) if num_seeds else k

    def run():
      t = time.perf_counter()
      state, stats = fn(holder["state"], self.data, keys())
      _block((state.server.params, state.local.params, stats))
      holder["state"] = state
      return time.perf_counter() - t

    run()  # compiles
    return run

  # -- the paper's protocol: participants one after another (lax.scan).
  def build_round_robin(self, num_seeds: int = 0,
                        seed_axis: str = "vmap") -> Callable:
    return self._program_runner(
        protocols.round_robin(self.update, server_lib.download_all()),
        num_seeds, seed_axis)

  def _loop_runner(self, participant_upload: Callable) -> Callable:
    """run() -> seconds of an epoch driven by a Python loop over participants.

    ``participant_upload(i, server_params, key) -> Upload`` does participant
    i's part; the uploads are then stacked and applied by jitted functions.
    """
    apply = jax.jit(lambda srv, ups: server_lib.end_epoch(
        server_lib.apply_uploads(srv, ups)))
    stack = jax.jit(lambda *ups: jax.tree_util.tree_map(
        lambda *a: jnp.stack(a), *ups))
    srv = {"s": server_lib.init(self.flat)}

    def run():
      t = time.perf_counter()
      server = srv["s"]
      keys = protocols.participant_keys(self.next_key(), self.num)
      ups = [participant_upload(i, server.params, keys[i])
             for i in range(self.num)]
      server = apply(server, stack(*ups))
      _block(server.params)
      srv["s"] = server
      return time.perf_counter() - t

    run()  # compiles
    return run

  # -- FedJAX-style: Python loop over participants and minibatches.
  def build_loop(self):
    apply_fn, unravel, batch = self.model.apply, self.unravel, self.batch
    rule = self.rule

    @jax.jit
    def step(params, x, y, idx, mask):
      return participant_lib.sgd_step(apply_fn, params, x[idx], y[idx], mask,
                                      LEARNING_RATE)

    @jax.jit
    def start(flat, key):
      return unravel(flat), participant_lib.epoch_batches(
          self.samples, batch, key)

    @jax.jit
    def upload(params, flat, key):
      return rule.apply(rules.dense(ravel_pytree(params)[0] - flat), key)

    def participant_upload(i, server_params, key):
      k_train, k_up = jax.random.split(key)
      params, (idx, mask) = start(server_params, k_train)
      for s in range(idx.shape[0]):
        params, _ = step(params, self.images[i], self.labels[i], idx[s],
                         mask[s])
      return upload(params, server_params, k_up)

    return self._loop_runner(participant_upload)

  # -- a Python loop over participants of a jitted local epoch (lax.scan).
  def build_epoch_loop(self):
    update = jax.jit(self.update)
    ones = jnp.ones((self.d,), bool)
    init = jax.jit(self.trainer.init)

    def participant_upload(i, server_params, key):
      return update(server_params, ones, init(server_params),
                    participant_lib.ParticipantData(self.images[i],
                                                    self.labels[i]), key)[1]

    return self._loop_runner(participant_upload)

  def build_torch(self, torch_loop):
    """PyTorch loop; picks the faster of 1 thread and PyTorch's default."""
    import torch  # pylint: disable=g-import-not-at-top
    default = torch.get_num_threads()
    device = ("cuda" if jax.default_backend() == "gpu" and
              torch.cuda.is_available() else "cpu")
    tl = torch_loop.TorchDSSGD(self.name, self.images_np, self.labels_np,
                               self.batch, THETA_U, LEARNING_RATE,
                               device=device)
    best, best_t = default, None
    for threads in sorted({1, default} if device == "cpu" else {default}):
      torch.set_num_threads(threads)
      tl.epoch()
      t = min(tl.epoch() for _ in range(2))
      if best_t is None or t < best_t:
        best, best_t = threads, t
    torch.set_num_threads(default)

    def run():
      torch.set_num_threads(best)
      try:
        return tl.epoch()
      finally:
        torch.set_num_threads(default)

    return run, best


def compiled_peak_bytes(compiled) -> int | None:
  """XLA's peak memory of a compiled program: arguments + outputs +
  temporaries - donated (aliased) buffers; None where not reported."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return int(mem.temp_size_in_bytes + mem.argument_size_in_bytes +
             mem.output_size_in_bytes - mem.alias_size_in_bytes)


def training_flops_per_example(model_name: str, batch: int = 32) -> float:
  """XLA's FLOP count of one SGD step (native convolutions) per example.

  Counted on the unoptimized program, the same on every backend.
  """
  model = models_lib.get_model(model_name, conv_impl="xla")
  shape = models_lib.INPUT_SHAPES[model_name]
  params = models_lib.init_params(model, shape, jax.random.key(0))
  x = jnp.zeros((batch,) + shape)
  y = jnp.zeros((batch,), jnp.int32)
  m = jnp.ones((batch,), bool)
  step = lambda p, x, y, m: participant_lib.sgd_step(model.apply, p, x, y, m,
                                                     0.01)
  return models_lib.xla_flops(step, params, x, y, m) / batch


def matmul_runner(n: int = 2048) -> Callable[[], float]:
  """Returns run() -> GFLOP/s of one n x n f32 matmul (best of 3 calls)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  _block(f(a, b))

  def run():
    best = math.inf
    for _ in range(3):
      t = time.perf_counter()
      _block(f(a, b))
      best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e9

  return run


# ---------------------------------------------------------------------------
# Selection and the per-epoch overheads.


def bench_selection(d: int, num: int, repeats: int) -> dict:
  """Times the selection rules on (num, d) updates at θu = 0.1."""
  c = selection_lib.upload_count(THETA_U, d)
  delta = jax.random.normal(jax.random.key(7), (num, d), jnp.float32) * 1e-3
  keys = jax.random.split(jax.random.key(8), num)
  fns = {
      "largest (exact)": jax.jit(jax.vmap(
          lambda x: selection_lib.select_largest(x, c))),
      "lax.top_k": jax.jit(jax.vmap(
          lambda x: selection_lib.select_largest_top_k(x, c))),
      "largest_approx": jax.jit(jax.vmap(
          lambda x: selection_lib.select_largest_approx(x, c))),
      "threshold": jax.jit(jax.vmap(
          lambda x, k: selection_lib.select_threshold(x, c, 1e-3, k))),
  }
  args = {k: (delta, keys) if k == "threshold" else (delta,) for k in fns}
  outs = {k: _block(f(*args[k])) for k, f in fns.items()}
  exact = np.asarray(outs["largest (exact)"].indices)
  ref = np.asarray(outs["lax.top_k"].indices)
  same = bool(np.array_equal(exact, ref))
  approx = np.asarray(outs["largest_approx"].indices)
  recall = float(np.mean([len(np.intersect1d(approx[i], ref[i])) / c
                          for i in range(num)]))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t = time.perf_counter()
      _block(f(*args[k]))
      times[k].append(time.perf_counter() - t)
  med = {k: _median(v) for k, v in times.items()}
  return {"seconds": med, "same_as_top_k": same, "approx_recall": recall,
          "count": c, "d": d, "num": num,
          "speedup": med["lax.top_k"] / med["largest (exact)"]}


def bench_overheads(d: int, num: int, repeats: int) -> dict:
  """Seconds per epoch of selection, bounding/noise and the server update."""
  c = selection_lib.upload_count(THETA_U, d)
  delta = jax.random.normal(jax.random.key(7), (num, d), jnp.float32) * 1e-3
  keys = jax.random.split(jax.random.key(9), num)
  select = jax.jit(jax.vmap(lambda x: selection_lib.select_largest(x, c)))
  ups = _block(select(delta))
  bound_none = jax.jit(jax.vmap(lambda u, k: privacy.bound_and_noise(
      u, None, "none", 0.0, k)))
  bound_lap = jax.jit(jax.vmap(lambda u, k: privacy.bound_and_noise(
      u, 1e-3, "laplace", 1e-4, k)))
  srv = server_lib.init(jnp.zeros((d,), jnp.float32))
  apply = jax.jit(lambda s, u: server_lib.end_epoch(
      server_lib.apply_uploads(s, u)))
  fns = {"selection": (select, (delta,)),
         "bounding/noise (cfg: none)": (bound_none, (ups, keys)),
         "bounding+Laplace noise": (bound_lap, (ups, keys)),
         "server update": (apply, (srv, ups))}
  for f, a in fns.values():
    _block(f(*a))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, (f, a) in fns.items():
      t = time.perf_counter()
      _block(f(*a))
      times[k].append(time.perf_counter() - t)
  return {k: _median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------
# Main.


def _fmt(x, spec=".0f"):
  return "n/a" if x is None else format(x, spec)


def run_bench(args) -> dict:
  torch_loop = None if args.no_torch else _torch_loop_module()
  conv_impl = args.conv_impl
  if conv_impl == "auto":
    conv_impl = models_lib.auto_conv_impl()
  print(f"dssgd_jax.bench: jax {jax.__version__}, backend "
        f"{jax.default_backend()}, {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
        f"; conv_impl={conv_impl}; participant_axis={args.participant_axis}; "
        "PyTorch: "
        f"{'yes' if torch_loop else 'no'}; participants {args.participants}; "
        f"repeats {args.repeats} (interleaved, median)", flush=True)
  matmul = matmul_runner()
  mesh = None
  if jax.device_count() > 1:
    from dssgd_jax import sharding  # pylint: disable=g-import-not-at-top
    n = sharding.mesh_size(args.participants)
    if n > 1:
      from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
      mesh = Mesh(np.asarray(jax.devices()[:n]), ("participants",))
  results = {}
  matmul_samples = []
  compile_s = {}
  memory = {}
  torch_threads = {}
  flops = {}
  for model_name in args.models:
    flops[model_name] = training_flops_per_example(model_name)
    for batch in args.batch_sizes:
      samples = args.samples_b1 if batch == 1 else args.samples
      samples = max(samples, batch)
      w = Workload(model_name, args.participants, samples, batch, conv_impl)
      lowering = (protocols.auto_lowering(model_name)
                  if args.participant_axis == "auto" else args.participant_axis)
      other = "vmap" if lowering == "map" else "map"
      # --seed_axis=auto (dssgd_jax.run.build.resolve_seed_axis).
      seed_lowering = "map" if jax.default_backend() == "cpu" else "vmap"
      other_seed = "vmap" if seed_lowering == "map" else "map"
      tag = f"{model_name}/b{batch}"
      print(f"[{tag}] compiling ...", flush=True)
      runners = {}
      runners["axis"], c_s, first_s, mem = w.build_axis(lowering)
      compile_s[tag] = c_s
      memory[tag] = mem
      runners[f"axis_{other}"] = w.build_axis(other)[0]
      if mesh is not None:
        runners["axis_sharded"] = w.build_axis(lowering, mesh)[0]
      runners["round_robin"] = w.build_round_robin()
      if args.seeds:  # as --seed_axis=auto runs them, and the other lowering
        runners[f"round_robin_{args.seeds}seeds"] = w.build_round_robin(
            args.seeds, seed_lowering)
        runners[f"round_robin_{args.seeds}seeds_{other_seed}"] = (
            w.build_round_robin(args.seeds, other_seed))
      runners["loop"] = w.build_loop()
      runners["epoch_loop"] = w.build_epoch_loop()
      if torch_loop is not None:
        runners["torch"], torch_threads[tag] = w.build_torch(torch_loop)
      times = {k: [] for k in runners}
      for _ in range(args.repeats):
        for k, run in runners.items():
          times[k].append(run())
        if model_name == "svhn_cnn" and batch == 32:
          matmul_samples.append(matmul())
      sps = {k: w.num * w.samples / _median(v) for k, v in times.items()}
      if args.seeds:  # samples of all seeds: S runs' work per program
        sps[f"round_robin_{args.seeds}seeds"] *= args.seeds
        sps[f"round_robin_{args.seeds}seeds_{other_seed}"] *= args.seeds
      results[tag] = {
          "samples_per_s": sps, "samples_per_participant": w.samples,
          "num_params": w.d, "compile_s": c_s, "first_epoch_s": first_s,
          "xla_memory_mb": None if mem is None else mem / 2 ** 20,
          "torch_threads": torch_threads.get(tag),
          "model_gflops": flops[model_name] * sps["axis"] / 1e9}
      print(f"[{tag}] samples/s: " + ", ".join(
          f"{k} {v:.0f}" for k, v in sps.items()) +
            f"; compile {c_s:.1f}s", flush=True)
      del runners, w
  if not matmul_samples:
    matmul_samples = [matmul() for _ in range(3)]
  matmul_gflops = _median(matmul_samples)

  d_svhn = models_lib.PARAM_COUNTS["svhn_cnn"]
  sel = bench_selection(d_svhn, args.participants, args.repeats + 2)
  over = bench_overheads(d_svhn, args.participants, args.repeats + 2)

  def best_axis(tag):
    """The fastest participant-axis lowering measured for ``tag``."""
    sps = results[tag]["samples_per_s"]
    return max((k for k in ("axis", "axis_sharded") if k in sps),
               key=lambda k: sps[k])

  def ratio(tag, a, b):
    r = results.get(tag)
    if r is None or b not in r["samples_per_s"]:
      return None
    if a == "axis":
      a = best_axis(tag)
    return r["samples_per_s"][a] / r["samples_per_s"][b]

  for tag, r in results.items():
    r["axis_lowering"] = best_axis(tag)
    r["model_gflops"] = flops[tag.split("/")[0]] * r["samples_per_s"][
        r["axis_lowering"]] / 1e9

  head = "svhn_cnn" if "svhn_cnn" in args.models else args.models[0]
  b32 = results.get(f"{head}/b32")
  overhead_s = (over["selection"] + over["bounding/noise (cfg: none)"] +
                over["server update"])
  overhead_fraction = None
  if b32 is not None:
    epoch_s = args.participants * CFG_SAMPLES / b32["samples_per_s"][
        b32["axis_lowering"]]
    overhead_fraction = overhead_s / epoch_s
  seeds_key = f"round_robin_{args.seeds}seeds"
  out = {
      "round_robin_vs_torch_b1": ratio("mnist_cnn/b1", "round_robin", "torch"),
      "round_robin_vs_torch_b32": ratio("mnist_cnn/b32", "round_robin",
                                        "torch"),
      "seeds_axis_speedup": (ratio("mnist_cnn/b32", seeds_key, "round_robin")
                             if args.seeds else None),
      "seeds_axis_speedup_b1": (ratio("mnist_cnn/b1", seeds_key,
                                      "round_robin") if args.seeds else None),
      "participant_axis_vs_loop_b32": ratio(f"{head}/b32", "axis", "loop"),
      "participant_axis_vs_loop_b1": ratio(f"{head}/b1", "axis", "loop"),
      "vs_torch_b32": ratio(f"{head}/b32", "axis", "torch"),
      "vs_torch_b1": ratio(f"{head}/b1", "axis", "torch"),
      "participant_axis_vs_epoch_loop_b32": ratio(f"{head}/b32", "axis",
                                                  "epoch_loop"),
      "participant_axis_vs_epoch_loop_b1": ratio(f"{head}/b1", "axis",
                                                 "epoch_loop"),
      "flops_fraction_b32": (None if b32 is None else
                             b32["model_gflops"] / matmul_gflops),
      "selection_speedup_vs_top_k": sel["speedup"],
      "overhead_fraction": overhead_fraction,
      "axis_lowering_b32": (None if b32 is None else b32["axis_lowering"]),
      "axis_lowering_b1": (results[f"{head}/b1"]["axis_lowering"]
                           if f"{head}/b1" in results else None),
      "compile_s": compile_s.get(f"{head}/b32"),
      "peak_memory_mb": (None if memory.get(f"{head}/b32") is None else
                         memory[f"{head}/b32"] / 2 ** 20),
      "process_peak_rss_mb": resource.getrusage(
          resource.RUSAGE_SELF).ru_maxrss / 1024,
      "matmul_gflops": matmul_gflops,
      "model_gflops_b32": None if b32 is None else b32["model_gflops"],
      "training_flops_per_example": flops,
      "selection": sel,
      "overheads_s": over,
      "overhead_s": overhead_s,
      "results": results,
      "settings": {"participants": args.participants,
                   "samples_b32": args.samples, "samples_b1": args.samples_b1,
                   "repeats": args.repeats, "conv_impl": conv_impl,
                   "participant_axis": args.participant_axis,
                   "theta_u": THETA_U, "quick": args.quick,
                   "jax": jax.__version__, "backend": jax.default_backend(),
                   "cpus": os.cpu_count(),
                   "xla_flags": os.environ.get("XLA_FLAGS", "")},
  }

  # Human tables.
  print()
  print("One DSSGD epoch, samples/s (median of interleaved repeats):")
  cols = ["axis", "axis_vmap", "axis_map", "axis_sharded", "round_robin",
          f"round_robin_{args.seeds}seeds", "loop", "epoch_loop", "torch"]
  print(f"{'model/batch':16s}" + "".join(f"{c:>13s}" for c in cols) +
        f"{'axis/loop':>11s}{'axis/torch':>11s}{'compile s':>10s}"
        f"{'XLA MB':>8s}")
  for tag, r in results.items():
    s = r["samples_per_s"]
    print(f"{tag:16s}" + "".join(f"{_fmt(s.get(c)):>13s}" for c in cols) +
          f"{_fmt(ratio(tag, 'axis', 'loop'), '.2f'):>11s}"
          f"{_fmt(ratio(tag, 'axis', 'torch'), '.2f'):>11s}"
          f"{r['compile_s']:>10.1f}{_fmt(r['xla_memory_mb']):>8s}")
  print(f"\nmatmul 2048^2 f32: {matmul_gflops:.0f} GFLOP/s; model "
        f"{_fmt(out['model_gflops_b32'])} GFLOP/s at batch 32 "
        f"({_fmt(out['flops_fraction_b32'], '.0%')}); training FLOPs/example: "
        + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in flops.items()))
  print(f"\nSelection, {sel['num']} x {sel['d']:,} at θu={THETA_U} "
        f"(c={sel['count']:,}), seconds:")
  for k, v in sel["seconds"].items():
    print(f"  {k:18s} {v:.3f}")
  print(f"  exact == lax.top_k: {sel['same_as_top_k']}; speed-up "
        f"{sel['speedup']:.1f}x; largest_approx recall "
        f"{sel['approx_recall']:.3f}")
  print("\nPer-epoch overheads (svhn_cnn.cfg: 30 participants, D=313,546):")
  for k, v in over.items():
    print(f"  {k:28s} {v:.3f} s")
  if overhead_fraction is not None:
    print(f"  selection+bounding+server = {overhead_s:.3f} s = "
          f"{overhead_fraction:.1%} of a {args.participants}x{CFG_SAMPLES} "
          "epoch at the measured axis speed")
  print(f"\nprocess peak RSS {out['process_peak_rss_mb']:.0f} MB")
  return out


def _accelerator_plugin() -> bool:
  """Whether a GPU or TPU backend for JAX is installed (checked without
  starting JAX's backends, so that ``XLA_FLAGS`` can still be set)."""
  from importlib import metadata, util  # pylint: disable=g-import-not-at-top
  if any(True for _ in metadata.entry_points(group="jax_plugins")):
    return True
  return any(util.find_spec(m) is not None for m in ("jax_plugins", "libtpu"))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="small epochs and few repeats (3-4 minutes on 2 cores)")
  p.add_argument("--models", default="svhn_cnn,mnist_cnn",
                 help="comma-separated models (the headline ratios use "
                 "svhn_cnn, else the first)")
  p.add_argument("--batch_sizes", default="32,1",
                 help="comma-separated local minibatch sizes")
  p.add_argument("--participants", type=int, default=30,
                 help="participants per epoch")
  p.add_argument("--samples", type=int, default=None,
                 help="samples per participant at batch > 1")
  p.add_argument("--samples_b1", type=int, default=None,
                 help="samples per participant at batch 1")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed rounds, median taken (default 5; --quick 3)")
  p.add_argument("--conv_impl", default="auto",
                 choices=("auto", "im2col", "xla"))
  p.add_argument("--participant_axis", default="auto",
                 choices=("auto", "vmap", "map"),
                 help="lowering of the 'axis' column (the other one is timed "
                 "too, as axis_vmap or axis_map)")
  p.add_argument("--no_torch", action="store_true",
                 help="skip the PyTorch loop even if PyTorch is installed")
  p.add_argument("--cpu_devices", type=int, default=None,
                 help="also time the participant axis sharded over this many "
                 "XLA:CPU devices (sets XLA_FLAGS=--xla_force_host_platform_"
                 "device_count; 0 or 1: one device only; default: one per "
                 "core, unless a GPU/TPU plugin for JAX is installed)")
  p.add_argument("--seeds", type=int, default=4,
                 help="independent runs vmapped in one round_robin program "
                 "(seeds_axis_speedup: their samples/s against one run's; "
                 "0 = skip)")
  p.add_argument("--json_out", default=None, help="also write the JSON here")
  args = p.parse_args(argv)
  args.models = [m for m in args.models.split(",") if m]
  unknown = [m for m in args.models if m not in models_lib.MODELS]
  if unknown or not args.models:
    p.error(f"--models={','.join(args.models)}: each must be one of "
            f"{', '.join(models_lib.MODELS)}")
  try:
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
  except ValueError:
    p.error(f"--batch_sizes={args.batch_sizes} must be comma-separated "
            "integers")
  if not args.batch_sizes or min(args.batch_sizes) < 1:
    p.error("--batch_sizes must be positive integers")
  if args.participants < 1:
    p.error("--participants must be at least 1")
  if args.samples is None:
    args.samples = 64 if args.quick else 256
  if args.samples_b1 is None:
    args.samples_b1 = 8 if args.quick else 32
  if args.cpu_devices is None:
    args.cpu_devices = 0 if _accelerator_plugin() else (os.cpu_count() or 1)
  if args.repeats is None:
    args.repeats = 3 if args.quick else 5
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.cpu_devices:
    cli.force_cpu_devices(args.cpu_devices)
  out = run_bench(args)
  line = json.dumps(out, sort_keys=True, default=float)
  if args.json_out:
    with open(args.json_out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
