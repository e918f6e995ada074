"""What a stage takes from the weights it starts from (initial_params.merge_source)."""
import functools
import json

import jax
import numpy as np
import pytest

from covid3d import config as base
from covid3d.inflation import inflate_params
from covid3d.models import ConvNeXt
from covid3d.inference import build
from covid3d.stages import handoff, initial_params
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
  heads = {"multitask": {"stoic_severe": 2}, "severity": {"severity": 4},
           "detection": {"covid": 2}, "segmentation": {}}[kind]
  return init(build.make_model(c, heads, segmentation=kind == "segmentation"), 32, 3)


def shifted(kind):
  """Trained-looking source parameters: every value moved away from a fresh init."""
  return jax.tree.map(lambda a: np.asarray(a) + 1.0, params_of(kind))


def assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


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
  # The authors' 2-D to 3-D copy skips head*: a 2-D pre_head (if any) is not carried.
  assert_same(merged["head_severity"]["pre_head"], fresh["head_severity"]["pre_head"])
  carry = initial_params.merge_source(source2d, fresh, nano_config(head_init="carry"), "2d")
  assert_same(carry["head_severity"]["pre_head"], source2d["head"]["pre_head"])


@pytest.mark.parametrize("head_init", ["authors", "carry", "fresh"])
def test_what_each_head_takes_from_each_source(head_init):
  """The rows of docs/method.md's head table, for each model.head_init."""
  c = nano_config(head_init=head_init)
  multitask, source2d = shifted("multitask"), shifted("2d")
  authors, carry = head_init == "authors", head_init == "carry"

  # detection <- multitask: their fine-tuning keeps a classifier of the same class count.
  got = initial_params.merge_source(multitask, params_of("detection"), c, "multitask")
  for part in ("norm", "pre_head", "fc"):
    takes = authors or (carry and part != "fc")
    assert_same(got["head_covid"][part], (multitask["head_stoic_severe"] if takes
                                          else params_of("detection")["head_covid"])[part])

  # segmentation <- 2-D: the encoder keeps the ImageNet final LayerNorm ('authors' only) ...
  seg = initial_params.merge_source(source2d, params_of("segmentation"), c, "2d")
  assert ("final_norm" in seg) == authors
  if authors:
    assert_same(seg["final_norm"], source2d["head"]["norm"])
  # ... and hands it on to fine-tuning, with a fresh pre_head and classifier.
  got = initial_params.merge_source(seg, params_of("severity"), c, "segmentation")
  assert "final_norm" not in got
  fresh = params_of("severity")["head_severity"]
  assert_same(got["head_severity"], dict(fresh, norm=source2d["head"]["norm"]) if authors
              else fresh)


def test_an_unknown_head_init_is_named():
  with pytest.raises(HandOffError, match="model.head_init"):
    initial_params.merge_source(shifted("multitask"), params_of("severity"),
                                nano_config(head_init="keep"), "src")


def test_a_backbone_of_another_variant_is_a_clear_error():
  c = nano_config()
  other = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64), spatial_dims=3, in_chans=1)
  source = {"backbone": init(other, 32, 3)}
  fresh = params_of("severity")
  with pytest.raises(HandOffError, match="model.variant='nano'"):
    initial_params.merge_source(source, fresh, c, "src")


def test_pretrain2d_hands_on_raw_weights_as_configured(tmp_path):
  assert handoff.hands_on_ema(tmp_path)   # no config.json: EMA
  for stage, hand_on, ema in (("pretrain2d", "raw", False), ("pretrain2d", "ema", True),
                              ("segmentation", "raw", True)):
    (tmp_path / "config.json").write_text(json.dumps({"stage": stage,
                                                      "pretrain2d": {"hand_on": hand_on}}))
    assert handoff.hands_on_ema(tmp_path) == ema, (stage, hand_on)
  assert base.load("pretrain2d").pretrain2d.hand_on == "raw"
