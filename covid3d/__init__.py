"""covid3d: COVID detection and severity prediction from lung CT with a 3-D ConvNeXt.

Subpackages: ``models`` (ConvNeXt 2-D/3-D, heads), ``inflation`` (2-D -> 3-D),
``weights`` (PyTorch checkpoint import), ``augment`` (on-device augmentation),
``data`` (readers, phantom, cache, pipeline), ``train`` (sharded training),
``stages`` (the pretraining pipeline), ``bench`` (benchmarks).
"""

__version__ = "0.1.0"

from covid3d import storage as _storage

_storage.configure()   # before any gs:// path is opened (see covid3d.storage)
