"""Which code runs each stage: the ``STAGES`` table, and ``run`` that dispatches on it."""
import jax
import ml_collections
from etils import epath

from covid3d.stages import (finetune, handoff, multitask, predict, pretrain2d, pseudolabel,
                            segmentation, segmia)

# config.stage -> run(config, workdir). severity and detection are one fine-tuning
# stage with two targets (handoff.TARGETS).
STAGES = {
    "pretrain2d": pretrain2d.run,
    "segmentation": segmentation.run,
    "pseudolabel": pseudolabel.run,
    "segmia": segmia.run,
    "multitask": multitask.run,
    "severity": finetune.run,
    "detection": finetune.run,
    "predict": predict.run,
}


def run(config: ml_collections.ConfigDict, workdir: str):
  """Runs the stage ``config.stage`` in ``workdir``, after saving the config there.

  ``stage:NAME`` sources are first resolved to the workdir ``NAME`` beside ``workdir``.
  """
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r} is not one of {sorted(STAGES)}")
  config = handoff.resolve_siblings(config, workdir)
  if jax.process_index() == 0:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  return STAGES[config.stage](config, workdir)
