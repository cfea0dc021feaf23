"""A split held as arrays, with the same ``len``/``take`` interface as tfds."""

import numpy as np


class ArraySplit:
  """uint8 NHWC images and int32 labels already in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def take(self, indices=None) -> tuple[np.ndarray, np.ndarray]:
    """The given examples (all by default)."""
    if indices is None:
      return self.images, self.labels
    indices = np.asarray(indices, dtype=np.int64)
    return self.images[indices], self.labels[indices]
