"""The one cache root of covid3d, and what lives under it.

``$COVID3D_CACHE_DIR`` (default ``~/.cache/covid3d``; ``--config.cache_dir``
sets it for a ``covid3d.main`` run) holds:

* ``jax/``: XLA's persistent compilation cache (folds and stages with the
  same step program compile once);
* ``dwconv_auto.json``: the depthwise-convolution backend that ``auto``
  measured fastest per device, shape and dtype;
* ``records/<dataset>/``: preprocessed scans (``covid3d.data.preprocess``),
  keyed by file contents and settings, so several runs can share them
  (unless ``data.records_dir`` names a store outside the cache root).

Everything here can be deleted; it is rebuilt on use. The root is a local
folder, one per host on a pod: without ``data.records_dir`` each host builds
the same records from the same files, and the depthwise choice of process 0
is used by every host (``covid3d.models.dwconv_tune``).
"""
import os

ENV = "COVID3D_CACHE_DIR"


def root() -> str:
  """The cache root: ``$COVID3D_CACHE_DIR``, else ``~/.cache/covid3d``."""
  return os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "covid3d")


def path(*parts: str) -> str:
  """A path under the cache root, e.g. ``path("records", "lesions")``."""
  return os.path.join(root(), *parts)
