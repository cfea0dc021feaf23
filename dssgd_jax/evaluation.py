"""Batched test accuracy of many models at once (participants' models).

:func:`make_evaluator` builds one jitted function that scores every model on
the whole test set: a ``lax.scan`` over fixed-size chunks of the (padded) test
set, and inside it the models. Test data are padded once to a multiple of the
chunk size, so there is one compilation per parameter shape.

How the models are traversed (``lowering``):

* ``map`` (the default on CPU): ``lax.map`` over the models, one model at a
  time on a chunk sized so that one model's forward-pass intermediates stay
  around :data:`_CPU_STEP_BYTES` (``mnist_cnn``: about 60 test images per
  step, ``svhn_cnn`` about 20, the MLPs several thousand). Every matrix product
  is a plain single-model one and the working set stays in cache. A model
  stack split over a device mesh is mapped per device (``shard_map``).
* ``vmap`` (the default on GPU and TPU, unchanged): the models are a batch axis
  (``vmap``) and a chunk is about 4096 test examples summed over the models.

On XLA:CPU (2 shared cores) ``vmap`` was the costly choice: scoring 30
``mnist_cnn`` models on 10,000 test images took 6-11 times as long as the
local training epochs of the ``configs/mnist_cnn.cfg`` setting timed in the
same process (24-58 s, depending on the machine's load), because every layer
became a batched product over 30 models and one 4096-example call needs ~770
MB of temporaries (XLA's memory analysis), far outside the caches. ``map``
with ~60 images per step (~16 MB of temporaries) takes 2-2.5x less time in the
same runs (22-24 s where ``vmap`` took 49-58 s; ``svhn_cnn``: 2.6-4x less;
the server's one model: 2.1 s -> 0.9 s). The forward pass is the same in
both (no training-time intermediates either way); logits can differ only by
float rounding between batch shapes, and the counts matched exactly in every
comparison (tests/test_evaluation.py checks them against a per-model loop).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dssgd_jax import participant as participant_lib

# vmap lowering: examples in flight per call, summed over models.
_EXAMPLES_PER_CALL = 4096

# map lowering: bytes of one model's forward-pass intermediates per step (as
# counted on the traced program: the sum of every operation's output, before
# XLA fuses them). Measured on XLA:CPU, 2 cores: mnist_cnn was fastest at
# 32-64 images per step, svhn_cnn at 16-18, mnist_mlp at ~4096; this budget
# gives 59, 18 and 7133.
_CPU_STEP_BYTES = 48 * 2 ** 20
_MIN_CHUNK, _MAX_CHUNK = 8, 8192

LOWERINGS = ("map", "vmap")


def _traced_bytes(jaxpr) -> int:
  """Sum of the sizes of every operation's outputs in ``jaxpr`` (recursing
  into nested programs)."""
  total = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      shape = getattr(v.aval, "shape", None)
      if shape is not None:
        total += int(np.prod(shape)) * np.dtype(v.aval.dtype).itemsize
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else (p,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
        if hasattr(sub, "eqns"):
          total += _traced_bytes(sub)
  return total


def forward_bytes_per_example(apply_fn: Callable, unravel: Callable,
                              flat_shape: jax.ShapeDtypeStruct,
                              example: jax.ShapeDtypeStruct) -> int:
  """Bytes of forward-pass intermediates per test example (traced, not run).

  The difference between the traced programs for 2 and for 1 examples, so
  per-model costs (unravelling the parameters) do not count.
  """
  def logits(flat, x):
    return apply_fn(unravel(flat), x)

  sizes = []
  for n in (1, 2):
    x = jax.ShapeDtypeStruct((n,) + tuple(example.shape), example.dtype)
    sizes.append(_traced_bytes(jax.make_jaxpr(logits)(flat_shape, x).jaxpr))
  return max(sizes[1] - sizes[0], 1)


def _pad_chunks(images, labels, chunk):
  """(steps, chunk, ...) images, labels and validity mask; the test set is
  padded with masked zeros to a multiple of ``chunk``."""
  num = images.shape[0]
  steps = -(-num // chunk)
  pad = steps * chunk - num
  x = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                       images.dtype)])
  y = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
  m = np.arange(steps * chunk) < num
  return (jnp.asarray(x.reshape((steps, chunk) + images.shape[1:])),
          jnp.asarray(y.reshape(steps, chunk)),
          jnp.asarray(m.reshape(steps, chunk)))


def _participant_mesh(flat_stack):
  """The mesh and axis name splitting ``flat_stack``'s leading axis, or
  (None, None) for an unsplit (one-device or replicated) stack."""
  sharding = getattr(flat_stack, "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  spec = getattr(sharding, "spec", None)
  if mesh is None or not spec or spec[0] is None or mesh.size == 1:
    return None, None
  axis = spec[0]
  if isinstance(axis, (tuple, list)):
    if len(axis) != 1:
      return None, None
    axis = axis[0]
  return mesh, axis


def make_evaluator(apply_fn: Callable, unravel: Callable, images: np.ndarray,
                   labels: np.ndarray, num_models: int,
                   chunk: int | None = None,
                   lowering: str | None = None) -> Callable:
  """Builds ``evaluate(flat_stack (P, D), stats=None) -> accuracies (P,)``.

  Accuracy of model p: the fraction of the T test examples where the argmax
  of ``apply_fn(unravel(flat_stack[p]), image)`` equals the label. With
  ``stats = (shift, scale)``, each (P, C), model p sees every test image
  standardized with its own statistics, ``(image - shift[p]) * scale[p]``
  (each participant standardizes with its own training data).

  Args:
    apply_fn: model apply.
    unravel: flat vector -> parameter pytree.
    images: (T, ...) test images (host arrays).
    labels: (T,) test labels.
    num_models: P, the number of models scored per call.
    chunk: test examples scored per step by each model (default: ``map``,
      sized to :data:`_CPU_STEP_BYTES` of intermediates; ``vmap``, about
      4096 / P).
    lowering: ``map`` or ``vmap`` over the models (default: ``map`` on CPU,
      ``vmap`` on GPU and TPU).
  """
  if lowering is None:
    lowering = "map" if jax.default_backend() == "cpu" else "vmap"
  if lowering not in LOWERINGS:
    raise ValueError(f"lowering={lowering!r} is not one of {LOWERINGS}")
  images = np.asarray(images)
  labels = np.asarray(labels)
  num = images.shape[0]
  correct = participant_lib.make_accuracy_fn(apply_fn, unravel)
  compiled = {}  # (D, dtype) -> (jitted scorer, test chunks)

  def chunk_size(flat_stack) -> int:
    if chunk is not None:
      c = chunk
    elif lowering == "vmap":
      c = max(16, _EXAMPLES_PER_CALL // max(num_models, 1))
    else:
      per_example = forward_bytes_per_example(
          apply_fn, unravel,
          jax.ShapeDtypeStruct(flat_stack.shape[1:], flat_stack.dtype),
          jax.ShapeDtypeStruct(images.shape[1:], images.dtype))
      c = min(max(_CPU_STEP_BYTES // per_example, _MIN_CHUNK), _MAX_CHUNK)
    c = max(1, min(int(c), num))
    if chunk is None:
      c = -(-num // -(-num // c))  # same steps, least padding
    return c

  def score(flat_stack, x, y, m, shift=None, scale=None):
    """Correct-prediction counts (P,) over all chunks."""
    def one(w, bx, by, bm, sh, sc):
      if sh is not None:
        bx = (bx - sh) * sc
      return correct(w, bx, by, bm)

    def body(total, batch):
      bx, by, bm = batch
      if lowering == "vmap":
        axes = None if shift is None else 0
        hits = jax.vmap(one, in_axes=(0, None, None, None, axes, axes))(
            flat_stack, bx, by, bm, shift, scale)
      else:
        hits = jax.lax.map(lambda a: one(a[0], bx, by, bm, a[1], a[2]),
                           (flat_stack, shift, scale))
      return total + hits, None

    total, _ = jax.lax.scan(
        body, jnp.zeros(flat_stack.shape[:1], jnp.int32), (x, y, m))
    return total

  def build(flat_stack):
    mesh, axis = (None, None)
    if lowering == "map":
      mesh, axis = _participant_mesh(flat_stack)
    if mesh is None:
      fn = score
    else:
      from jax.sharding import PartitionSpec  # pylint: disable=g-import-not-at-top
      fn = jax.shard_map(
          score, mesh=mesh,
          in_specs=(PartitionSpec(axis), PartitionSpec(), PartitionSpec(),
                    PartitionSpec(), PartitionSpec(axis),
                    PartitionSpec(axis)),
          out_specs=PartitionSpec(axis), check_vma=False)
    # The test set is an argument, not a closed-over constant, so XLA does
    # not fold it into the compiled program.
    return jax.jit(lambda s, x, y, m, sh, sc: fn(s, x, y, m, sh, sc) / num
                   ), _pad_chunks(images, labels, chunk_size(flat_stack))

  def evaluate(flat_stack, stats=None):
    key = (tuple(np.shape(flat_stack)[1:]), str(flat_stack.dtype),
           str(getattr(flat_stack, "sharding", None)), stats is None)
    if key not in compiled:
      compiled[key] = build(flat_stack)
    fn, (x, y, m) = compiled[key]
    shift = scale = None
    if stats is not None:
      shift, scale = (jnp.asarray(a, jnp.float32) for a in stats)
    return fn(flat_stack, x, y, m, shift, scale)

  return evaluate
