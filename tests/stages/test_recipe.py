"""The authors' recipe per stage: augmentation settings and noise units."""
import jax
import numpy as np
import pytest

from covid3d import augment
from covid3d import config as base_config
MEAN, STD = 0.3971, 0.3207


def load_config(name, arg=""):
  return base_config.load(f"{name}:{arg}")


# The authors' submissions (submissions/*/submission0N.py): source stage's
# workdir (named for its inflation), inflation, quarter-turn probability, folds
# (1: trained without CV).
AUTHORS_SUBMISSIONS = {
    ("severity", 1): ("pretrain2d", "full", 0.0, 5),
    ("severity", 2): ("segmentation", "full", 0.0, 5),
    ("severity", 3): ("segmia", "full", 0.0, 5),
    ("severity", 4): ("multitask", "full", 0.0, 5),
    ("severity", 5): ("segmentation", "full", 0.25, 5),
    ("detection", 1): ("pretrain2d", "full", 0.0, 5),
    ("detection", 2): ("multitask_2g", "2g", 0.0, 5),
    ("detection", 3): ("segmia_2g", "2g", 0.0, 5),
    ("detection", 4): ("segmia_2g", "2g", 0.25, 1),
    ("detection", 5): ("segmentation_2g", "2g", 0.0, 1),
}


@pytest.mark.parametrize("target,number", sorted(AUTHORS_SUBMISSIONS))
def test_presets_are_the_authors_submissions(target, number):
  stage, inflation, rot90, folds = AUTHORS_SUBMISSIONS[target, number]
  c = load_config(target, f"authors{number}")
  assert (c.init_from, c.inflation.mode, c.augment.rot90.p, c.data.folds) == (
      f"stage:{stage}", inflation, rot90, folds)
  assert c.loss.balanced and c.predict.folds == str(folds - 1)   # the code's last fold
  epochs = {"severity": 100, "detection": 70}[target]
  assert c.train.num_epochs == epochs and c.train.eval_every_epochs == 1   # steps: at run time


def test_ablation_presets_and_demo_combine():
  assert not load_config("severity", "table1_ce").loss.balanced
  assert load_config("severity", "table2_2g").inflation.mode == "2g"
  assert load_config("severity", "table3_random").init_from == "random"
  c = load_config("severity", "authors5,demo")
  assert c.model.variant == "nano" and c.augment.rot90.p == 0.25   # the preset wins over the demo
  with pytest.raises(ValueError, match="authors1"):
    load_config("severity", "authors9")


@pytest.mark.parametrize("stage", ["segmentation", "segmia", "multitask"])
def test_pretraining_stages_use_no_elastic_or_quarter_turns(stage):
  c = load_config(stage)
  assert c.augment.elastic.p == 0.0 and c.augment.rot90.p == 0.0
  assert c.augment.noise.space == "intensity"


@pytest.mark.parametrize("stage", ["severity", "detection"])
def test_fine_tuning_adds_noise_to_the_normalised_input(stage):
  c = load_config(stage)
  assert c.augment.noise.space == "input" and c.augment.elastic.p == 0.5


def noise_only(space, std):
  c = augment.default_config()
  for step in ("crop", "flip", "rotate", "blur", "rot90", "elastic"):
    c[step].p = 0.0
  c.noise.update(p=1.0, space=space, std=(std, std), skip_minimum=False)
  return c


def test_input_space_noise_has_the_authors_mean_and_std_in_model_units():
  x = np.linspace(0.0, 1.0, 32 ** 3, dtype=np.float32).reshape(32, 32, 32)
  config = augment.resolve_noise_space(noise_only("input", 0.6), MEAN, STD)
  out, _ = jax.jit(lambda k: augment.augment(k, x, None, config))(jax.random.key(0))
  # In the model's units y = (v - MEAN) / STD the authors add 0.03 N(0.5, 0.6) to 0.97 y.
  added = (np.asarray(out) - MEAN) / STD - 0.97 * (x - MEAN) / STD
  assert abs(added.mean() - 0.03 * 0.5) < 5 * 0.03 * 0.6 / np.sqrt(x.size)
  assert added.std() == pytest.approx(0.03 * 0.6, rel=0.02)
  # The same draw in intensity units is STD times larger in std: the old behaviour.
  raw, _ = augment.augment(jax.random.key(0), x, None, noise_only("intensity", 0.6))
  assert ((np.asarray(raw) - 0.97 * x) / 0.03).std() == pytest.approx(0.6, rel=0.02)


def test_augment_refuses_unconverted_input_space():
  with pytest.raises(ValueError, match="resolve_noise_space"):
    augment.augment(jax.random.key(0), np.zeros((8, 8, 8), np.float32), None,
                    noise_only("input", 0.5))


def test_segmia_partitions_are_a_documented_choice():
  c = load_config("segmia")
  assert tuple(c.segmia.partitions) == ("train", "validation", "test")
  text = (base_config.configs_dir() / "segmia.py").read_text()
  assert "transductive" in text and '("train",)' in text


def test_roc_auc_equals_scikit_learn_with_ties():
  from sklearn.metrics import roc_auc_score
  from covid3d import metrics
  rng = np.random.default_rng(0)
  for _ in range(50):
    labels = rng.integers(0, 2, 30)
    scores = np.round(rng.random(30), 1)           # many ties
    assert metrics.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores),
                                                            abs=1e-12)
  assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))


def test_multitask_counts_covid_positive_scans_only_and_scores_by_auc():
  from sklearn.metrics import roc_auc_score
  from covid3d.stages.multitask import multitask_task
  rng = np.random.default_rng(1)
  n = 6
  outputs = {"stoic_severe": rng.normal(size=(n, 2)).astype(np.float32),
             "segmentation": rng.normal(size=(n, 4, 4, 4, 1)).astype(np.float32)}
  batch = {"stoic_covid": np.array([1, 1, 0, 1, 0, 1]),
           "stoic_severe": np.array([0, 1, 1, 1, 0, 0]),
           "mask": rng.integers(0, 2, (n, 4, 4, 4, 1)).astype(np.uint8),
           "valid": np.array([1, 1, 1, 1, 1, 0], bool)}
  task = multitask_task(load_config("multitask").loss.weights)
  loss, weight = task.loss_fn(outputs, batch)
  assert float(weight) == 3.0                      # scans 0, 1, 3: positive and not padding
  other = dict(batch, mask=batch["mask"].copy(), stoic_severe=batch["stoic_severe"].copy())
  other["mask"][2] = 1 - other["mask"][2]          # a COVID-negative scan's mask and label
  other["stoic_severe"][4] = 1
  np.testing.assert_allclose(task.loss_fn(outputs, other)[0], loss, rtol=1e-6)
  sums = jax.tree.map(np.asarray, task.eval_fn(outputs, batch))
  keep = np.array([0, 1, 3])
  summary = task.summarize(dict(sums, examples={k: v[keep] for k, v in sums["examples"].items()}))
  p_severe = jax.nn.softmax(outputs["stoic_severe"], -1)[:, 1]
  assert summary["auc"] == pytest.approx(roc_auc_score(batch["stoic_severe"][keep], p_severe[keep]))


def test_a_tuple_of_names_written_with_commas_is_split():
  c = load_config("segmia")
  c.segmia.partitions = ("train,",)
  c.pseudolabel = base_config.ml_collections.ConfigDict({"datasets": ("stoic, cov19ctdb",)})
  base_config.split_string_tuples(c)
  assert c.segmia.partitions == ("train",)
  assert c.pseudolabel.datasets == ("stoic", "cov19ctdb")
  assert tuple(c.data.sizes) == (256, 224)        # numbers untouched


def test_epochs_become_steps_from_the_records_and_the_global_batch():
  from covid3d.train import config as train_config
  c = load_config("severity").train        # 100 epochs, evaluated every epoch
  records = 258 * 4 // 5                   # four folds of the 258 labelled scans
  resolved, schedule = train_config.resolve_schedule(c, records)
  assert (resolved.num_steps, resolved.eval_every, resolved.checkpoint_every) == (5100, 51, 51)
  assert schedule["steps_per_epoch"] == 51 and c.num_steps != 5100   # the input is unchanged
  c.batch_size = 32                        # e.g. 8 hosts x 4: the same 100 epochs
  resolved, _ = train_config.resolve_schedule(c, records)
  assert (resolved.num_steps, resolved.eval_every) == (600, 6)
  demo = load_config("severity", "demo").train
  assert train_config.resolve_schedule(demo, records) == (demo, None)   # steps as given
  with pytest.raises(ValueError, match="how many training records"):
    train_config.resolve_schedule(c, None)


def test_the_lesion_hold_out_is_the_authors_random_42_draw():
  """Their datasets.py: the scans sorted by name, random.Random(42).shuffle, first int(0.85 n)."""
  import random

  from covid3d.stages import inputs
  rng = np.random.default_rng(0)
  ids = [f"volume-covid19-A-{i:04d}" for i in rng.choice(900, 199, replace=False)]
  theirs = sorted(ids)                                 # their (ct, seg) pairs, in name order
  random.Random(42).shuffle(theirs)
  c = load_config("segmentation")
  assert (c.data.holdout, c.data.holdout_seed, c.data.lesion_val_fraction) == ("authors", 42, 0.15)
  index = [{"scan_id": i} for i in ids]
  train, val = inputs.stage_holdout(c, index, c.data.lesion_val_fraction)
  assert (len(train), len(val)) == (169, 30)
  assert [ids[i] for i in train] == theirs[:169] and [ids[i] for i in val] == theirs[169:]
  c.data.holdout = "seeded"                            # covid3d's earlier draw
  train, val = inputs.stage_holdout(c, index, 0.15)
  assert len(val) == 30 and [ids[i] for i in val] != theirs[169:]
  c.data.holdout = "other"
  with pytest.raises(ValueError, match="data.holdout"):
    inputs.stage_holdout(c, index, 0.15)


def test_multitask_splits_and_batches_the_covid_positive_scans():
  from covid3d.data import pipeline
  from covid3d.stages import multitask
  covid = np.random.default_rng(1).integers(0, 2, 50)
  index = tuple({"scan_id": str(1000 + i), "stoic_covid": int(v)} for i, v in enumerate(covid))
  source = pipeline.RecordSource([{}] * 50, index, "test")
  c = load_config("multitask")
  assert c.multitask.scans == "positive" and c.data.val_fraction == 0.3
  train, val = multitask.split(c, source)
  positive = np.flatnonzero(covid == 1)
  assert sorted([*train, *val]) == list(positive)
  assert len(train) == int(0.7 * len(positive))
  c.multitask.scans = "all"                            # every scan; negatives masked in the loss
  train, val = multitask.split(c, source)
  assert sorted([*train, *val]) == list(range(50)) and len(train) == 35
  c.multitask.scans = "some"
  with pytest.raises(ValueError, match="multitask.scans"):
    multitask.split(c, source)


def test_segmentation_runs_the_authors_119_epochs_and_the_demo_300_steps():
  from covid3d.train import config as train_config
  c = load_config("segmentation")
  resolved, schedule = train_config.resolve_schedule(c.train, 169)   # 85 % of 199 scans
  assert (resolved.num_steps, resolved.eval_every) == (119 * 42, 42)
  assert load_config("segmentation", "demo").train.num_epochs == 0.0
  assert load_config("segmentation", "demo").train.num_steps == 300


@pytest.mark.parametrize("stage", ["segmia", "multitask"])
def test_segmia_and_multitask_hand_on_the_lesion_fine_tune_and_read_unshuffled(stage):
  c = load_config(stage)
  assert c.handoff.lesion_finetune and c.handoff.learning_rate_factor == 0.2
  assert c.handoff.num_epochs == 59.0 and not c.train.shuffle
  assert load_config("segmentation").train.shuffle          # their lesion loader shuffles


def test_pseudo_labels_see_each_scan_through_its_own_augmentation():
  from covid3d.stages import pseudolabel
  c = load_config("pseudolabel", "demo")
  assert c.pseudolabel.augment_inputs and c.augment.elastic.p == 0.0 and c.augment.rot90.p == 0
  for step in ("crop", "rotate", "blur", "noise"):
    c.augment[step].p = 0.0
  c.augment.flip.p = 1.0
  x = np.random.default_rng(0).random((2, 8, 8, 8, 1)).astype(np.float32)
  keys = jax.numpy.stack([pseudolabel.scan_key(0, "train__1"), pseudolabel.scan_key(0, "train__2")])
  out = np.asarray(pseudolabel.augmented_inputs(c)(keys, x, x))
  np.testing.assert_allclose(out, x[:, ::-1, ::-1, ::-1], atol=1e-6)
  c.augment.flip.p = 0.25                              # the authors' draw: per scan, per axis
  flips = [np.asarray(pseudolabel.augmented_inputs(c)(
      jax.numpy.stack([pseudolabel.scan_key(0, f"train__{i}")]), x[:1], x[:1]))
      for i in range(12)]
  changed = [not np.allclose(f, x[:1]) for f in flips]
  assert any(changed) and not all(changed)
  again = pseudolabel.augmented_inputs(c)(jax.numpy.stack([pseudolabel.scan_key(0, "train__3")]),
                                          x[:1], x[:1])
  np.testing.assert_array_equal(again, flips[3])       # a scan's draw is its key's


def test_pseudo_labels_from_augmented_inputs_need_the_upsample_mode(tmp_path):
  from covid3d.stages import pseudolabel
  c = load_config("pseudolabel", "demo")
  c.pseudolabel.mode = "sliding"
  with pytest.raises(ValueError, match="augment_inputs"):
    pseudolabel.run(c, str(tmp_path))


def test_segmia_reads_its_scans_in_the_authors_fixed_order():
  """Their segmia list: the names sorted, shuffled once by random.Random(42), read in order."""
  import random

  from covid3d.data import pipeline
  from covid3d.stages import segmentation
  index = tuple({"scan_id": f"ct_scan_{i}", "partition": p} for p in ("train", "test")
                for i in (3, 1, 20, 7))
  source = pipeline.RecordSource([{}] * 8, index, "test")
  stems = [f"{e['partition']}__{e['scan_id']}" for e in index]
  theirs = sorted(stems)
  random.Random(42).shuffle(theirs)
  c = load_config("segmia")
  assert [stems[i] for i in segmentation.every_record(c, source)] == theirs
  c.data.holdout = "seeded"
  assert list(segmentation.every_record(c, source)) == list(range(8))
