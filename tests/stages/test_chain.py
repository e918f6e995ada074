"""The stage chain end to end on a small phantom (two steps per stage): outputs, hand-offs,
determinism, resuming, a preset without cross-validation and the fold ensemble."""
import json

import jax
import nibabel as nib
import numpy as np
import pytest

from covid3d import inflation
from covid3d.data import readers
from covid3d.data.skips import SkipLog
from covid3d.inference import build
from covid3d.inference.teacher import teacher_params
from covid3d.stages import handoff, initial_params, inputs
from covid3d.train import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("compilation_cache")]  # minutes


def test_chain_writes_every_output(chain):
  for stage in ("pretrain2d", "segmentation", "pseudolabel", "segmia", "multitask", "severity"):
    assert (chain / stage / "DONE").exists(), stage
    assert (chain / stage / "config.json").exists(), stage
  for stage in ("pretrain2d", "segmentation", "segmia", "multitask"):
    done = json.loads((chain / stage / "DONE").read_text())
    assert done["best_eval"]["step"] == done["best_step"], stage   # one step's figures
  cv = json.loads((chain / "severity" / "cv.json").read_text())
  assert len(cv["folds"]) == 2 and 0.0 <= cv["mean_macro_f1"] <= 1.0
  rows = (chain / "severity" / "predictions_validation.csv").read_text().splitlines()
  assert rows[0].startswith("scan,p_mild,p_moderate,p_severe,p_critical,class")
  probs = np.array([[float(x) for x in r.split(",")[1:5]] for r in rows[1:]])
  np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
  metrics = json.loads((chain / "severity" / "metrics_validation.json").read_text())
  assert np.sum(metrics["confusion_matrix"]) == metrics["n"] > 0
  assert (chain / "severity" / "confusion_validation.png").stat().st_size > 1000
  files = [(chain / "severity" / "submission_test" / f"{c}.csv").read_text().splitlines()
           for c in ("mild", "moderate", "severe", "critical")]
  assert all(lines[0] == "patient" for lines in files)        # the authors' submission format
  submitted = sum(len(lines) - 1 for lines in files)
  test_csv = chain / "severity" / "predictions_test.csv"
  assert submitted == len(test_csv.read_text().splitlines()) - 1


def test_pseudo_labels_keep_the_scan_geometry(chain):
  masks = sorted((chain / "pseudolabel" / "masks" / "stoic").glob("*.npz"))
  assert masks and set(np.load(masks[0]).files) == {"mask_40", "mask_32"}
  niftis = sorted((chain / "pseudolabel" / "nifti" / "stoic").glob("*_pseudo.nii.gz"))
  assert len(niftis) == len(masks)
  import SimpleITK as sitk
  partition, stem = niftis[0].name[:-len("_pseudo.nii.gz")].split("__", 1)   # train__<scan id>
  assert partition == "train"
  original = sitk.ReadImage(str(chain / "data" / "stoic" / "data" / "mha" / f"{stem}.mha"))
  written = nib.load(str(niftis[0]))
  assert written.shape == original.GetSize()
  np.testing.assert_allclose(nib.affines.voxel_sizes(written.affine), original.GetSpacing(),
                             rtol=1e-5)
  # Origin and direction: ITK (MHA) world coordinates are LPS, NIfTI's RAS, so
  # x and y change sign. NIfTI voxel axes (i, j, k) are ITK's index (x, y, z).
  to_ras = np.diag([-1.0, -1.0, 1.0])
  direction = np.reshape(original.GetDirection(), (3, 3))   # columns: the index axes
  origin = np.asarray(original.GetOrigin())
  assert np.abs(origin).max() > 1.0  # a non-trivial origin (the phantom draws one)
  np.testing.assert_allclose(written.affine[:3, :3],
                             to_ras @ direction @ np.diag(original.GetSpacing()), atol=1e-5)
  np.testing.assert_allclose(written.affine[:3, 3], to_ras @ origin, atol=1e-4)
  np.testing.assert_array_equal(written.affine[3], [0, 0, 0, 1])
  # The far corner voxel lands where SimpleITK puts it.
  corner = [float(n - 1) for n in original.GetSize()]
  lps = np.asarray(original.TransformContinuousIndexToPhysicalPoint(corner))
  np.testing.assert_allclose(written.affine @ np.append(corner, 1.0), np.append(to_ras @ lps, 1.0),
                             atol=1e-4)
  # Both header transforms say so (code 1, scanner), not only the sform.
  assert int(written.header["qform_code"]) == int(written.header["sform_code"]) == 1
  np.testing.assert_allclose(written.get_qform(), written.affine, atol=1e-4)


def test_a_scan_id_in_two_partitions_gets_one_pseudo_label_each(chain):
  """The phantom has a scan id in train and in validation: two masks, each its own scan's."""
  data = chain / "data" / "cov19ctdb"
  folders = [d for d in data.glob("*/*/ct_scan_*") if d.is_dir()] + \
      [d for d in data.glob("test/ct_scan_*") if d.is_dir()]
  partitions_of = {}
  for d in folders:
    partitions_of.setdefault(d.name, []).append(d)
  twice = {name: ds for name, ds in partitions_of.items()
           if len({d.relative_to(data).parts[0] for d in ds}) > 1}
  assert twice, "the test needs a phantom with a scan id in two partitions"
  out = chain / "pseudolabel"
  assert len(list((out / "masks" / "cov19ctdb").glob("*.npz"))) == len(folders)
  shapes = set()
  for ds in twice.values():
    for d in ds:
      key = "__".join(d.relative_to(data).parts)        # partition[__class]__scan id
      assert (out / "masks" / "cov19ctdb" / f"{key}.npz").exists()
      written = nib.load(str(out / "nifti" / "cov19ctdb" / f"{key}_pseudo.nii.gz"))
      shapes.add(written.shape)
      assert written.shape[2] == readers.read_path(d).volume.shape[0], key   # its own slices
  assert len(shapes) > 1     # the namesakes differ, so a swapped mask would show
  ledger = json.loads((out / "skips.json").read_text())["ledger"]
  assert ledger["ok"]
  rows = {(r["dataset"], r["partition"]): r for r in ledger["rows"]}
  assert set(rows) == {("cov19ctdb", "train"), ("cov19ctdb", "validation"),
                       ("cov19ctdb", "test"), ("stoic", "train")}
  for r in rows.values():
    assert r["offered"] == r["used"] + r["skipped"] and r["missing"] == 0
  assert sum(r["used"] for k, r in rows.items() if k[0] == "cov19ctdb") == len(folders)


def _digest(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(v).tobytes() for k, v in flat}


def test_the_chain_is_a_function_of_config_seed_and_data(chain, run_stage, tmp_path):
  """A second run of the pretraining chain (its own phantom copy and records cache)
  hands on bit-identical weights and pseudo-labels."""
  again = tmp_path
  fresh = {"cache_dir": str(again / "cache")}
  run_stage("pretrain2d", again, "pretrain2d", **fresh)
  run_stage("segmentation", again, "segmentation", init_from=str(again / "pretrain2d"), **fresh)
  run_stage("pseudolabel", again, "pseudolabel", init_from=str(again / "segmentation"), **fresh)
  for stage in ("segmia", "multitask"):
    run_stage(stage, again, stage, init_from=str(again / "pretrain2d"),
        pseudo_labels=str(again / "pseudolabel"), **fresh)
  for stage in ("pretrain2d", "segmentation", "segmia", "multitask"):
    assert _digest(initial_params.best_params(str(again / stage))) == \
        _digest(initial_params.best_params(str(chain / stage))), stage
  masks = sorted((chain / "pseudolabel" / "masks").rglob("*.npz"))
  assert masks
  for m in masks:
    assert (again / m.relative_to(chain)).read_bytes() == m.read_bytes(), m.name


def test_finished_folds_are_skipped_on_rerun(chain, run_stage, caplog):
  before = (chain / "severity" / "fold0" / "metrics.jsonl").read_text()
  with caplog.at_level("INFO"):
    run_stage("severity", chain, "severity", init_from=str(chain / "multitask"))
  assert "fold 0 already finished" in caplog.text
  assert (chain / "severity" / "fold0" / "metrics.jsonl").read_text() == before


def test_a_preset_without_cv_trains_one_model_selected_on_validation(chain, run_stage,
                                                                    shrink):
  """detection:authors5 (no CV; here from the chain's full-inflation segmentation, not the
  preset's segmentation_2g): all training scans, selected on the validation partition."""
  workdir = run_stage("detection", chain, "detection_authors5", "authors5,demo",
                      init_from=str(chain / "segmentation"),
                      **{"inflation.mode": "full", "data.folds": 1, "train.num_epochs": 1.0,
                         "train.eval_every_epochs": 1.0})
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["init_from"] == str(chain / "segmentation")
  cv = json.loads((workdir / "cv.json").read_text())
  assert cv["selected_on"] == "validation" and [f["fold"] for f in cv["folds"]] == [0]
  index = inputs.record_source(shrink("detection", chain), str(workdir), "cov19ctdb",
                               ("train", "validation")).index
  labelled = {p: sum(e["covid"] >= 0 for e in index if e["partition"] == p)
              for p in ("train", "validation")}
  assert sum(cv["folds"][0]["train_counts"]) == labelled["train"]
  assert cv["folds"][0]["n_val"] == labelled["validation"] > 0
  assert json.loads((workdir / "DONE").read_text())["ensemble_folds"] == [0]
  # One epoch, resolved from the fold's training records and the global batch (2).
  schedule = json.loads((workdir / "fold0" / "schedule.json").read_text())
  assert schedule["training_records"] == labelled["train"]
  assert schedule["num_steps"] == labelled["train"] // 2 == schedule["steps_per_epoch"]
  assert cv["folds"][0]["step"] == schedule["num_steps"]     # evaluated once, at the end


def _train_config(workdir) -> dict:
  """The ``train`` block ``workdir`` ran with (a fold: its fine-tuning stage's)."""
  saved = workdir / "config.json"
  if not saved.exists():
    saved = workdir.parent / "config.json"
  return json.loads(saved.read_text())["train"]


def _best_row(workdir, metric):
  """The evaluation row of ``metrics.jsonl`` that is best by the rule of ``train.best_*``:

  the earliest of equal maxima, replaced only by a gain above ``best_min_gain``.
  """
  gain = _train_config(workdir)["best_min_gain"]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if r["split"] == "eval"]
  assert evals, workdir
  value = lambda row: row[metric] if row[metric] == row[metric] else -np.inf   # NaN never wins
  best = evals[0]
  for row in evals[1:]:
    if value(row) > value(best) + gain:
      best = row
  return best


def _ema_of(workdir):
  """The EMA and raw parameters of the checkpoint of ``workdir``'s best evaluation, read here."""
  step = _best_row(workdir, _train_config(workdir)["best_metric"])["step"]
  ckpt = checkpoint.Checkpointer.open(str(workdir / "checkpoints"))
  try:
    return (jax.tree.map(np.asarray, ckpt.restore_params(step, ema=True)),
            jax.tree.map(np.asarray, ckpt.restore_params(step, ema=False)))
  finally:
    ckpt.close()


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _backbone_2d(tree):
  return {k: v for k, v in tree.items() if k.startswith(("stem", "down", "stage"))}


def test_stages_hand_on_their_best_weights(chain, shrink):
  """``load_initial_params`` with each hand-off of the chain: the backbone is the
  source's best EMA backbone (pretrain2d: raw, inflated with the config's
  inflation), and each head is the source's, carried as ``model.head_init``
  says (docs/method.md), or fresh."""
  ema, raw = {}, {}
  for stage in ("pretrain2d", "segmentation", "multitask", "severity/fold0"):
    ema[stage], raw[stage] = _ema_of(chain / stage)
    _assert_equal(initial_params.best_params(str(chain / stage)), ema[stage])
    assert not all(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(ema[stage]), jax.tree.leaves(raw[stage]),
                       strict=True)), stage
  assert np.ndim(ema["pretrain2d"]["stem"]["conv"]["kernel"]) == 4  # 2-D

  # pretrain2d hands on its raw weights (pretrain2d.hand_on=raw), as the authors'.
  assert not handoff.hands_on_ema(chain / "pretrain2d")
  _assert_equal(initial_params.read_source(str(chain / "pretrain2d")), raw["pretrain2d"])
  imagenet_norm = raw["pretrain2d"]["head"]["norm"]
  assert "pre_head" not in raw["pretrain2d"]["head"]   # the authors' 2-D model has none
  fresh = {}

  def load(stage, init_from, heads, segmentation, **overrides):
    config = shrink(stage, chain, init_from=str(chain / init_from), **overrides)
    key = (tuple(sorted(heads.items())), segmentation)
    if key not in fresh:
      model = build.make_model(config, heads, segmentation)
      fresh[key] = jax.tree.map(np.asarray,
                                build.init_params(model, config, min(config.data.sizes)))
    return config, fresh[key], initial_params.load_initial_params(config, fresh[key])

  def inflated(config, params2d):
    inf = config.inflation
    return inflation.inflate_params(_backbone_2d(params2d), inf.mode, inf.norm,
                                    new_axis=inf.new_axis, gaussian=inf.gaussian)

  def carried(head, donor, new):
    """``new`` with the donor's LayerNorm (and pre_head), its own classifier."""
    assert set(head) == set(new) and "fc" in head
    for part in head:
      _assert_equal(head[part], donor[part] if part in ("norm", "pre_head") else new[part])

  # segmentation <- pretrain2d (2-D): inflated backbone, fresh segmentation head, and the
  # ImageNet final LayerNorm kept, unused, to hand on (model.head_init=authors) ...
  config, new, got = load("segmentation", "pretrain2d", {}, True)
  assert set(got) == {"backbone", "seg_head", "final_norm"}
  _assert_equal(got["backbone"], inflated(config, raw["pretrain2d"]))
  _assert_equal(got["seg_head"], new["seg_head"])
  _assert_equal(got["final_norm"], imagenet_norm)
  # ... which training leaves as it is (no gradient; the EMA of a constant, to rounding) ...
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               ema["segmentation"]["final_norm"], imagenet_norm)
  # ... and fine-tuning takes: its head's LayerNorm, a fresh classifier.
  _, new, got = load("severity", "segmentation", {"severity": 4}, False)
  assert set(got) == {"backbone", "head_severity"}
  _assert_equal(got["head_severity"], dict(new["head_severity"],
                                           norm=ema["segmentation"]["final_norm"]))

  # pseudolabel <- segmentation: the teacher is the whole EMA model.
  p_config = shrink("pseudolabel", chain, init_from=str(chain / "segmentation"))
  teacher = teacher_params(p_config, build.make_model(p_config, {}, True))
  _assert_equal(teacher, {k: ema["segmentation"][k] for k in ("backbone", "seg_head")})

  # multitask <- pretrain2d: the STOIC head carries the ImageNet head's LayerNorm.
  config, new, got = load("multitask", "pretrain2d", {"stoic_severe": 2}, True)
  assert config.model.head_init == "authors"
  assert set(got) == {"backbone", "head_stoic_severe", "seg_head"}
  _assert_equal(got["backbone"], inflated(config, raw["pretrain2d"]))
  carried(got["head_stoic_severe"], raw["pretrain2d"]["head"], new["head_stoic_severe"])
  _assert_equal(got["seg_head"], new["seg_head"])

  # severity <- multitask (3-D): backbone as is; the severity head carries the STOIC
  # head's LayerNorm and pre_head (another class count: a fresh classifier), or is all
  # fresh ('fresh'); seg_head dropped.
  assert set(ema["multitask"]) == {"backbone", "head_stoic_severe", "seg_head"}
  config, new, got = load("severity", "multitask", {"severity": 4}, False)
  assert set(got) == {"backbone", "head_severity"}
  _assert_equal(got["backbone"], ema["multitask"]["backbone"])
  carried(got["head_severity"], ema["multitask"]["head_stoic_severe"], new["head_severity"])
  _, new, got = load("severity", "multitask", {"severity": 4}, False,
                     **{"model.head_init": "fresh"})
  _assert_equal(got["backbone"], ema["multitask"]["backbone"])
  _assert_equal(got["head_severity"], new["head_severity"])

  # severity <- a severity fold: a head of the same name and shape is taken whole.
  _, new, got = load("severity", "severity/fold0", {"severity": 4}, False)
  _assert_equal(got, ema["severity/fold0"])


def test_cv_json_summarises_each_folds_best_evaluation(chain):
  cv = json.loads((chain / "severity" / "cv.json").read_text())
  names = ("mild", "moderate", "severe", "critical")
  assert [f["fold"] for f in cv["folds"]] == [0, 1]
  for k, fold in enumerate(cv["folds"]):
    best = _best_row(chain / "severity" / f"fold{k}", "macro_f1")
    assert fold["step"] == best["step"] and fold["macro_f1"] == best["macro_f1"]
    for c in range(len(names)):
      assert fold[f"f1_{c}"] == best[f"f1_{c}"]
  assert cv["mean_macro_f1"] == pytest.approx(np.mean([f["macro_f1"] for f in cv["folds"]]),
                                              rel=1e-12, abs=1e-12)
  for c, name in enumerate(names):
    assert cv["mean_f1_per_class"][name] == pytest.approx(
        np.mean([f[f"f1_{c}"] for f in cv["folds"]]), rel=1e-12, abs=1e-12)


def _csv_probs(path):
  """scan -> probabilities of a predictions_<partition>.csv."""
  rows = path.read_text().splitlines()
  assert rows[0].startswith("scan,p_")
  return {r.split(",")[0]: np.array([float(x) for x in r.split(",")[1:-1]]) for r in rows[1:]}


def test_fold_ensemble_is_the_mean_of_the_fold_softmaxes(chain, run_stage, shrink, tmp_path):
  severity = chain / "severity"
  single = []
  for k in range(2):   # the predict stage with one fold selected
    out = run_stage("predict", chain, f"predict_fold{k}", init_from=str(severity),
              **{"predict.folds": str(k), "predict.partitions": "validation"})
    single.append(_csv_probs(out / "predictions_validation.csv"))
    assert json.loads((out / "DONE").read_text())["ensemble_folds"] == [k]
  ensemble = _csv_probs(severity / "predictions_validation.csv")
  assert ensemble and ensemble.keys() == single[0].keys() == single[1].keys()
  assert not all(np.allclose(single[0][s], single[1][s], atol=1e-4) for s in ensemble)
  for scan_id, p in ensemble.items():   # 6-decimal CSV values
    np.testing.assert_allclose(p, (single[0][scan_id] + single[1][scan_id]) / 2, atol=1.5e-6,
                               err_msg=scan_id)

  # Fold k alone: softmax of fold k's best EMA logits, computed here.
  config = shrink("severity", chain)
  skips = SkipLog()
  refs = inputs.list_refs(config, "cov19ctdb", ("validation",), skips)
  source = inputs.record_source(config, str(tmp_path), "cov19ctdb", ("validation",), refs=refs,
                                skips=skips)
  model = build.make_model(config, {"severity": 4}, segmentation=False)
  mean, std = config.data.mean, config.data.std
  logits_of = jax.jit(lambda p, x: model.apply({"params": p}, (x - mean) / std,
                                               deterministic=True)["severity"])
  fields = inputs.batch_fields(config, image_only=True)
  seen = 0
  for k in range(2):
    params = _ema_of(severity / f"fold{k}")[0]
    for batch in inputs.host_batches(source, np.arange(len(source.index)),
                                     config.train.eval_batch_size, fields, config):
      logits = np.asarray(logits_of(params, batch["image"]), np.float64)
      soft = np.exp(logits - logits.max(-1, keepdims=True))
      soft /= soft.sum(-1, keepdims=True)
      for i, valid, s in zip(batch["record_index"], batch["valid"], soft, strict=True):
        if valid:
          np.testing.assert_allclose(single[k][source.index[i]["scan_id"]], s, atol=2e-6)
          seen += 1
  assert seen == 2 * len(ensemble)


def _largest_change(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_segmia_and_multitask_hand_on_their_student_fine_tuned_on_the_lesions(run_stage, tmp_path):
  """The authors' rounds end with a lesion fine-tune of the student (handoff.lesion_finetune);
  the teacher sees augmented scans (pseudolabel.augment_inputs), so its masks differ from the
  clean scans' (a lesion prior of 0.5 makes the untrained teacher's masks input-dependent)."""
  root = tmp_path
  run_stage("segmentation", root, "segmentation", **{"model.seg_head.prior": 0.5})
  teacher = {"init_from": str(root / "segmentation")}
  run_stage("pseudolabel", root, "pseudolabel", **teacher, **{"pseudolabel.write_nifti": False})
  run_stage("pseudolabel", root, "clean", **teacher, **{"pseudolabel.write_nifti": False,
                                                        "pseudolabel.augment_inputs": False})
  masks = sorted((root / "pseudolabel" / "masks" / "stoic").glob("*.npz"))
  assert any(m.read_bytes() != (root / "clean" / m.relative_to(root / "pseudolabel")).read_bytes()
             for m in masks)
  labels = {"init_from": "random", "pseudo_labels": str(root / "pseudolabel")}
  for stage in ("segmia", "multitask"):
    out = run_stage(stage, root, stage, **labels)
    done = json.loads((out / "DONE").read_text())
    assert done["student"] == json.loads((out / "student" / "DONE").read_text())
    assert "dice" in done["best_eval"] and ("auc" in done["student"]["best_eval"]) == (
        stage == "multitask")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["learning_rate"] for r in rows if "learning_rate" in r}
    assert lrs and all(lr == pytest.approx(3e-4 / 5) for lr in lrs)   # the demo's lr / 5
    handed, student = (initial_params.best_params(str(p)) for p in (out, out / "student"))
    assert _largest_change(handed["backbone"], student["backbone"]) > 1e-6   # one step, trained
  # The STOIC head gets no gradient: only the EMA's rounding moves it.
  assert _largest_change(handed["head_stoic_severe"], student["head_stoic_severe"]) < 1e-6
  out = run_stage("segmia", root, "segmia_student", **labels, **{"handoff.lesion_finetune": False})
  assert not (out / "student").exists() and "student" not in json.loads((out / "DONE").read_text())
