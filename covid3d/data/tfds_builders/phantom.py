"""`phantom`: the synthetic chest CTs of covid3d.data.phantom, via the readers.

The raw data is written in the three real formats into the manual dir when
that is missing or empty, then read back with the real readers, so a phantom
build exercises exactly the path real data takes.
"""
import dataclasses

from etils import epath

from covid3d.data import phantom_writers
from covid3d.data.tfds_builders import base


@dataclasses.dataclass
class PhantomConfig(base.ScanConfig):
  """ScanConfig plus what to generate when the manual dir is empty.

  Attributes:
    scans_per_dataset: scans written per format (COV19-CT-DB, lesions, STOIC).
    seed: generation seed.
  """
  scans_per_dataset: int = 16
  seed: int = 0


class Phantom(base.ScanRecordBuilder):
  """Synthetic COV19-CT-DB, COVID-19-20 lesion and STOIC scans.

  Splits are `<dataset>_<partition>`: cov19ctdb_train, cov19ctdb_validation,
  cov19ctdb_test, lesions_train, stoic_train.
  """

  BUILDER_CONFIGS = base.scan_configs(
      PhantomConfig, default={"scans_per_dataset": 64},
      demo={"scans_per_dataset": 16})
  DESCRIPTION = __doc__
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Nothing to download: the phantom is written into the manual dir (default
  <data_dir>/downloads/manual) when that is missing or empty. To use another
  phantom set, write it with `python -m covid3d.data.phantom_writers --out DIR --n N`
  and pass --manual_dir DIR.
  """

  def _make_download_manager(self, download_dir, download_config):
    manager = super()._make_download_manager(download_dir, download_config)
    # Same default as tfds: <download_dir>/manual.
    manual = epath.Path(download_config.manual_dir or
                        epath.Path(manager.download_dir) / "manual")
    if not manual.exists() or not any(manual.iterdir()):
      config = self.builder_config
      phantom_writers.write_all(str(manual), config.seed,
                                config.scans_per_dataset,
                                workers=self._workers or 1)
    return manager

  def _split_refs(self, manual_dir, skips):
    return base.dataset_splits(
        {name: epath.Path(manual_dir) / phantom_writers.DATASET_DIRS[name]
         for name in phantom_writers.DATASETS},
        skips=skips, strict=self._strict, prefix=True)
