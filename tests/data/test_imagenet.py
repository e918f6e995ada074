"""Tests for covid3d.data.imagenet (streamed grayscale ImageNet) and the pretrain2d stage on it.

A tiny ImageNet stand-in (random JPEGs in ILSVRC2012_img_{train,val}.tar) is
prepared once per module as the TFDS imagenet2012 array_record dataset, without
TensorFlow, and read through tfds.data_source as the stage does.
"""
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d import config as base_config
from covid3d import losses
from covid3d.bench import imagenet as bench_imagenet
from covid3d.data import imagenet
from covid3d.stages import handoff, pretrain2d, registry
from covid3d.train import log, loop

TRAIN, VAL, CLASSES, SIZE = 48, 12, 6, 32


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  manual, data_dir = root / "manual", root / "tfds"
  bench_imagenet.write_manual_dir(str(manual), TRAIN, VAL, CLASSES, seed=1, max_side=72)
  imagenet.prepare(str(manual), str(data_dir))
  return {"manual": str(manual), "data_dir": str(data_dir),
          "train": imagenet.open_source("train", data_dir=str(data_dir)),
          "validation": imagenet.open_source("validation", data_dir=str(data_dir))}


def recipe(size=SIZE):
  return imagenet.TrainTransform(size=size, mean=0.4, std=0.3), imagenet.Mixup()


def take(ds, n, state=None):
  it = iter(ds)
  if state is not None:
    it.set_state(state)
  return [next(it) for _ in range(n)], it


def train_ds(source, **kwargs):
  transform, mixup = recipe()
  kwargs = {"global_batch_size": 8, "transform": transform, "mixup": mixup, "seed": 5,
            "threads": 2, "prefetch": 2, **kwargs}
  return imagenet.train_dataset(source, **kwargs)


def test_prepared_stand_in_has_the_imagenet_layout(stand_in):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  wnids = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
  val_labels = tfds.core.tfds_path(
      "datasets/imagenet2012/validation_labels.txt").read_text().split()
  train, val = stand_in["train"], stand_in["validation"]
  assert (len(train), len(val)) == (TRAIN, VAL)
  for i in range(TRAIN):
    e = train[i]
    assert isinstance(e["image"], bytes) and e["image"][:2] == b"\xff\xd8"  # undecoded JPEG
    assert e["label"] == wnids.index(e["file_name"].decode().split("_")[0]) < CLASSES
  for i in range(VAL):
    e = val[i]
    number = int(e["file_name"].decode()[len("ILSVRC2012_val_"):-len(".JPEG")])
    assert e["label"] == wnids.index(val_labels[number - 1])
  with pytest.raises(FileNotFoundError, match="not prepared"):
    imagenet.open_source("train", data_dir=str(Path(stand_in["data_dir"]) / "elsewhere"))


def test_train_stream_shapes_labels_and_epochs(stand_in):
  source = stand_in["train"]
  batches, _ = take(train_ds(source), 12)  # 6 global batches per epoch
  b = batches[0]
  assert b["image"].shape == (8, SIZE, SIZE, 1) and b["image"].dtype == np.float32
  assert b["label"].dtype == b["label_mix"].dtype == b["record_index"].dtype == np.int32
  assert b["mix_lam"].shape == (8,) and b["mix_lam"].dtype == np.float32
  for batch in batches:
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(
        batch["label"], [source[int(i)]["label"] for i in batch["record_index"]])
    np.testing.assert_array_equal(batch["label_mix"], batch["label"][np.arange(8) ^ 1])
  epochs = [np.concatenate([x["record_index"] for x in batches[e:e + 6]]) for e in (0, 6)]
  for order in epochs:
    assert sorted(order.tolist()) == list(range(TRAIN))  # each image once per epoch
  assert not np.array_equal(*epochs)  # a new permutation each epoch
  plain = imagenet.TrainTransform(size=SIZE, random_crop=False, randaugment="", erase=0.0)
  (u,), _ = take(train_ds(source, transform=plain, mixup=None, image_dtype="uint8"), 1)
  assert u["image"].dtype == np.uint8 and set(u) == {"image", "label", "record_index"}
  # Without augmentation a training image is the eval transform of its JPEG.
  i = int(u["record_index"][0])
  np.testing.assert_array_equal(u["image"][0, ..., 0],
                                imagenet.EvalTransform(SIZE)(source[i]["image"]))


def test_stream_is_deterministic_from_the_seed(stand_in):
  a, _ = take(train_ds(stand_in["train"]), 3)
  b, _ = take(train_ds(stand_in["train"]), 3)
  c, _ = take(train_ds(stand_in["train"], seed=6), 3)
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(a[0]["record_index"], c[0]["record_index"])


def test_resumes_exactly_from_its_state(stand_in):
  ds = train_ds(stand_in["train"])
  whole, _ = take(ds, 9)  # crosses the epoch boundary after 6
  _, it = take(ds, 4)
  state = json.loads(json.dumps(it.get_state()))  # a small JSON dict
  assert state == {"next_index": 4}
  rest, _ = take(ds, 5, state)
  for x, y in zip(whole[4:], rest, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_worker_processes_give_the_same_batches_and_resume(stand_in):
  source = stand_in["train"]
  whole, _ = take(train_ds(source), 6)
  it = iter(train_ds(source, workers=2))
  try:
    got = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed, it = take(train_ds(source, workers=2), 3, state)
  it.close()
  for x, y in zip(whole, got + resumed, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_two_processes_share_the_global_batch(stand_in):
  source = stand_in["train"]
  whole, _ = take(train_ds(source), 4)
  parts = [take(train_ds(source, process_index=p, process_count=2), 4)[0] for p in (0, 1)]
  for k in range(4):
    for key in whole[k]:
      got = np.concatenate([parts[0][k][key], parts[1][k][key]])
      np.testing.assert_array_equal(got, whole[k][key])
  with pytest.raises(ValueError, match="even"):
    take(train_ds(source, global_batch_size=6, process_count=2), 1)


def test_eval_stream_covers_the_split_once(stand_in):
  source = stand_in["validation"]
  for count in (1, 2):
    per_process = [list(imagenet.eval_dataset(
        source, global_batch_size=8, transform=imagenet.EvalTransform(SIZE), process_index=p,
        process_count=count, threads=1)) for p in range(count)]
    assert {len(x) for x in per_process} == {2}  # ceil(12 / 8) on every process
    seen = []
    for batches in per_process:
      for batch in batches:
        assert batch["image"].shape == (8 // count, SIZE, SIZE, 1)
        valid = batch["valid"]
        np.testing.assert_array_equal(batch["label"][~valid], -1)
        np.testing.assert_array_equal(batch["image"][~valid], 0)
        np.testing.assert_array_equal(
            batch["label"][valid], [source[int(i)]["label"] for i in batch["record_index"][valid]])
        seen += batch["record_index"][valid].tolist()
    assert sorted(seen) == list(range(VAL))


def gradient_image(w=90, h=60):
  x = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
  return np.stack([x, x[::-1, ::-1], np.full_like(x, 128)], -1).astype(np.uint8)


@pytest.mark.parametrize("op", sorted(set(imagenet.RAND_TRANSFORMS)
                                      | set(imagenet.RAND_INCREASING_TRANSFORMS)))
def test_every_randaugment_op_keeps_size_and_mode(op):
  ra = imagenet.RandAugment(magnitude=9, magnitude_std=0.5, ops=(op,), prob=1.0, num_layers=3)
  im = imagenet.decode_gray(gradient_image())
  for seed in range(4):
    out = ra(im, np.random.default_rng(seed), fill=117)
    assert out.size == im.size and out.mode == "L"
  if op in ("Color", "ColorIncreasing"):  # saturation is a no-op on gray images
    np.testing.assert_array_equal(np.asarray(out), np.asarray(im))


def test_randaugment_parses_timm_strings():
  ra = imagenet.RandAugment.parse("rand-m9-mstd0.5-inc1")
  assert (ra.magnitude, ra.num_layers, ra.magnitude_std, ra.prob) == (9, 2, 0.5, 0.5)
  assert ra.ops == imagenet.RAND_INCREASING_TRANSFORMS
  assert imagenet.RandAugment.parse("rand-m7-n3-mstd101").magnitude_std == math.inf
  with pytest.raises(ValueError, match="unsupported"):
    imagenet.RandAugment.parse("rand-m9-w0")


def test_crops_flips_and_erasing_keep_range():
  rng = np.random.default_rng(0)
  for _ in range(50):
    left, top, right, bottom = imagenet.random_resized_crop_box(90, 60, rng)
    assert 0 <= left < right <= 90 and 0 <= top < bottom <= 60
  assert imagenet.random_resized_crop_box(400, 10, rng, scale=(0.9, 1.0)) == (193, 0, 206, 10)
  transform = imagenet.TrainTransform(size=SIZE, erase=1.0, mean=0.4, std=0.3)
  for seed in range(10):
    out = transform(gradient_image(), np.random.default_rng(seed))
    assert out.shape == (SIZE, SIZE) and out.dtype == np.uint8
  flat = np.full((40, 40), 7, np.uint8)
  imagenet.random_erase(flat, np.random.default_rng(1), mean=0.4, std=0.3)
  erased = flat != 7
  assert 0.02 * 1600 * 0.5 < erased.sum() < 1600 / 3 * 1.5  # one box of 2 to 33 %
  rows, cols = np.nonzero(erased)
  assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].mean() > 0.95
  assert abs(flat[erased].mean() / 255 - 0.4) < 0.06  # N(mean, std), clipped


@pytest.mark.parametrize("dtype", [np.float32, np.uint8])
@pytest.mark.parametrize("mode", ["batch", "pair"])
@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixup_and_cutmix_keep_labels_range_and_lam(mode, kind, dtype):
  b = 8
  top = 255 if dtype == np.uint8 else 1.0
  const = np.round(np.linspace(0.0, 1.0, b) * top).astype(dtype)
  batch = {"image": np.ones((b, 16, 16, 1), dtype) * const[:, None, None, None],
           "label": np.arange(b, dtype=np.int32) + 10}
  mix = imagenet.Mixup(mixup_alpha=0.8 if kind == "mixup" else 0.0,
                       cutmix_alpha=1.0 if kind == "cutmix" else 0.0, mode=mode)
  for seed in range(5):
    out = mix(dict(batch, image=batch["image"].copy()), np.random.default_rng(seed),
              global_batch=16, start=8)
    lam = out["mix_lam"]
    assert out["image"].dtype == dtype
    np.testing.assert_array_equal(out["label"], batch["label"])
    np.testing.assert_array_equal(out["label_mix"], batch["label"][np.arange(b) ^ 1])
    assert (0 <= lam).all() and (lam <= 1).all()
    assert 0 <= out["image"].min() and out["image"].max() <= top
    own, partner = const.astype(np.float64), const[np.arange(b) ^ 1].astype(np.float64)
    # The image mean is lam of its own value and 1 - lam of its partner's
    # (for CutMix lam is the share of pixels kept: timm's correct_lam).
    np.testing.assert_allclose(out["image"].astype(np.float64).mean(axis=(1, 2, 3)),
                               lam * own + (1 - lam) * partner,
                               atol=0.51 if dtype == np.uint8 else 1e-5)
    if mode == "batch":
      assert len(set(lam.tolist())) == 1
  with pytest.raises(ValueError, match="mode"):
    imagenet.Mixup(mode="elem")


def test_soft_label_loss():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  label = jnp.asarray([0, 1, 2, 3, 4, -1], jnp.int32)
  plain = pretrain2d.soft_label_task(5, 0.0).loss_fn(logits, {"label": label})
  np.testing.assert_allclose(plain[0], losses.cross_entropy(logits, label), rtol=1e-6)
  assert float(plain[1]) == 5
  other = jnp.asarray([1, 0, 3, 2, 4, 0], jnp.int32)
  lam = jnp.asarray([0.7, 0.2, 1.0, 0.5, 0.0, 0.3], jnp.float32)
  valid = jnp.asarray([True, True, True, True, False, True])
  got, weight = pretrain2d.soft_label_task(5, 0.1).loss_fn(
      logits, {"label": label, "label_mix": other, "mix_lam": lam, "valid": valid})
  logp = np.asarray(jax.nn.log_softmax(logits))
  smooth = lambda y: np.eye(5)[y] * 0.9 + 0.1 / 5
  want = [-(np.asarray(lam)[i] * smooth(label[i]) + (1 - np.asarray(lam)[i]) * smooth(other[i]))
          @ logp[i] for i in range(4)]
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
  assert float(weight) == 4
  zero = pretrain2d.soft_label_task(5, 0.1).loss_fn(logits, {"label": jnp.full((6,), -1)})
  assert float(zero[0]) == 0.0 and float(zero[1]) == 0.0


def test_imagenet_input_is_normalised_as_the_authors():
  """Their ImageNet input: each RGB channel normalised (timm's ImageNet mean/std), then
  torchvision's Grayscale; for a gray pixel that is one (mean, std) in [0, 1] units."""
  x = np.random.default_rng(0).uniform(size=1000)
  theirs = sum(w * (x - m) / s for w, m, s in zip((0.2989, 0.587, 0.114), (0.485, 0.456, 0.406),
                                                  (0.229, 0.224, 0.225), strict=True))
  mean, std = imagenet.gray_normalisation()
  np.testing.assert_allclose((x - mean) / std, theirs, rtol=1e-9, atol=1e-9)
  assert (round(mean, 4), round(std, 4)) == (0.4588, 0.2256)
  assert (imagenet.TrainTransform().mean, imagenet.TrainTransform().std) == (mean, std)

  c = base_config.load("pretrain2d")
  c.data.imagenet_dir = "/imagenet"
  assert c.pretrain2d.normalise == "imagenet"
  assert pretrain2d.input_normalisation(c) == (mean, std)
  c.pretrain2d.normalise = "ct"
  assert pretrain2d.input_normalisation(c) == (0.3971, 0.3207)   # the CT statistics
  c.pretrain2d.normalise, c.data.imagenet_dir = "imagenet", ""  # phantom slices are CT
  assert pretrain2d.input_normalisation(c) == (0.3971, 0.3207)
  c.pretrain2d.normalise = "rgb"
  with pytest.raises(ValueError, match="pretrain2d.normalise"):
    pretrain2d.input_normalisation(c)


@pytest.mark.slow  # compiling the step
def test_stage_trains_a_step_on_the_stand_in(stand_in, tmp_path, monkeypatch, shrink):
  """One step of the stage on the stand-in; its evaluation batches are drawn, not evaluated.

  (Checkpoints, evaluation and the hand-off are the training loop's and the
  stages' tests.)
  """
  # The official recipe's data side (whatever the demo config says), on the stand-in.
  recipe = {f"pretrain2d.{k}": v for k, v in base_config.load("pretrain2d").pretrain2d.items()}
  c = shrink("pretrain2d", tmp_path, **{
      **recipe, "data.phantom": False, "data.imagenet_dir": stand_in["manual"],
      "data.loader_threads": 2, "pretrain2d.image_size": SIZE,
      "pretrain2d.tfds_data_dir": stand_in["data_dir"], "pretrain2d.max_eval_examples": 8,
      "train.num_steps": 1, "train.log_every": 1, "train.batch_size": 4,
      "train.eval_batch_size": 4})
  given = {}
  train_and_evaluate = loop.train_and_evaluate

  def without_evaluation(*args, eval_batches, **kwargs):
    given["eval_batches"] = eval_batches
    return train_and_evaluate(*args, eval_batches=None, **kwargs)

  monkeypatch.setattr(loop, "train_and_evaluate", without_evaluation)
  apply_fn = pretrain2d.build.apply_fn

  def recording_apply_fn(*args, **kwargs):
    given["normalisation"] = kwargs["normalisation"]
    return apply_fn(*args, **kwargs)

  monkeypatch.setattr(pretrain2d.build, "apply_fn", recording_apply_fn)
  # Marking the workdir done needs an evaluation (the stages' tests check it).
  monkeypatch.setattr(handoff, "mark_trained", lambda workdir, result: None)
  workdir = tmp_path / "pretrain2d"
  assert registry.run(c, str(workdir))["step"] == 1
  (row,) = [r for r in log.read_metrics(workdir) if r["split"] == "train"]
  assert np.isfinite(row["loss"]) and row["loss"] > 0
  assert given["normalisation"] == imagenet.gray_normalisation()   # pretrain2d.normalise
  batch = next(iter(given["eval_batches"]()))
  assert batch["image"].shape[1:3] == (SIZE, SIZE) and len(batch["image"]) == 4
