"""Neural networks used by the participants (SPEC section 4), in flax.linen.

Every model is a plain ``flax.linen.Module``: ``model.init(key, x)`` and the pure
``model.apply(params, x) -> logits``. The participant axis is added with
``jax.vmap`` over ``params`` and ``x``.

Convolutions are written as *im2col + matrix product* (``conv_impl="im2col"``,
the default): the image patches are built from k_h·k_w shifted slices and
multiplied with the reshaped kernel by one ``jnp.dot``. Under ``vmap`` over
per-participant kernels this becomes a batched matrix product with the
participant axis as its batch axis, which XLA lowers well on CPU, GPU and TPU,
whereas a vmapped ``lax.conv_general_dilated`` with per-participant kernels is
lowered to a grouped convolution that is several times slower on XLA:CPU (issue
"Speed and scale"; numbers in BENCHMARKS.md). ``conv_impl="xla"`` uses
``lax.conv_general_dilated``; both give the same numbers to float tolerance.

| name        | input    | layers                                               | parameters |
|-------------|----------|------------------------------------------------------|-----------:|
| mnist_mlp   | 28x28x1  | 784-128-64-10, ReLU                                  | 109,386    |
| mnist_cnn   | 32x32x1  | conv5x5 32, tanh, maxpool 3/3; conv5x5 64, tanh,     | 105,506    |
|             |          | maxpool 2; dense 200, tanh; dense 10                 |            |
| svhn_cnn    | 32x32x3  | conv5x5 64, tanh, pool 2; conv5x5 64, tanh, pool 2;  | 313,546    |
|             |          | dense 128, tanh; dense 10 (Torch7 tutorial net)      |            |
| digits_cnn  | 8x8x1    | conv3x3 16 (same), ReLU, pool 2; dense 64, ReLU; 10  | 17,258     |
| digits_mlp  | 8x8x1    | 64-64-10, ReLU                                       | 4,810      |

``svhn_cnn`` is the Torch7 tutorial network with 'valid' 5x5 convolutions
(32→28→14→10→5, 64·5·5 = 1,600 features into the 128-unit layer): 313,546
parameters. The seed paper's Table 3 reports 298,732 for its variant, whose
exact layer sizes it does not give; we build and test the 313,546 one.
"""

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def im2col_conv(x: jax.Array, kernel: jax.Array, padding: str = "VALID"
                ) -> jax.Array:
  """2-D convolution (stride 1) as patches @ kernel.

  Args:
    x: (batch, H, W, C_in) images.
    kernel: (k_h, k_w, C_in, C_out), flax's layout.
    padding: "VALID" or "SAME".

  Returns:
    (batch, H_out, W_out, C_out), equal to ``lax.conv_general_dilated`` with
    NHWC/HWIO layouts.
  """
  kh, kw, cin, cout = kernel.shape
  if padding == "SAME":
    ph, pw = kh - 1, kw - 1
    x = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2),
                    (0, 0)))
  elif padding != "VALID":
    raise ValueError(f"unsupported padding {padding!r}")
  _, h, w, _ = x.shape
  ho, wo = h - kh + 1, w - kw + 1
  patches = jnp.concatenate(
      [x[:, i:i + ho, j:j + wo, :] for i in range(kh) for j in range(kw)],
      axis=-1)  # (B, Ho, Wo, kh*kw*cin), order (i, j, c) like the kernel.
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """A stride-1 2-D convolution with bias (same parameters as ``nn.Conv``)."""
  features: int
  kernel_size: Sequence[int]
  padding: str = "VALID"
  impl: str = "im2col"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    cin = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (kh, kw, cin, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    if self.impl == "im2col":
      y = im2col_conv(x, kernel, self.padding)
    elif self.impl == "xla":
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1), self.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    else:
      raise ValueError(f"unknown conv_impl {self.impl!r}")
    return y + bias


def _pool(x, size, stride):
  """VALID max pooling. Non-overlapping windows (size == stride, every model
  here) are a reshape and a max: its gradient is a compare-and-select fused
  with its neighbours, where ``nn.max_pool``'s is an XLA select-and-scatter,
  which made the vmapped SVHN CNN step about 1.4x slower on CPU (ties, which
  need exactly equal floats, share the gradient instead of giving it to the
  first maximum)."""
  if size != stride:
    return nn.max_pool(x, (size, size), strides=(stride, stride),
                       padding="VALID")
  b, h, w, c = x.shape
  ho, wo = h // size, w // size
  x = x[:, :ho * size, :wo * size, :]
  return jnp.max(x.reshape(b, ho, size, wo, size, c), axis=(2, 4))


class MLP(nn.Module):
  """A ReLU multilayer perceptron on flattened images."""
  hidden: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.num_classes)(x)


class MnistCNN(nn.Module):
  """The MNIST CNN of SPEC section 4 (32x32x1 input): 105,506 parameters."""
  num_classes: int = 10
  conv_impl: str = "im2col"

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(Conv(32, (5, 5), impl=self.conv_impl)(x))
    x = _pool(x, 3, 3)
    x = jnp.tanh(Conv(64, (5, 5), impl=self.conv_impl)(x))
    x = _pool(x, 2, 2)
    x = x.reshape((x.shape[0], -1))
    x = jnp.tanh(nn.Dense(200)(x))
    return nn.Dense(self.num_classes)(x)


class SvhnCNN(nn.Module):
  """The Torch7-tutorial SVHN CNN (32x32x3 input): 313,546 parameters."""
  num_classes: int = 10
  conv_impl: str = "im2col"

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(Conv(64, (5, 5), impl=self.conv_impl)(x))
    x = _pool(x, 2, 2)
    x = jnp.tanh(Conv(64, (5, 5), impl=self.conv_impl)(x))
    x = _pool(x, 2, 2)
    x = x.reshape((x.shape[0], -1))
    x = jnp.tanh(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


class DigitsCNN(nn.Module):
  """A small CNN for 8x8 digits: 17,258 parameters."""
  num_classes: int = 10
  conv_impl: str = "im2col"

  @nn.compact
  def __call__(self, x):
    x = nn.relu(Conv(16, (3, 3), padding="SAME", impl=self.conv_impl)(x))
    x = _pool(x, 2, 2)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


MODELS = ("mnist_mlp", "mnist_cnn", "svhn_cnn", "digits_cnn", "digits_mlp")
CONV_IMPLS = ("im2col", "xla")
# Models whose first layer expects 32x32 inputs: 28x28 images get padded
# (dssgd_jax.data.transforms).
MODELS_32X32 = ("mnist_cnn", "svhn_cnn")


def auto_conv_impl() -> str:
  """The convolution lowering ``conv_impl="auto"`` picks for this backend.

  CPU: ``im2col`` — XLA:CPU's own convolution is about 13x slower here.
  GPU: ``im2col`` — batched GEMMs, 1.3-4.5x the speed of cuDNN's grouped
  convolutions under ``vmap`` on an H100. TPU: ``xla`` (grouped convolutions
  map onto the MXU natively; not measured). Numbers in docs/benchmarks.md.
  """
  return "xla" if jax.default_backend() == "tpu" else "im2col"


def approx_is_approximate() -> bool:
  """Whether ``lax.approx_max_k`` is approximate on this backend (TPU); on
  CPU and GPU it is exact (``--selection=largest_approx`` is then
  ``largest``)."""
  return jax.default_backend() == "tpu"


def abstract_num_params(name: str, image_shape: Sequence[int]) -> int:
  """D of model ``name`` on images of ``image_shape`` (as :func:`fits`
  pads them), computed abstractly: no backend starts.

  >>> abstract_num_params("digits_mlp", (8, 8, 1))
  4810
  """
  h, w, c = image_shape
  if name in MODELS_32X32 and (h, w) == (28, 28):
    h, w = 32, 32
  model = get_model(name)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                          jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
  return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


def fits(name: str, image_shape: Sequence[int]) -> bool:
  """Whether model ``name`` can take images of ``image_shape`` (as loaded;
  28x28 images are padded to 32x32 for the 32x32 models). Checked by
  tracing ``init`` abstractly (no computation).

  >>> fits("digits_cnn", (8, 8, 1)), fits("mnist_cnn", (8, 8, 1))
  (True, False)
  """
  h, w, c = image_shape
  if name in MODELS_32X32 and (h, w) == (28, 28):
    h, w = 32, 32
  model = get_model(name)
  # Everything inside eval_shape is abstract: no backend starts (so
  # --cpu_devices and jax.distributed can still be set up afterwards).
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x),
                   jax.ShapeDtypeStruct((1, h, w, c), jnp.float32))
  except (ValueError, TypeError, ZeroDivisionError):
    return False
  return True

# Input shape each model is built for (H, W, C).
INPUT_SHAPES = {
    "mnist_mlp": (28, 28, 1),
    "mnist_cnn": (32, 32, 1),
    "svhn_cnn": (32, 32, 3),
    "digits_cnn": (8, 8, 1),
    "digits_mlp": (8, 8, 1),
}

# Parameter counts at the input shapes above and 10 classes (tested).
PARAM_COUNTS = {
    "mnist_mlp": 109_386,
    "mnist_cnn": 105_506,
    "svhn_cnn": 313_546,
    "digits_cnn": 17_258,
    "digits_mlp": 4_810,
}


def get_model(name: str, num_classes: int = 10, conv_impl: str = "im2col"
              ) -> nn.Module:
  """Returns the flax module called ``name``.

  >>> model = get_model("mnist_cnn")
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  >>> num_params(params)
  105506
  """
  if name == "mnist_mlp":
    return MLP((128, 64), num_classes)
  if name == "digits_mlp":
    return MLP((64,), num_classes)
  if name == "mnist_cnn":
    return MnistCNN(num_classes, conv_impl)
  if name == "svhn_cnn":
    return SvhnCNN(num_classes, conv_impl)
  if name == "digits_cnn":
    return DigitsCNN(num_classes, conv_impl)
  raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def num_params(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def init_params(model: nn.Module, input_shape: Sequence[int], key: jax.Array):
  """Initializes ``model`` for inputs of shape ``input_shape`` (no batch).

  Jitted: one compilation instead of many small op-by-op ones.
  """
  return jax.jit(model.init)(
      key, jnp.zeros((1,) + tuple(input_shape), jnp.float32))


def xla_flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of ``jax.jit(fn)(*args)``.

  Counted on the unoptimized program where the backend can (the same count on
  every backend: a compiled GPU convolution is a cuDNN call that the cost
  analysis no longer counts), else on the program compiled for the CPU.
  """
  def count(cost):
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    return None if not cost or "flops" not in cost else float(cost["flops"])

  flops = count(jax.jit(fn).lower(*args).cost_analysis())
  if flops is None:
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
      args = jax.device_put(args, cpu)
      flops = count(jax.jit(fn).lower(*args).compile().cost_analysis())
  return flops


def flops_per_example(name: str, input_shape: Sequence[int] | None = None
                      ) -> float:
  """FLOPs of one forward pass on one example, as counted by XLA.

  Training (forward + backward) costs about 3x this.
  """
  model = get_model(name, conv_impl="xla")
  shape = tuple(input_shape or INPUT_SHAPES[name])
  params = init_params(model, shape, jax.random.key(0))
  x = jnp.zeros((64,) + shape)
  return xla_flops(model.apply, params, x) / 64


ApplyFn = Callable[[Any, jax.Array], jax.Array]
