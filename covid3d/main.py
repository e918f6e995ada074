"""``python -m covid3d.main --config=configs/<stage>.py[:demo] --workdir=DIR``.

``--config`` takes what ``covid3d.config.load`` does: a file
(``configs/severity.py:demo``) or a stage's name (``severity:authors3,demo``).
Logs and saves the resolved config (``<workdir>/config.json``), then runs the
stage it names (``covid3d.stages.registry``). Any field can be overridden:
``--config.train.learning_rate=1e-4``.
"""
import logging as pylogging
import os
import re
import signal
import sys
import tempfile

from absl import app, flags, logging
from etils import epath
import jax
from ml_collections import config_flags

from covid3d import cachedir, storage
from covid3d import config as base_config


class _ConfigParser(config_flags.config_flags.ConfigFileFlagParser):
  """``--config``'s value, loaded by ``covid3d.config.load`` and locked."""

  def parse(self, path):
    config = base_config.load(path)
    config.lock()
    return config


def define_config_flag(flag_values=flags.FLAGS, sys_argv=None) -> flags.FlagHolder:
  """``--config`` and its ``--config.FIELD=VALUE`` overrides (``sys_argv``: where to find them)."""
  flag = config_flags.config_flags._ConfigFlag(  # pylint: disable=protected-access  (DEFINE_config_file's)
      parser=_ConfigParser(name="config"), serializer=flags.ArgumentSerializer(), name="config",
      default=None, help_string="stage config: configs/<stage>.py[:ARG] or <stage>[:ARG]",
      flag_values=flag_values, sys_argv=sys_argv)
  return flags.DEFINE_flag(flag, flag_values)


_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and outputs")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "delete what the workdir holds first, so the "
                                "stage starts afresh (else a run with other settings is refused)")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Keeps the INFO chatter of Orbax, grain and TFDS off the terminal (warnings pass).

  Also drops Orbax's warnings for checkpoints saved between evaluations, which
  carry no metrics by design, and for a finished stage's checkpoints opened
  read-only (`checkpoint.Checkpointer.open`), as they always are.
  """
  NOISY = ("/orbax/", "/grain/", "/tensorflow_datasets/", "/etils/")
  EXPECTED = ("did not provide metrics", "Given directory is read only",
              "read_only=True, setting save_interval_steps=0")

  def filter(self, record):
    if any(e in record.getMessage() for e in self.EXPECTED):
      return False
    return record.levelno >= pylogging.WARNING or not any(n in record.pathname for n in self.NOISY)


# The resolved config goes to the workdir's log file only (not to the terminal).
_CONFIG_LOG = pylogging.getLogger("covid3d.config")
_CONFIG_LOG.propagate = False


def _log_to_workdir(workdir: str) -> str:
  """Copies every log line into a file; returns its path.

  That is ``<workdir>/log.<process>.txt``; for a bucket workdir, a local
  temporary file that `_upload_log` copies there when the stage ends.
  """
  name = f"log.{jax.process_index()}.txt"
  if storage.is_remote(workdir):
    path = os.path.join(tempfile.mkdtemp(prefix="covid3d-log-"), name)
  else:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
  handler = pylogging.FileHandler(path)
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  handler.addFilter(_QuietLibraries())
  pylogging.getLogger().addHandler(handler)
  _CONFIG_LOG.addHandler(handler)
  _CONFIG_LOG.setLevel(pylogging.INFO)
  return path


def _upload_log(log_file: str, workdir: str):
  """Copies the local log of a bucket workdir to ``<workdir>/log.<process>.txt``.

  Runs when the stage returns, fails or stops on a signal; a process killed
  outright (SIGKILL) leaves its log only in the local temporary folder.
  """
  if storage.is_remote(workdir):
    with open(log_file, "rb") as f:
      storage.write_bytes(f"{workdir.rstrip('/')}/{os.path.basename(log_file)}", f.read())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if not workdir:
    usage_error("--workdir is empty: give the folder for this stage's outputs")
  # pylint: disable=import-outside-toplevel  (after flag parsing: --help stays fast)
  from covid3d.train.loop import init_distributed
  init_distributed(config.train)
  try:
    _run_stage(config, workdir)
  except Exception as e:  # pylint: disable=broad-exception-caught
    if jax.process_count() == 1:
      raise
    # A normal exit would wait (train.distributed.shutdown_timeout_s) for the
    # other processes, which may be blocked in a collective with this one. Ended
    # now, its heartbeat stops, and JAX ends them within
    # train.distributed.heartbeat_timeout_s.
    logging.exception("this process failed")
    first_line = (str(e).strip().splitlines() or [""])[0][:300]
    _exit_now(f"stage {config.stage}: process {jax.process_index()} of {jax.process_count()} "
              f"failed ({type(e).__name__}: {first_line})", 1)


def _run_stage(config, workdir):
  """Runs the stage after the distributed set-up: logs, the stage, one-line errors."""
  # pylint: disable=import-outside-toplevel
  from covid3d.data.skips import DataError
  from covid3d.stages import registry
  from covid3d.stages.handoff import HandOffError
  from covid3d.train.config import SettingsChanged
  # jax.distributed's preemption notifier takes SIGTERM over, which would leave a
  # stage without a training loop (pseudolabel, predict) running after a
  # preemption; the training loop handles SIGTERM itself (a checkpoint, then exit).
  signal.signal(signal.SIGTERM, _exit_on_signal)
  if config.cache_dir:
    os.environ[cachedir.ENV] = config.cache_dir
  jax.config.update("jax_compilation_cache_dir", cachedir.path("jax"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _OVERWRITE.value and jax.process_index() == 0 and epath.Path(workdir).exists():
    logging.warning("--overwrite: deleting %s", workdir)
    epath.Path(workdir).rmtree()
  if _OVERWRITE.value and jax.process_count() > 1:  # every host waits for the deletion
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("covid3d.main --overwrite")
  log_file = _log_to_workdir(workdir)
  if jax.process_index() == 0:
    logging.info("stage %s, workdir %s, %d devices on %d processes%s", config.stage, workdir,
                 jax.device_count(), jax.process_count(),
                 f"; this log and the resolved config: {log_file}"
                 + (f" (copied into {workdir} at the end)" if storage.is_remote(workdir) else ""))
    _CONFIG_LOG.info("resolved config:\n%s", config)
  try:
    registry.run(config, workdir)
  except (HandOffError, DataError, SettingsChanged) as e:
    # A missing input, (strict mode) a bad file, a workdir of another run: one line, no traceback.
    print(f"covid3d.main: stage {config.stage}: {e}", file=sys.stderr)
    sys.exit(2)
  except TimeoutError as e:   # a bucket that stopped answering (see covid3d.storage)
    # The stuck request cannot be cancelled and would keep the interpreter from exiting.
    _exit_now(f"stage {config.stage}: {e or type(e).__name__}; this process's log: {log_file}", 3)
  except KeyboardInterrupt:   # before the training loop (which checkpoints on a signal itself)
    print(f"covid3d.main: stage {config.stage}: interrupted", file=sys.stderr)
    sys.exit(130)
  finally:
    _upload_log(log_file, workdir)


def _exit_now(message: str, code: int):
  """Exits with one line on stderr, without waiting for threads or the other processes."""
  print(f"covid3d.main: {message}", file=sys.stderr)
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def _exit_on_signal(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def usage_error(message) -> None:
  """Exits with one line on stderr, no traceback (status 2)."""
  print(f"covid3d.main: {message}", file=sys.stderr)
  sys.exit(2)


def _unknown_field(error) -> str | None:
  """'unknown config field X (did you mean Y?)' from ml_collections' error text, or None."""
  match = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", str(error).replace("\\", ""), re.S)
  if match:
    return f"unknown config field {match[1]!r} (did you mean {match[2]!r}?)"
  match = re.search(r"Unknown command line flag '(config\.[\w.]+)'", str(error))
  return f"unknown config field {match[1]!r}" if match else None


def parse_flags(argv):
  """absl's flag parsing, with one line instead of a traceback or the --help text."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    if isinstance(e.__context__, base_config.ConfigError):   # no such file, an unknown preset
      usage_error(f"--config: {e.__context__}")
    text = " ".join(str(e).split())
    usage_error(_unknown_field(e) or f"{text} (flags: --helpshort)")
  except (AttributeError, KeyError) as e:   # an override of a field the config lacks
    name = str(e).replace("\\", "").strip("'\" ")
    usage_error(_unknown_field(e) or f"unknown config field {name!r}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
