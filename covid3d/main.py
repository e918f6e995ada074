"""``python -m covid3d.main --config=configs/<stage>.py[:demo] --workdir=DIR``.

Logs and saves the resolved config (``<workdir>/config.json``), then runs the
stage it names (``covid3d.stages.registry``). Any field can be overridden:
``--config.train.learning_rate=1e-4``.
"""
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from etils import epath
import jax
from ml_collections import config_flags

from covid3d import cachedir

_CONFIG = config_flags.DEFINE_config_file("config", None, "stage config file (configs/*.py[:demo])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and outputs")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "delete what the workdir holds first, so the "
                                "stage starts afresh (else a run with other settings is refused)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Keeps the INFO chatter of Orbax, grain and TFDS off the terminal (warnings pass).

  Also drops Orbax's warning for checkpoints saved between evaluations, which
  carry no metrics by design.
  """
  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")

  def filter(self, record):
    if "did not provide metrics" in record.getMessage():
      return False
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  # pylint: disable=import-outside-toplevel  (after flag parsing: --help stays fast)
  from covid3d.data.skips import DataError
  from covid3d.stages import registry
  from covid3d.stages.handoff import HandOffError
  from covid3d.train.loop import init_distributed
  init_distributed(config.train)
  if config.cache_dir:
    os.environ[cachedir.ENV] = config.cache_dir
  jax.config.update("jax_compilation_cache_dir", cachedir.path("jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if jax.process_index() == 0:
    logging.info("stage %s, workdir %s, %d devices on %d processes\n%s", config.stage, workdir,
                 jax.device_count(), jax.process_count(), config)
  try:
    if _OVERWRITE.value and jax.process_index() == 0 and epath.Path(workdir).exists():
      logging.warning("--overwrite: deleting %s", workdir)
      epath.Path(workdir).rmtree()
    if _OVERWRITE.value and jax.process_count() > 1:  # every host waits for the deletion
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("covid3d.main --overwrite")
    registry.run(config, workdir)
  except (HandOffError, DataError) as e:
    # A missing input or (strict mode) a bad file: one line naming it, no traceback.
    print(f"covid3d.main: stage {config.stage}: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
