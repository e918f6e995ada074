"""The authors' PyTorch files (Kienzle et al.) load into covid3d with the same outputs.

The PyTorch models here are written for this test the way the authors' code
builds them (module names, LayerNorms, the UperNeXt decoder's upsampling, the
MultiNeXt heads), tiny (depths 1, widths 8..64), and saved in each of their
file formats: pretraining (``{'epoch', 'model_state_dict', ...}``), training
checkpoints (``{'model', 'model_ema', 'config', ...}``) and wrapped-up
submission files (``{'config', 'data_transforms', 'model_ema': [...]}``).
"""
import datetime
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d import authors, weights
from covid3d.inference import build, ensemble, workdir
from covid3d.models import MultitaskModel
from covid3d.stages import initial_params

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

TINY = dict(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
NANO = dict(depths=(2, 2, 2, 2), dims=(16, 32, 64, 128))
CONFIG = {  # a training config as theirs pickles it: a datetime, a path, nested dicts
    "created": datetime.datetime(2022, 7, 1, 12, 0), "cache_path": pathlib.Path("/cache"),
    "cv_enabled": True, "_current_fold": 4,
    "modelconfig": {"loss_fn": "balce_sev_eccv", "num_classes": 4, "size": "tiny", "in_chan": 1}}
TRANSFORMS = [{"_tfm": "LoadJpegs"}, {"_tfm": "Zoom", "new_shape": (224, 224, 224)}]


# ---------------------------------------------------------------- their models, written here

class LayerNorm3d(nn.Module):
  def __init__(self, c, eps=1e-6, data_format="channels_last"):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(c))
    self.bias = nn.Parameter(torch.zeros(c))
    self.eps, self.data_format = eps, data_format

  def forward(self, x):
    if self.data_format == "channels_last":
      return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + self.eps)
    return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]


class Block3d(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
    self.norm = LayerNorm3d(dim, eps=1e-6)
    self.pwconv1 = nn.Linear(dim, 4 * dim)
    self.act = nn.GELU()
    self.pwconv2 = nn.Linear(4 * dim, dim)
    self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

  def forward(self, x):
    y = self.dwconv(x).permute(0, 2, 3, 4, 1)
    y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
    return x + y.permute(0, 4, 1, 2, 3)


class ConvNeXt3d(nn.Module):
  """Their 3-D ConvNeXt: an extra pre_head Linear and (unused here) age/sex layers."""

  def __init__(self, num_classes, depths, dims, in_chans=1):
    super().__init__()
    self.downsample_layers = nn.ModuleList([nn.Sequential(
        nn.Conv3d(in_chans, dims[0], kernel_size=4, stride=4),
        LayerNorm3d(dims[0], eps=1e-6, data_format="channels_first"))])
    for i in range(3):
      self.downsample_layers.append(nn.Sequential(
          LayerNorm3d(dims[i], eps=1e-6, data_format="channels_first"),
          nn.Conv3d(dims[i], dims[i + 1], kernel_size=2, stride=2)))
    self.stages = nn.ModuleList([nn.Sequential(*[Block3d(dims[i]) for _ in range(depths[i])])
                                 for i in range(4)])
    self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
    self.pre_head = nn.Linear(dims[-1], dims[-1])
    self.metadata_prehead = nn.Linear(4, dims[-1], bias=False)
    self.head = nn.Linear(dims[-1], num_classes)
    self.metadata_embedding = nn.Linear(4, dims[-1])

  def forward(self, x, get_features=False):
    features = []
    for down, stage in zip(self.downsample_layers, self.stages, strict=True):
      x = stage(down(x))
      features.append(x)
    if get_features:
      return features
    x = self.norm(x.mean([-3, -2, -1]))
    return self.head(F.relu(self.pre_head(x)))


class ConvNeXt3dSTOIC(nn.Module):
  def __init__(self, num_classes=2, **kw):
    super().__init__()
    self.main_model = ConvNeXt3d(num_classes, **kw)

  def forward(self, x, get_features=False):
    return self.main_model(x, get_features)


class UpsampleLayer(nn.Module):
  def __init__(self, factor):
    super().__init__()
    self.factor = factor

  def forward(self, x):
    shape = x.shape[2:]
    if 3 in shape:  # their special case for odd sizes (input edges not divisible by 32)
      size = tuple(s * self.factor + (self.factor // 2 if s == 3 else 0) for s in shape)
      return F.interpolate(x, size=size, mode="trilinear", align_corners=True)
    return F.interpolate(x, scale_factor=self.factor, mode="trilinear", align_corners=True)


class UperNeXtDecoder(nn.Module):
  def __init__(self, dims, upsample_dim=16):
    super().__init__()
    self.upsample_blocks = nn.ModuleList([nn.Sequential(
        nn.Conv3d(dims[-1 - j], upsample_dim, 1),
        LayerNorm3d(upsample_dim, data_format="channels_first"),
        nn.ReLU(), UpsampleLayer(factor=2 ** (3 - j))) for j in range(4)])
    self.segmentation_head = nn.Sequential(
        nn.Conv3d(4 * upsample_dim, upsample_dim, 7, padding="same"),
        LayerNorm3d(upsample_dim, data_format="channels_first"), nn.ReLU(),
        nn.Conv3d(upsample_dim, upsample_dim, 7, padding="same"),
        LayerNorm3d(upsample_dim, data_format="channels_first"), nn.ReLU(),
        nn.Conv3d(upsample_dim, 1, 7, padding="same"), UpsampleLayer(factor=4))

  def forward(self, features):
    outputs = [self.upsample_blocks[-i - 1](f) for i, f in enumerate(features)]
    return self.segmentation_head(torch.cat(outputs, dim=1))


class UperNeXt(nn.Module):
  def __init__(self, **kw):
    super().__init__()
    self.encoder = ConvNeXt3dSTOIC(**kw)
    self.decoder = UperNeXtDecoder(kw["dims"])

  def forward(self, x):
    return self.decoder(self.encoder(x, get_features=True))


class MultiNeXt(nn.Module):
  def __init__(self, **kw):
    super().__init__()
    self.encoder = ConvNeXt3dSTOIC(**kw)
    self.decoder = UperNeXtDecoder(kw["dims"])
    dim = kw["dims"][-1]
    self.pre_head_mos, self.head_mos, self.norm_mos = (
        nn.Linear(dim, dim), nn.Linear(dim, 2), nn.LayerNorm(dim, eps=1e-6))
    self.pre_head_hust, self.head_hust, self.norm_hust = (
        nn.Linear(dim, dim), nn.Linear(dim, 2), nn.LayerNorm(dim, eps=1e-6))
    self.metadata_prehead_hust = nn.Linear(4, dim, bias=False)

  def forward(self, x, mode="all"):
    features = self.encoder(x, get_features=True)
    stoic = None
    if mode in ["classification", "all" "stoic", "both"]:  # noqa: ISC001  (their missing comma)
      m = self.encoder.main_model
      stoic = m.head(F.relu(m.pre_head(m.norm(features[-1].mean([-3, -2, -1])))))
    mos = None
    if mode in ["mosmed", "all"]:
      mos = self.head_mos(F.relu(self.pre_head_mos(self.norm_mos(features[-1].mean([-3, -2, -1])))))
    seg = self.decoder(features) if mode in ["segmentation", "all", "tcia", "both"] else None
    return stoic, mos, None, seg


def randomized(net, seed):
  """Every parameter random: weights ~ N(0, 1/fan_in), 1-D ones 1 + N(0, 0.3^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in net.parameters():
      noise = torch.randn(p.shape, generator=gen)
      p.copy_(1.0 + 0.3 * noise if p.ndim == 1 else noise / np.sqrt(p[0].numel()))
  return net.eval()


def volume(seed, shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def run_torch(net, x, **kw):
  with torch.no_grad():
    out = net(torch.from_numpy(np.ascontiguousarray(x))[:, None], **kw)
  return out


@functools.lru_cache(maxsize=None)
def _jitted(config_json):
  model = MultitaskModel(**json.loads(config_json))
  return jax.jit(lambda p, x: model.apply({"params": p}, x))


def run_covid3d(tree, x):
  """MultitaskModel(**multitask_config(tree)) on (B, D, H, W) volumes (XLA depthwise convs)."""
  config = weights.multitask_config(tree)
  config["backbone"]["dwconv_impl"] = "xla"  # a fixed backend: no timing of the candidates
  config = json.dumps(config, sort_keys=True)
  out = _jitted(config)(jax.tree.map(jnp.asarray, tree), jnp.asarray(x)[..., None])
  return {k: np.asarray(v) for k, v in out.items()}


def assert_close(got, want):
  got, want = np.asarray(got), want.detach().numpy() if hasattr(want, "detach") else want
  assert got.shape == want.shape
  scale = max(1.0, float(np.max(np.abs(want))))
  assert float(np.max(np.abs(got - want))) <= 1e-5 * scale, float(np.max(np.abs(got - want)))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- pretraining files

def test_multinext_pretraining_file_gives_their_stoic_and_segmentation_logits(tmp_path):
  net = randomized(MultiNeXt(**TINY), seed=0)
  path = tmp_path / "pretrained_model.pth"
  torch.save({"epoch": 7, "model_state_dict": net.state_dict()}, path)  # their saveSequential
  tree = weights.load_authors_checkpoint(path)
  assert set(tree) == {"backbone", "head_stoic_severe", "seg_head"}
  config = weights.multitask_config(tree)
  assert config["heads"] == {"stoic_severe": 2} and config["head_hidden"] == 64
  assert config["seg_head"] == dict(style="upernext", channels=16, fuse_kernel=7, num_classes=1)
  x = volume(0, (2, 32, 32, 32))
  stoic, _, _, seg = run_torch(net, x, mode="both")
  out = run_covid3d(tree, x)
  assert_close(out["stoic_severe"], stoic)
  assert_close(out["segmentation"][..., 0], seg[:, 0])
  # Their mode='all' returns no STOIC logits ('all' 'stoic' is one string, 'allstoic').
  assert run_torch(net, x, mode="all")[0] is None


def test_segmentation_checkpoint_ema_by_default_raw_on_request(tmp_path):
  raw, ema = randomized(UperNeXt(**TINY), seed=1), randomized(UperNeXt(**TINY), seed=2)
  path = tmp_path / "checkpoint_3.tar.pth"
  torch.save({"epoch": 3, "model_state_dict": raw.state_dict(),  # their segutils.saveModel
              "model_ema_state_dict": ema.state_dict(), "optimizer_state_dict": {},
              "encoder_state_dict": ema.encoder.state_dict()}, path)
  x = volume(1, (2, 32, 32, 32))
  for tree, net in ((weights.load_authors_checkpoint(path), ema),
                    (weights.load_authors_checkpoint(path, ema=False), raw)):
    assert_close(run_covid3d(tree, x)["segmentation"][..., 0], run_torch(net, x)[:, 0])
    # load_torch_convnext takes the same backbone out of the same file.
    backbone = weights.load_torch_convnext(path, 3, ema=net is ema)
    assert_trees_equal(backbone, tree["backbone"])


# ---------------------------------------------------------------- training and submission files

def test_training_checkpoint_and_submission_file(tmp_path):
  nets = [randomized(ConvNeXt3dSTOIC(num_classes=4, **TINY), seed=s) for s in (3, 4, 5)]
  ckpt = tmp_path / "checkpoint-41.pt"
  torch.save({"model": nets[0].state_dict(), "model_ema": nets[1].state_dict(), "optimizer": {},
              "metrics": {"f1_macro_sev": np.float64(0.61), "val_loss": 0.9}, "config": CONFIG,
              "data_transforms": TRANSFORMS}, ckpt)
  x = volume(2, (2, 32, 32, 32))
  tree = weights.load_authors_checkpoint(ckpt)
  assert set(tree) == {"backbone", "head_severity"}  # named from their loss, balce_sev_eccv
  assert_close(run_covid3d(tree, x)["severity"], run_torch(nets[1], x))
  assert_close(run_covid3d(weights.load_authors_checkpoint(ckpt, ema=False), x)["severity"],
               run_torch(nets[0], x))
  # load_torch_convnext reads the same file: main_model. prefix, EMA weights, metadata dropped.
  convnext = weights.load_torch_convnext(ckpt, 3, num_classes=4, head_hidden=64)
  assert_trees_equal(convnext, dict(tree["backbone"], head=tree["head_severity"]))

  sub = tmp_path / "sev1.pt"
  torch.save({"config": CONFIG, "data_transforms": TRANSFORMS,
              "model_ema": [n.state_dict() for n in nets]}, sub)
  folds = weights.load_authors_checkpoint(sub)
  assert isinstance(folds, list) and len(folds) == 3
  for tree, net in zip(folds, nets, strict=True):
    assert_close(run_covid3d(tree, x)["severity"], run_torch(net, x))
  with pytest.raises(ValueError, match="use ema=True"):
    weights.load_authors_checkpoint(sub, ema=False)
  with pytest.raises(ValueError, match="one per fold"):
    weights.load_torch_convnext(sub, 3)


def test_convert_submission_to_a_fold_ensemble_workdir(tmp_path, capsys):
  config = dict(CONFIG, modelconfig=dict(CONFIG["modelconfig"], loss_fn="balce_inf_eccv"))
  nets = [randomized(ConvNeXt3dSTOIC(num_classes=2, **NANO), seed=s) for s in (6, 7)]
  sub = tmp_path / "det1.pt"
  torch.save({"config": config, "data_transforms": TRANSFORMS,
              "model_ema": [n.state_dict() for n in nets]}, sub)
  out = tmp_path / "det_authors"
  assert authors.main(["convert", str(sub), str(out)]) == 0  # target from their loss name
  assert "--config.init_from=" in capsys.readouterr().out
  saved = workdir.stage_info(out)
  assert saved["stage"] == "detection"
  assert (saved["model"]["variant"], saved["model"]["head_hidden"]) == ("nano", 128)
  assert json.loads((out / "authors.json").read_text())["config"]["modelconfig"]["loss_fn"] == (
      "balce_inf_eccv")
  ensemble.fold_dirs(out, (0, 1))  # both folds DONE, as the predict stage requires
  card = (out / "MODEL_CARD.md").read_text()
  assert f"Converted from `{sub}`" in card and "not a medical device" in card

  # What the predict stage builds from its config, with their weights, gives their logits.
  stage = authors.target_config("detection")
  stage.model.variant, stage.model.head_hidden, stage.model.dwconv_impl = "nano", 128, "xla"
  model = build.make_model(stage, {"covid": 2}, segmentation=False)
  x = volume(3, (1, 32, 32, 32))
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape + (1,)))["params"]
  apply = jax.jit(lambda p, v: model.apply({"params": p}, v)["covid"])
  for fold, net in enumerate(nets):
    params = workdir.best_params(out / f"fold{fold}")
    workdir.check_fits(params, like, f"fold {fold}", "")
    assert_trees_equal(params, weights.load_authors_checkpoint(sub, head="covid")[fold])
    assert_close(apply(params, jnp.asarray(x)[..., None]), run_torch(net, x))

  with pytest.raises(ValueError, match="already holds fold checkpoints"):
    authors.convert_submission(sub, out)
  with pytest.raises(ValueError, match="2 classes, the severity target 4"):
    authors.convert_submission(sub, tmp_path / "other", target="severity")


def test_bare_convnext3d_state_dict_drops_the_metadata_layers(tmp_path):
  """A bare ``ConvNeXt3d`` state dict (no ``main_model.`` prefix) keeps its age/sex layers."""
  net = randomized(ConvNeXt3d(num_classes=2, **NANO), seed=10)
  state = net.state_dict()
  assert any(k.startswith("metadata_embedding.") for k in state)
  path = tmp_path / "convnext3d.pth"
  torch.save(state, path)
  tree = weights.load_authors_checkpoint(path)
  assert set(tree) == {"backbone", "head_covid"}
  x = volume(5, (1, 32, 32, 32))
  assert_close(run_covid3d(tree, x)["covid"], run_torch(net, x))
  assert_trees_equal(weights.load_torch_convnext(path, 3, num_classes=2, head_hidden=128),
                     dict(tree["backbone"], head=tree["head_covid"]))
  # As init_from of a stage: the backbone and the whole fitting head are taken.
  config = authors.target_config("detection")
  config.model.variant, config.model.head_hidden, config.model.dwconv_impl = "nano", 128, "xla"
  config.init_from = str(path)
  model = build.make_model(config, {"covid": 2}, segmentation=False)
  fresh = build.init_params(model, config, 32)
  assert_trees_equal(initial_params.load_initial_params(config, fresh), tree)


# ---------------------------------------------------------------- their slice-last pretraining

def test_slice_axis_last_maps_slice_last_weights_to_slice_first_volumes(tmp_path):
  net = randomized(MultiNeXt(**TINY), seed=8)
  path = tmp_path / "pretrained_model.pth"
  torch.save({"epoch": 0, "model_state_dict": net.state_dict()}, path)
  theirs = volume(4, (1, 64, 128, 32))  # (column, row, slice): as nibabel/medpy read a scan
  ours = theirs.transpose(0, 3, 2, 1)  # (slice, row, column)
  stoic, _, _, seg = run_torch(net, theirs, mode="both")
  tree = weights.load_authors_checkpoint(path, slice_axis="last")
  out = run_covid3d(tree, ours)
  assert_close(out["stoic_severe"], stoic)
  assert_close(out["segmentation"][..., 0], seg[:, 0].permute(0, 3, 2, 1))
  # Without the option the same volume gives other logits: the test can tell.
  plain = run_covid3d(weights.load_authors_checkpoint(path), ours)["stoic_severe"]
  assert np.max(np.abs(plain - stoic.numpy())) > 1e-2
  assert_trees_equal(weights.load_torch_convnext(path, 3, slice_axis="last"), tree["backbone"])
  assert_trees_equal(weights.permute_kernels(weights.load_authors_checkpoint(path), "last"), tree)


def test_slice_axis_permutes_only_3d_kernels():
  tree = {"conv": {"kernel": np.arange(2 * 3 * 4 * 5 * 6.0).reshape(2, 3, 4, 5, 6),
                   "bias": np.zeros(6)}, "dense": {"kernel": np.ones((6, 7))}}
  out = weights.permute_kernels(tree, "last")
  assert out["conv"]["kernel"].shape == (4, 3, 2, 5, 6)
  np.testing.assert_array_equal(out["conv"]["kernel"][3, 2, 1], tree["conv"]["kernel"][1, 2, 3])
  assert out["dense"] is not None and out["dense"]["kernel"].shape == (6, 7)
  assert weights.permute_kernels(tree, "first") is tree
  assert weights.permute_kernels(tree, (1, 2, 0))["conv"]["kernel"].shape == (3, 4, 2, 5, 6)
  with pytest.raises(ValueError, match="slice_axis"):
    weights.permute_kernels(tree, "middle")
  with pytest.raises(ValueError, match="2-D"):
    weights.permute_kernels({"conv": {"kernel": np.zeros((4, 4, 1, 8))}}, "last")


def test_unknown_keys_are_named():
  state = {f"main_model.{k}": v for k, v in randomized(
      ConvNeXt3dSTOIC(num_classes=2, **TINY), seed=9).state_dict().items()}
  state["auxiliary.weight"] = torch.zeros(3)
  with pytest.raises(ValueError, match="belong to no part .*auxiliary.weight"):
    weights.load_authors_checkpoint(state)
