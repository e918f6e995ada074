"""A segmentation model's lesion head, loaded from its workdir: the teacher of the pseudo-labels
and the lesion masks of ``infer --lesions``."""
from covid3d.inference import build, workdir


def teacher_params(config, model):
  """The EMA backbone + segmentation head of the workdir ``config.init_from``, checked against
  ``model`` (``build.make_model(config, {}, segmentation=True)``).

  Raises:
    HandOffError: a workdir without a segmentation head, or weights that do not fit.
  """
  params = workdir.best_params(config.init_from)
  if "seg_head" not in params:
    raise workdir.HandOffError(
        f"{config.init_from} holds no segmentation head: init_from must be the workdir of the "
        "segmentation stage")
  like = build.init_params(model, config, min(config.data.sizes))
  chosen = {"backbone": params["backbone"], "seg_head": params["seg_head"]}
  workdir.check_fits(chosen, like, f"segmentation weights of {config.init_from}",
                     f"was {config.init_from} trained with "
                     f"config.model.variant={config.model.variant!r}?")
  return chosen
