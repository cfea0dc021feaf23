"""The in-memory dataset container shared by every loader."""

from typing import NamedTuple

import numpy as np


class Dataset(NamedTuple):
  """A supervised image-classification dataset held in host memory.

  Attributes:
    train_images: float32 array (num_train, height, width, channels).
    train_labels: int32 array (num_train,), values in [0, num_classes).
    test_images: float32 array (num_test, height, width, channels).
    test_labels: int32 array (num_test,).
    num_classes: number of classes.
    name: dataset name, e.g. ``"digits"``.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  name: str

  @property
  def image_shape(self):
    return tuple(self.train_images.shape[1:])
