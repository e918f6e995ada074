"""Stage ``pseudolabel``: the segmentation teacher (EMA) labels COV19-CT-DB and STOIC.

For every scan it writes ``masks/<dataset>/<partition>__<scan>.npz`` (hard
0/1 masks at both cached sizes: the records the segmia/multitask stages read)
and, with ``pseudolabel.write_nifti``,
``nifti/<dataset>/<partition>__<scan>_pseudo.nii.gz`` in the scan's original
geometry (spacing, origin, direction), for ITK-SNAP/3D Slicer. A scan is named
by its partition and id: ids repeat across partitions (``inputs.file_stem``).

With several processes each predicts and writes its share of the scans
(``shards``); ``DONE`` is written once all are written.

Modes (``pseudolabel.mode``): ``upsample`` (the authors' code: predict the
input-size cache, upsample trilinearly to the large size: the probabilities
with corners aligned, or with ``pseudolabel.upsample='logits'`` the logits
with half-pixel centres as the authors' ``F.interpolate``) or ``sliding``
(predict the large cache in windows of the input size with
``pseudolabel.overlap``, averaging overlapping probabilities).

``pseudolabel.augment_inputs`` (the authors' code, ``upsample`` mode only):
the teacher sees each scan through the training augmentation (the ``augment``
block: a random crop of the large cache, flips, rotation, blur, noise), drawn
from the scan's own key (``scan_key``), and its mask is stored as the label of
the unaugmented scan, so it is misaligned wherever the draw moved the volume.
"""
import io
import logging
import os
import tempfile
import zlib

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm import tqdm

from covid3d import augment, storage
from covid3d.data import preprocess, readers
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.inference.teacher import teacher_params
from covid3d.inference.window import sliding_window
from covid3d.models.ops import resize_linear
from covid3d.stages import handoff, inputs, shards

DATASETS = (("cov19ctdb", ("train", "validation", "test")), ("stoic", ("train",)))


def scan_key(seed: int, stem: str) -> jax.Array:
  """The augmentation key of one scan: ``seed`` folded with a hash of its ``file_stem``."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(stem.encode()))


def augmented_inputs(config):
  """``(keys (B,), small (B, S, S, S, 1), large) -> (B, S, S, S, 1)``: each scan augmented."""
  cfg = augment.resolve_noise_space(config.augment, config.data.mean, config.data.std)

  def one(args):
    key, small, large = args
    return augment.augment(key, small[..., 0], None, cfg,
                           volume_large=large[..., 0] if cfg.crop.p > 0 else None)[0][..., None]

  return jax.jit(lambda keys, small, large: jax.lax.map(one, (keys, small, large)))


def run(config, workdir):
  p = config.pseudolabel
  if p.augment_inputs and p.mode != "upsample":
    raise ValueError("pseudolabel.augment_inputs (the authors' augmented teacher inputs) needs "
                     f"pseudolabel.mode=upsample, got {p.mode!r}: set one of the two")
  small, big = min(config.data.sizes), max(config.data.sizes)
  model = build.make_model(config, {}, segmentation=True)
  params = teacher_params(config, model)
  if p.upsample not in ("probabilities", "logits"):
    raise ValueError("pseudolabel.upsample must be 'probabilities' or 'logits', "
                     f"got {p.upsample!r}")
  apply_fn = build.apply_fn(model, config, "segmentation")
  logits = jax.jit(lambda x: apply_fn(params, x, True, None))
  prob = lambda x: jax.nn.sigmoid(logits(x))
  augmented = augmented_inputs(config) if p.augment_inputs else None
  counts, skips = {}, SkipLog()
  for dataset, partitions in DATASETS:
    if dataset not in p.datasets:
      continue
    refs = inputs.list_refs(config, dataset, partitions, skips)
    source = inputs.record_source(config, workdir, dataset, partitions, refs=refs, skips=skips)
    ref_of = {(r.partition, r.scan_id): r for r in refs}
    mask_dir = epath.Path(workdir) / "masks" / dataset
    nifti_dir = epath.Path(workdir) / "nifti" / dataset
    mask_dir.mkdir(parents=True, exist_ok=True)
    nifti_dir.mkdir(parents=True, exist_ok=True)
    fields = {"image": f"volume_{small}", "image_large": f"volume_{big}"}
    done = 0
    batches, total = shards.batches(source, fields, config)   # this process's share
    for batch in tqdm(batches, desc=f"pseudo-labels {dataset}", unit="batch", total=total):
      if augmented is not None:
        keys = jnp.stack([scan_key(config.seed, inputs.file_stem(source.index[int(i)]))
                          if i >= 0 else jax.random.key(0) for i in batch["record_index"]])
        batch = dict(batch, image=augmented(keys, batch["image"], batch["image_large"]))
      if p.mode == "sliding":
        large = sliding_window(prob, jnp.asarray(batch["image_large"]), small, p.overlap)
        little = resize_linear(large, (small,) * 3, align_corners=True)
      elif p.upsample == "logits":
        small_logits = logits(jnp.asarray(batch["image"]))
        little = jax.nn.sigmoid(small_logits)
        large = jax.nn.sigmoid(resize_linear(small_logits, (big,) * 3, align_corners=False))
      else:
        little = prob(jnp.asarray(batch["image"]))
        large = resize_linear(little, (big,) * 3, align_corners=True)
      # A model at one device per process; each process writes the masks of its scans.
      for row in np.flatnonzero(np.asarray(batch["valid"])):
        done += 1
        entry = source.index[int(batch["record_index"][row])]
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, **{f"mask_{small}": np.asarray(little[row, ..., 0] > 0.5, np.uint8),
                       f"mask_{big}": np.asarray(large[row, ..., 0] > 0.5, np.uint8)})
        storage.write_bytes(mask_dir / f"{inputs.file_stem(entry)}.npz", buffer.getvalue())
        if p.write_nifti:
          _write_nifti(ref_of[entry["partition"], entry["scan_id"]], large[row], nifti_dir, config)
    if jax.process_count() > 1:
      done = int(np.sum(multihost_utils.process_allgather(np.int32(done))))
    counts[dataset] = done
    logging.info("pseudo-labelled %d %s scans into %s", done, dataset, mask_dir)
  if jax.process_count() > 1:  # DONE only once every process has written its masks
    multihost_utils.sync_global_devices("covid3d pseudolabel written")
  handoff.mark_done(workdir, {"scans": counts})
  return counts


def _write_nifti(ref, prob_large, nifti_dir, config):
  """Writes one mask in the original scan's grid and geometry."""
  scan = readers.load_scan(ref, strict=config.data.strict)
  if scan is None:
    return
  prob = preprocess.zoom_linear(prob_large[..., 0], scan.volume.shape)
  name = f"{inputs.file_stem({'partition': ref.partition, 'scan_id': ref.scan_id})}_pseudo.nii.gz"
  with tempfile.TemporaryDirectory() as tmp:  # nibabel writes local files; the workdir may be gs://
    readers.write_mask_like(np.asarray(prob > 0.5, np.uint8), scan, os.path.join(tmp, name))
    storage.write_bytes(nifti_dir / name, epath.Path(tmp, name).read_bytes())
