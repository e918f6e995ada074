"""PyTorch ConvNeXt import/export: against a PyTorch reference model, and by round trip."""
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from covid3d import weights
from covid3d.models import VARIANTS, ConvNeXt

DEPTHS, DIMS = VARIANTS["nano"]
SMALL = dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32))


def random_params(model, x, seed):
  """Model params with every leaf random (layer scale ~1), so no block is near identity.

  Shapes come from ``jax.eval_shape`` (running ``model.init`` on CPU takes about
  a minute here, mostly compiling one truncated-normal sampler per shape).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.3 * rng.normal(size=s.shape) + (1.0 if len(s.shape) == 1 else 0.0))
      .astype(np.float32), shapes)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def official_to_timm(key):
  """Independent renaming of official keys to timm keys (the test's own table)."""
  rules = [(r"^downsample_layers\.0\.0\.", "stem.0."), (r"^downsample_layers\.0\.1\.", "stem.1."),
           (r"^downsample_layers\.(\d)\.", r"stages.\1.downsample."),
           (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."), (r"\.dwconv\.", ".conv_dw."),
           (r"\.pwconv1\.", ".mlp.fc1."), (r"\.pwconv2\.", ".mlp.fc2."), (r"^norm\.", "head.norm."),
           (r"^pre_head\.", "head.pre_logits.fc."), (r"^head\.(weight|bias)$", r"head.fc.\1")]
  for pattern, repl in rules:
    key = re.sub(pattern, repl, key)
  return key


# ---------------------------------------------------------------- PyTorch reference

def make_torch_convnext(torch, spatial_dims, in_chans, num_classes, head_hidden, depths, dims,
                        approximate_gelu=False):
  """A ConvNeXt in PyTorch with the official module names (written for this test)."""
  nn = torch.nn
  conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d

  class ChannelsFirstNorm(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.weight = nn.Parameter(torch.ones(c))
      self.bias = nn.Parameter(torch.zeros(c))

    def forward(self, x):
      y = torch.nn.functional.layer_norm(x.movedim(1, -1), (x.shape[1],), self.weight,
                                         self.bias, 1e-6)
      return y.movedim(-1, 1)

  class Block(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.dwconv = conv(c, c, 7, padding=3, groups=c)
      self.norm = nn.LayerNorm(c, eps=1e-6)
      self.pwconv1 = nn.Linear(c, 4 * c)
      self.act = nn.GELU(approximate="tanh" if approximate_gelu else "none")
      self.pwconv2 = nn.Linear(4 * c, c)
      self.gamma = nn.Parameter(torch.ones(c))

    def forward(self, x):
      y = self.dwconv(x).movedim(1, -1)
      y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
      return x + y.movedim(-1, 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.downsample_layers = nn.ModuleList(
          [nn.Sequential(conv(in_chans, dims[0], 4, stride=4), ChannelsFirstNorm(dims[0]))]
          + [nn.Sequential(ChannelsFirstNorm(dims[i - 1]), conv(dims[i - 1], dims[i], 2, stride=2))
             for i in range(1, len(dims))])
      self.stages = nn.ModuleList([nn.Sequential(*[Block(c) for _ in range(d)])
                                   for d, c in zip(depths, dims, strict=True)])
      self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
      width = dims[-1]
      if head_hidden:
        self.pre_head = nn.Linear(width, head_hidden)
        width = head_hidden
      self.head = nn.Linear(width, num_classes)

    def forward(self, x):
      for down, stage in zip(self.downsample_layers, self.stages, strict=True):
        x = stage(down(x))
      x = self.norm(x.mean(dim=tuple(range(2, x.ndim))))
      if head_hidden:
        x = torch.relu(self.pre_head(x))
      return self.head(x)

  net = Net().eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in net.parameters():
      noise = 0.3 * torch.randn(p.shape, generator=gen)
      p.copy_(noise + 1.0 if p.ndim == 1 else noise)
  return net


@pytest.mark.parametrize("spatial_dims, in_chans, head_hidden, size",
                         [(2, 3, None, 64), (3, 1, 24, 32)])
@pytest.mark.parametrize("naming", ["official", "timm"])
def test_loaded_params_reproduce_the_pytorch_model(spatial_dims, in_chans, head_hidden, size,
                                                   naming):
  torch = pytest.importorskip("torch")
  num_classes = 5
  net = make_torch_convnext(torch, spatial_dims, in_chans, num_classes, head_hidden, DEPTHS, DIMS)
  state = net.state_dict()
  if naming == "timm":
    state = {official_to_timm(k): v for k, v in state.items()}
  params = weights.load_torch_convnext(state, spatial_dims, num_classes=num_classes,
                                       head_hidden=head_hidden, in_chans=None)
  assert weights.convnext_config(params)["depths"] == DEPTHS
  model = ConvNeXt(depths=DEPTHS, dims=DIMS, spatial_dims=spatial_dims, in_chans=in_chans,
                   num_classes=num_classes, head_hidden=head_hidden, dwconv_impl="xla")
  x = np.random.default_rng(0).normal(size=(2,) + (size,) * spatial_dims + (in_chans,))
  x = x.astype(np.float32)
  got = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(x)))
  with torch.no_grad():
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy())
    want = net(xt).numpy()
    # The same network with tanh-approximated GELU: the comparison must be able
    # to tell the two GELUs apart, so the model's exact (erf) GELU is checked.
    approx = make_torch_convnext(torch, spatial_dims, in_chans, num_classes, head_hidden,
                                 DEPTHS, DIMS, approximate_gelu=True)
    approx.load_state_dict(net.state_dict())
    want_approx = approx(xt).numpy()
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=2e-5 * scale, rtol=1e-4)
  assert np.abs(want_approx - want).max() > 20 * np.abs(got - want).max()


def test_pth_files_with_wrappers_and_module_prefix(tmp_path):
  torch = pytest.importorskip("torch")
  net = make_torch_convnext(torch, 2, 3, 4, None, SMALL["depths"], SMALL["dims"])
  state = net.state_dict()
  path = tmp_path / "ckpt.pth"
  torch.save({"model": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
  params = weights.load_torch_convnext(path, 2, num_classes=4, in_chans=None)
  np.testing.assert_array_equal(params["head"]["fc"]["kernel"], state["head.weight"].numpy().T)
  np.testing.assert_array_equal(params["stage2"]["block1"]["dwconv"]["kernel"],
                                state["stages.2.1.dwconv.weight"].numpy().transpose(2, 3, 1, 0))


# ---------------------------------------------------------------- without PyTorch

@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("naming", ["official", "timm"])
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_round_trip_through_files(tmp_path, spatial_dims, naming, fmt):
  model = ConvNeXt(**SMALL, spatial_dims=spatial_dims, in_chans=1, num_classes=3, head_hidden=6,
                   dwconv_impl="xla")
  params = random_params(model, jnp.zeros((1,) + (32,) * spatial_dims + (1,)), seed=spatial_dims)
  state = weights.export_torch_convnext({"params": params}, naming=naming)
  assert weights.detect_naming(state) == naming
  c = SMALL["dims"][0]
  assert state[weights.NAMINGS[naming]["stem_conv"] + ".weight"].shape == (
      (c, 1) + (4,) * spatial_dims)
  path = tmp_path / f"w.{fmt}"
  if fmt == "npz":
    np.savez(path, **state)
  else:
    safetensors.numpy.save_file(state, str(path))
  loaded = weights.load_torch_convnext(path, spatial_dims, num_classes=3, head_hidden=6)
  assert_trees_equal(loaded, params)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_round_trip_through_model_apply(spatial_dims):
  model = ConvNeXt(**SMALL, spatial_dims=spatial_dims, in_chans=1, num_classes=3, dwconv_impl="xla")
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1,) + (32,) * spatial_dims + (1,)),
                  jnp.float32)
  params = random_params(model, x, seed=4)
  loaded = weights.load_torch_convnext(weights.export_torch_convnext(params, "timm"),
                                       spatial_dims, num_classes=3)
  rebuilt = ConvNeXt(**weights.convnext_config(loaded), dwconv_impl="xla")
  assert rebuilt.spatial_dims == spatial_dims and rebuilt.depths == SMALL["depths"]
  np.testing.assert_array_equal(jax.jit(rebuilt.apply)({"params": loaded}, x),
                                jax.jit(model.apply)({"params": params}, x))


def test_3d_kernel_axes_map_in_order():
  model = ConvNeXt(**SMALL, spatial_dims=3, in_chans=1, num_classes=None, dwconv_impl="xla")
  params = random_params(model, jnp.zeros((1, 32, 32, 32, 1)), seed=5)
  state = weights.export_torch_convnext(params)
  flax_k = np.asarray(params["stage1"]["block0"]["dwconv"]["kernel"])  # (kD, kH, kW, 1, C)
  torch_k = state["stages.1.0.dwconv.weight"]  # (C, 1, kD, kH, kW)
  assert torch_k.shape == (16, 1, 7, 7, 7)
  np.testing.assert_array_equal(torch_k[3, 0, 1, 2, 5], flax_k[1, 2, 5, 0, 3])
  np.testing.assert_array_equal(state["stages.1.0.pwconv1.weight"],
                                np.asarray(params["stage1"]["block0"]["pwconv1"]["kernel"]).T)


def test_rgb_stem_folds_to_gray():
  rgb_model = ConvNeXt(**SMALL, spatial_dims=2, in_chans=3, num_classes=4, dwconv_impl="xla")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 1)), jnp.float32)
  params = random_params(rgb_model, jnp.repeat(x, 3, -1), seed=7)
  state = weights.export_torch_convnext(params, naming="timm")
  gray = weights.load_torch_convnext(state, 2, num_classes=4)  # in_chans=1 by default
  assert gray["stem"]["conv"]["kernel"].shape == (4, 4, 1, 8)
  np.testing.assert_allclose(gray["stem"]["conv"]["kernel"][..., 0, :],
                             np.asarray(params["stem"]["conv"]["kernel"]).sum(-2), rtol=1e-6)
  gray_model = ConvNeXt(**SMALL, spatial_dims=2, in_chans=1, num_classes=4, dwconv_impl="xla")
  np.testing.assert_allclose(jax.jit(gray_model.apply)({"params": gray}, x),
                             jax.jit(rgb_model.apply)({"params": params}, jnp.repeat(x, 3, -1)),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="in_chans=2"):
    weights.load_torch_convnext(state, 2, num_classes=4, in_chans=2)


def backbone_state(spatial_dims=2, num_classes=4, layer_scale_init=1e-6):
  model = ConvNeXt(**SMALL, spatial_dims=spatial_dims, in_chans=1, num_classes=num_classes,
                   layer_scale_init=layer_scale_init, dwconv_impl="xla")
  params = random_params(model, jnp.zeros((1,) + (32,) * spatial_dims + (1,)), seed=3)
  return params, weights.export_torch_convnext(params)


def test_backbone_only_skips_head_and_without_layer_scale():
  params, state = backbone_state()
  backbone = weights.load_torch_convnext(state, 2)
  assert "head" not in backbone
  assert_trees_equal(backbone, jax.tree.map(np.asarray, {k: v for k, v in params.items()
                                                         if k != "head"}))
  params0, state0 = backbone_state(layer_scale_init=0.0)
  assert not any(k.endswith("gamma") for k in state0)
  loaded = weights.load_torch_convnext(state0, 2, num_classes=4)
  assert weights.convnext_config(loaded)["layer_scale_init"] == 0.0
  assert_trees_equal(loaded, jax.tree.map(np.asarray, params0))


def test_every_problem_is_listed_in_one_error():
  _, state = backbone_state()
  state = dict(state)
  del state["stages.2.1.pwconv2.bias"]
  state["stages.0.0.extra.weight"] = np.zeros(3, np.float32)
  state["stages.1.0.pwconv1.weight"] = np.zeros((64, 15), np.float32)
  state["head.weight"] = np.zeros((7, 32), np.float32)
  with pytest.raises(ValueError) as err:
    weights.load_torch_convnext(state, 2, num_classes=4)
  msg = str(err.value)
  for piece in ("missing keys (1): stages.2.1.pwconv2.bias",
                "unexpected keys (1): stages.0.0.extra.weight",
                "stages.1.0.pwconv1.weight: (64, 15), expected (64, 16)",
                "head.weight: (7, 32), expected (4, 32)"):
    assert piece in msg
  # `ignore` drops keys by prefix; the authors' metadata layers are dropped by themselves.
  _, state = backbone_state()
  state = dict(state, **{"auxiliary.weight": np.zeros((32, 4), np.float32),
                         "metadata_prehead.weight": np.zeros((32, 4), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected keys \(1\): auxiliary.weight$"):
    weights.load_torch_convnext(state, 2, num_classes=4)
  assert "head" in weights.load_torch_convnext(state, 2, num_classes=4, ignore=("auxiliary.",))


def test_head_options_must_match_the_checkpoint():
  _, state = backbone_state()
  with pytest.raises(ValueError, match=r"missing keys \(2\): pre_head.bias, pre_head.weight"):
    weights.load_torch_convnext(state, 2, num_classes=4, head_hidden=8)
  _, no_head = backbone_state(num_classes=None)
  with pytest.raises(ValueError, match="missing keys .*head.bias"):
    weights.load_torch_convnext(no_head, 2, num_classes=4)


def test_wrong_spatial_dims_is_named():
  _, state = backbone_state(spatial_dims=2)
  with pytest.raises(ValueError, match="stem conv has 2 spatial axes but spatial_dims=3"):
    weights.load_torch_convnext(state, 3)


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
    weights.load_torch_convnext(tmp_path / "nothere.safetensors", 2)
  odd = tmp_path / "w.h5"
  odd.write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown checkpoint type"):
    weights.load_torch_convnext(odd, 2)
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
  with pytest.raises(ImportError, match="needs PyTorch"):
    weights.load_torch_convnext(pth, 2)
  with pytest.raises(ValueError, match="cannot tell the ConvNeXt naming"):
    weights.load_torch_convnext({"foo.weight": np.zeros(3)}, 2)


def test_export_rejects_foreign_trees():
  params, _ = backbone_state()
  with pytest.raises(ValueError, match="unexpected parameters .*'extra/kernel'"):
    weights.export_torch_convnext(dict(params, extra={"kernel": np.zeros(2)}))
  with pytest.raises(ValueError, match="naming"):
    weights.export_torch_convnext(params, naming="keras")
