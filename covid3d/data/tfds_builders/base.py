"""Shared TFDS builder: scans -> preprocessed records in array_record files.

Needs no TensorFlow: tensorflow_datasets builds (`download_and_prepare`) and
reads (`tfds.data_source`, `builder.as_data_source`) array_record datasets with
numpy alone. Each dataset module subclasses `ScanRecordBuilder` and only names
its reader (and says where to get the data).
"""
import dataclasses
from collections.abc import Iterator, Mapping

import tensorflow_datasets as tfds
from etils import epath

from covid3d.data import preprocess
from covid3d.data import read_cov19ctdb
from covid3d.data import read_lesions
from covid3d.data import readers
from covid3d.data import schema
from covid3d.data.skips import SkipLog

FILE_FORMAT = "array_record"
CACHE_SUBDIR = "covid3d_cache"
# Folder names of the optional partitions (the readers' own tables); 'train'
# is always listed, STOIC has 'train' only.
_PARTITION_DIRS = {"cov19ctdb": read_cov19ctdb.PARTITION_DIRS,
                   "lesions": read_lesions.PARTITION_DIRS, "stoic": {}}


def dataset_splits(roots: Mapping[str, epath.PathLike], *, strict: bool,
                   skips: SkipLog, prefix: bool) -> dict[str, list]:
  """Lists the scans of every partition present under each dataset root.

  Args:
    roots: dataset name (a key of `readers.DATASETS`) -> its root folder.
    strict: raise on a bad listing entry instead of skipping it.
    skips: collects the skips.
    prefix: name the splits '<dataset>_<partition>' instead of '<partition>'.

  Returns:
    {split name: list of readers.ScanRef}; 'train' always, 'validation' and
    'test' when their folder exists.
  """
  splits = {}
  for name, root in roots.items():
    root = epath.Path(root)
    for partition, dirs in {"train": (), **_PARTITION_DIRS[name]}.items():
      if partition != "train" and not any((root / d).is_dir() for d in dirs):
        continue
      refs = readers.DATASETS[name](root, partition, strict=strict,
                                    skips=skips)
      splits[f"{name}_{partition}" if prefix else partition] = refs
  return splits


@dataclasses.dataclass
class ScanConfig(tfds.core.BuilderConfig):
  """Builder config: the cube sizes of the cached volumes and masks.

  Attributes:
    sizes: edge lengths s of the `volume_<s>` / `mask_<s>` fields, e.g.
      (256, 224): 256 for random 224 crops, 224 for evaluation (the paper).
  """
  sizes: tuple[int, ...] = (256, 224)


def scan_configs(config_cls=ScanConfig, **extra) -> list[ScanConfig]:
  """The standard configs: 'default' (256, 224) and 'demo' (64, 32).

  The demo sizes are multiples of 32 (the ConvNeXt's total stride) so the
  small cube can feed the model directly or be cropped to 32.
  """
  return [
      config_cls(name="default", sizes=(256, 224),
                 description="Volumes resampled to 256^3 and 224^3 (paper).",
                 **extra.get("default", {})),
      config_cls(name="demo", sizes=(64, 32),
                 description="Small cubes 64^3 and 32^3 for demos and tests.",
                 **extra.get("demo", {})),
  ]


class ScanRecordBuilder(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """Builds one record per readable scan of each split.

  Scans are read with `covid3d.data.readers`, preprocessed (in parallel, with
  the content-keyed cache of `covid3d.data.preprocess.build_cache` under
  `<download_dir>/covid3d_cache`, so an interrupted build resumes) and written
  in scan-id order. The dataset's metadata.json holds, per split, the index
  entry (scan id, labels, has_mask) of every record in file order, which the
  grain pipeline uses to pick folds without reading volumes.

  Unreadable scans are skipped with a logged reason (or raise with
  `strict=True`); `build_cache` prints the skip summary of each split and
  writes it to `<cache dir>/skips.json`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = scan_configs()
  DEFAULT_CONFIG_NAME = "default"
  DATASET = ""  # the key of covid3d.data.readers.DATASETS to list scans with
  DESCRIPTION = ""
  HOMEPAGE = ""

  def __init__(self, *,
               file_format: str | tfds.core.FileFormat = FILE_FORMAT,
               workers: int | None = None, strict: bool = False, **kwargs):
    """See tfds.core.GeneratorBasedBuilder.

    Args:
      file_format: must be 'array_record' (random access, no TensorFlow).
      workers: preprocessing processes (None: one per CPU).
      strict: raise on the first unreadable scan instead of skipping it.
      **kwargs: data_dir, config, version.
    """
    if (tfds.core.FileFormat.from_value(file_format) !=
        tfds.core.FileFormat.ARRAY_RECORD):
      raise ValueError(f"file_format={file_format!r}: covid3d datasets are "
                       f"written as {FILE_FORMAT} only")
    self._workers = workers
    self._strict = strict
    super().__init__(file_format=FILE_FORMAT, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=schema.tfds_features(self.builder_config.sizes),
        homepage=self.HOMEPAGE,
        metadata=tfds.core.MetadataDict(),
        # Records are written in key (= scan-id rank) order, so the index in
        # the metadata lines up with the record numbers.
        disable_shuffling=True,
    )

  def _split_refs(self, manual_dir: epath.Path, skips: SkipLog) -> dict:
    """{split name: list of readers.ScanRef} found in `manual_dir`."""
    return dataset_splits({self.DATASET: manual_dir}, strict=self._strict,
                          skips=skips, prefix=False)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    skips = SkipLog()
    splits = self._split_refs(dl_manager.manual_dir, skips)
    cache_dir = epath.Path(dl_manager.download_dir) / CACHE_SUBDIR
    return {name: self._generate_examples(name, refs, cache_dir, skips)
            for name, refs in splits.items()}

  def _generate_examples(self, split: str, refs: list, cache_dir: epath.Path,
                         skips: SkipLog) -> Iterator[tuple[int, dict]]:
    sizes = tuple(self.builder_config.sizes)
    refs = sorted(refs, key=lambda r: r.scan_id)
    paths = preprocess.build_cache(refs, str(cache_dir), sizes,
                                   workers=self._workers, strict=self._strict,
                                   skips=skips)
    if not paths:
      raise ValueError(f"{self.name} split {split!r}: none of its {len(refs)} "
                       f"scans could be read; {skips.summary()}")
    index = self.info.metadata[split] = []
    for key, path in enumerate(paths):
      record = schema.select_fields(preprocess.read_record(path), sizes)
      index.append(schema.index_entry(record))
      yield key, record
