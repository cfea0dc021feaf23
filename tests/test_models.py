"""Models: parameter counts (SPEC section 4) and the im2col convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dssgd_jax import models


@pytest.mark.parametrize("name", models.MODELS)
def test_parameter_counts(name):
  model = models.get_model(name)
  params = models.init_params(model, models.INPUT_SHAPES[name],
                              jax.random.key(0))
  assert models.num_params(params) == models.PARAM_COUNTS[name]


def test_spec_counts():
  # The numbers SPEC section 4 fixes.
  assert models.PARAM_COUNTS["mnist_cnn"] == 105_506
  assert models.PARAM_COUNTS["mnist_mlp"] == 109_386
  assert models.PARAM_COUNTS["svhn_cnn"] == 313_546


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("k", [3, 5])
def test_im2col_equals_xla_conv(padding, k):
  kx, kk = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (3, 12, 11, 4))
  kernel = jax.random.normal(kk, (k, k, 4, 6))
  ours = models.im2col_conv(x, kernel, padding)
  ref = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mnist_cnn", "svhn_cnn", "digits_cnn"])
def test_conv_impls_agree_under_vmap(name):
  shape = models.INPUT_SHAPES[name]
  fast = models.get_model(name, conv_impl="im2col")
  slow = models.get_model(name, conv_impl="xla")
  keys = jax.random.split(jax.random.key(0), 3)
  params = jax.vmap(lambda k: models.init_params(fast, shape, k))(keys)
  x = jax.random.normal(jax.random.key(2), (3, 5) + shape)
  a = jax.vmap(fast.apply)(params, x)
  b = jax.vmap(slow.apply)(params, x)
  assert a.shape == (3, 5, 10)
  np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_flops_positive_and_ordered():
  assert models.flops_per_example("svhn_cnn") > models.flops_per_example(
      "mnist_cnn") > models.flops_per_example("digits_mlp") > 0
