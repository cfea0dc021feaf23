"""scikit-learn's bundled 8x8 handwritten digits: the embedded default dataset.

1,797 real 8x8 grey-scale digits ship inside scikit-learn, so this dataset needs
no download. We split it deterministically into 1,437 training and 360 test
examples (an 80/20 stratified split with a fixed seed) and scale pixels from
[0, 16] to [0, 1].
"""

import numpy as np

from dssgd_jax.data.base import Dataset

NUM_TRAIN = 1437


def load_digits() -> Dataset:
  """Loads the bundled digits as a :class:`Dataset` of 8x8x1 float32 images.

  >>> ds = load_digits()
  >>> ds.train_images.shape, ds.test_images.shape
  ((1437, 8, 8, 1), (360, 8, 8, 1))
  """
  from sklearn.datasets import load_digits as _sk_load_digits  # pylint: disable=g-import-not-at-top
  bunch = _sk_load_digits()
  images = (bunch.images.astype(np.float32) / 16.0)[..., None]
  labels = bunch.target.astype(np.int32)
  # Deterministic stratified split: within each class, a fixed permutation.
  rng = np.random.default_rng(0)
  test_idx = []
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    idx = rng.permutation(idx)
    test_idx.extend(idx[:36].tolist())
  test_mask = np.zeros(len(labels), dtype=bool)
  test_mask[test_idx] = True
  train_idx = rng.permutation(np.flatnonzero(~test_mask))
  test_idx = np.flatnonzero(test_mask)
  return Dataset(images[train_idx], labels[train_idx], images[test_idx],
                 labels[test_idx], 10, "digits")
