"""What a stage takes from the weights it starts from (initial_params.merge_source)."""
import functools

import jax
import numpy as np
import pytest

from covid3d import config as base
from covid3d.inflation import inflate_params
from covid3d.models import ConvNeXt
from covid3d.inference import build
from covid3d.stages import initial_params
from covid3d.stages.handoff import HandOffError


def nano_config(**model):
  c = base.demo(base.get_config("severity"))
  c.model.head_hidden = 8
  c.model.update(model)
  return c


def init(model, size, dims):
  return build.init_params(model, nano_config(), size, spatial_dims=dims)


@functools.cache
def params_of(kind):
  """Freshly initialised parameters, made once per module (each init compiles)."""
  c = nano_config()
  if kind == "2d":
    return init(build.make_convnext2d(c, num_classes=2), 32, 2)
  heads = {"multitask": {"stoic_severe": 2}, "severity": {"severity": 4}}[kind]
  return init(build.make_model(c, heads, segmentation=False), 32, 3)


def test_fine_tuning_carries_the_pretrained_norm_and_pre_head():
  c = nano_config()
  source = jax.tree.map(lambda a: np.asarray(a) + 1.0, params_of("multitask"))
  fresh = params_of("severity")
  merged = initial_params.merge_source(source, fresh, c, "src")
  for part in ("norm", "pre_head"):
    for a, b in zip(jax.tree.leaves(merged["head_severity"][part]),
                    jax.tree.leaves(source["head_stoic_severe"][part]), strict=True):
      np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(merged["head_severity"]["fc"]),
                  jax.tree.leaves(fresh["head_severity"]["fc"]), strict=True):
    np.testing.assert_array_equal(a, b)       # another class count: fresh classifier
  for a, b in zip(jax.tree.leaves(merged["backbone"]), jax.tree.leaves(source["backbone"]),
                  strict=True):
    np.testing.assert_array_equal(a, b)


def test_head_init_fresh_reinitialises_the_whole_head():
  c = nano_config(head_init="fresh")
  source = jax.tree.map(lambda a: np.asarray(a) + 1.0, params_of("multitask"))
  fresh = params_of("severity")
  merged = initial_params.merge_source(source, fresh, c, "src")
  for a, b in zip(jax.tree.leaves(merged["head_severity"]),
                  jax.tree.leaves(fresh["head_severity"]), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_head_of_the_same_name_and_shape_is_taken_whole():
  c = nano_config()
  source = jax.tree.map(lambda a: np.asarray(a) + 1.0, params_of("severity"))
  merged = initial_params.merge_source(source, params_of("severity"), c, "src")
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(source), strict=True):
    np.testing.assert_array_equal(a, b)


def test_a_2d_source_is_inflated_and_hands_on_its_final_norm():
  c = nano_config()
  source2d = jax.tree.map(lambda a: np.asarray(a) + 1.0, params_of("2d"))
  fresh = params_of("severity")
  merged = initial_params.merge_source(source2d, fresh, c, "2d")
  want = inflate_params({k: v for k, v in source2d.items() if k != "head"}, c.inflation.mode,
                        c.inflation.norm, new_axis=c.inflation.new_axis,
                        gaussian=c.inflation.gaussian)
  for a, b in zip(jax.tree.leaves(merged["backbone"]), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(merged["head_severity"]["norm"]["scale"],
                                source2d["head"]["norm"]["scale"])


def test_a_backbone_of_another_variant_is_a_clear_error():
  c = nano_config()
  other = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), spatial_dims=3, in_chans=1)
  source = {"backbone": init(other, 32, 3)}
  fresh = params_of("severity")
  with pytest.raises(HandOffError, match="model.variant='nano'"):
    initial_params.merge_source(source, fresh, c, "src")
