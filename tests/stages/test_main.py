"""``python -m covid3d.main``: required flags, the ``:demo`` config argument, overrides.

The command lines fail during flag parsing or before the stage runs, so none
trains anything. Those that stop before main's first side effect (the
distributed set-up, signal handlers, log files) run in this process; the
others run as the command, side by side.
"""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

from covid3d import config, main

ROOT = Path(__file__).resolve().parents[2]
SEVERITY = ROOT / "configs" / "severity.py"


def _get_config(arg):
  return config.load(f"{SEVERITY}:{arg}" if arg else str(SEVERITY))


def _parse(*argv):
  """The config main's flags give for ``argv`` (same flag definition, in-process)."""
  argv = ["main"] + list(argv)
  values = flags.FlagValues()
  # Override flags (--config.a.b) are found in the argument list given here.
  main.define_config_flag(values, sys_argv=argv)
  values(argv)
  return values.config


def test_demo_suffix_selects_the_demo_config_and_overrides_apply():
  full, demo = _get_config(None), _get_config("demo")
  assert (full.model.variant, demo.model.variant) == ("tiny", "nano")
  assert tuple(demo.data.sizes) == (40, 32) and demo.data.phantom and not full.data.phantom
  parsed = _parse(f"--config={SEVERITY}:demo", "--config.train.num_steps=3")
  assert parsed.stage == "severity" and parsed.train.num_steps == 3
  demo.train.num_steps = 3
  assert parsed.to_dict() == demo.to_dict()
  assert _parse(f"--config={SEVERITY}").to_dict() == full.to_dict()
  with pytest.raises(ValueError, match="unknown config argument 'nope': use one of demo, authors1"):
    _get_config("nope")


# Every command line with a config also names an unknown stage: whatever a
# regression lets through stops at the stage dispatch instead of training.
NO_STAGE = "--config.stage=nope"
CASES = {
    "no_workdir": [f"--config={SEVERITY}:demo", NO_STAGE],
    "no_config": ["--workdir={w}"],
    "bad_suffix": [f"--config={SEVERITY}:nope", "--workdir={w}", NO_STAGE],
    "misspelt": [f"--config={SEVERITY}:demo", "--workdir={w}", "--config.train.num_stepz=3",
                 NO_STAGE],
    "no_file": [f"--config={ROOT / 'configs' / 'nothere.py'}", "--workdir={w}"],
    "empty_workdir": [f"--config={SEVERITY}:demo", "--workdir="],
    "unknown_field": [f"--config={SEVERITY}:demo", "--workdir={w}", "--config.nothing=3"],
    "bad_init_from": [f"--config={SEVERITY}:demo", "--workdir={w}", "--config.init_from={w}_none",
                      "--config.data.phantom_dir={w}_phantom", "--config.cache_dir={w}_cache"],
    # Parses, logs the resolved config, then stops at the unknown stage name.
    "bad_stage": [f"--config={SEVERITY}:demo", "--workdir={w}", "--config.train.num_steps=3",
                  NO_STAGE],
}


# Those that get past main's first side effect run as the command.
SUBPROCESS = ("bad_init_from", "bad_stage")


def _in_process(argv: list[str]) -> int:
  """The exit status of ``python -m covid3d.main *argv``, run in this process up to main's
  first side effect (a command line that gets further fails the test)."""
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel

  from covid3d import main  # pylint: disable=import-outside-toplevel
  argv = ["covid3d.main", *argv]
  saved = sys.argv
  sys.argv = argv   # where the config flag finds its overrides
  try:
    main.main(main.parse_flags(argv))
  except SystemExit as e:
    return e.code
  except Exception as e:  # pylint: disable=broad-exception-caught
    return f"got past the checks: {e!r}"
  finally:
    sys.argv = saved
    absl_flags.FLAGS.unparse_flags()
    for name in [n for n in absl_flags.FLAGS if n.startswith("config.")]:
      delattr(absl_flags.FLAGS, name)   # the overrides this command line defined
  return "got past the checks"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> (exit code, stdout + stderr, workdir) of each CASES command line."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs, out = {}, {}
  for name in SUBPROCESS:
    workdir = tmp_path_factory.mktemp(name) / "work"
    cmd = [sys.executable, "-m", "covid3d.main"] + [a.format(w=workdir) for a in CASES[name]]
    procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True), workdir)
  try:
    for name in set(CASES) - set(SUBPROCESS):
      workdir = tmp_path_factory.mktemp(name) / "work"
      with contextlib.redirect_stdout(io.StringIO()) as text, contextlib.redirect_stderr(text):
        code = _in_process([a.format(w=workdir) for a in CASES[name]])
      out[name] = (code, text.getvalue(), workdir)
    for name, (proc, workdir) in procs.items():
      text = proc.communicate(timeout=120)[0]
      out[name] = (proc.returncode, text, workdir)
  finally:
    for proc, _ in procs.values():
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  return out


@pytest.mark.parametrize("missing,given", [("workdir", "config"), ("config", "workdir")])
def test_a_missing_required_flag_is_a_usage_error(runs, missing, given):
  code, text, workdir = runs[f"no_{missing}"]
  assert code != 0
  assert f"Flag --{missing} must have a value other than None" in text
  assert f"Flag --{given} must" not in text
  assert text.strip().endswith("(flags: --helpshort)") and len(text.strip().splitlines()) == 1
  assert not workdir.exists()


def test_an_unknown_config_argument_is_named(runs):
  code, text, workdir = runs["bad_suffix"]
  assert code == 2 and len(text.strip().splitlines()) == 1
  assert text.startswith("covid3d.main: --config: unknown config argument 'nope': use one of demo, "
                         "authors1")
  assert not workdir.exists()


def test_a_misspelt_override_names_the_field(runs):
  code, text, workdir = runs["misspelt"]
  assert code != 0
  assert text.strip() == ("covid3d.main: unknown config field 'num_stepz' (did you mean "
                          "'num_steps'?)")
  assert not workdir.exists()


def test_the_demo_config_reaches_the_stage_dispatch(runs):
  code, text, workdir = runs["bad_stage"]
  assert code == 2
  # main logged the resolved config to the workdir's log file, not the terminal.
  assert "stage nope, workdir" in text and "variant: nano" not in text
  log = (workdir / "log.0.txt").read_text()
  assert "variant: nano" in log and "num_steps: 3" in log and "variant: tiny" not in log
  last = text.strip().splitlines()[-1]
  assert last.startswith("covid3d.main: stage nope: config.stage='nope' is not one of")
  assert "Traceback" not in text
  assert not (workdir / "config.json").exists()


def test_a_workdir_holding_another_run_is_refused_until_overwrite(tmp_path):
  """A rerun with other settings stops with one line; --overwrite deletes the old run."""
  work = tmp_path / "work"
  work.mkdir()
  other = _get_config("demo")
  other.train.learning_rate = 1.0
  (work / "config.json").write_text(other.to_json_best_effort())
  (work / "DONE").write_text("{}")
  cmd = [sys.executable, "-m", "covid3d.main", f"--config={SEVERITY}:demo", f"--workdir={work}",
         "--config.train.log_every=7", f"--config.data.cov19ctdb_dir={tmp_path / 'none'}",
         "--config.data.phantom=False"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert refused.returncode == 2
  last = refused.stderr.strip().splitlines()[-1]
  assert last.startswith(f"covid3d.main: stage severity: {work} holds a run with other settings")
  assert "train.learning_rate: 1.0 -> 0.0003" in last and "--overwrite" in last
  assert "log_every" not in last                        # a logging field is no reason to stop
  assert (work / "DONE").exists()
  assert json.loads((work / "config.json").read_text())["train"]["learning_rate"] == 1.0
  fresh = subprocess.run(cmd + ["--overwrite"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
  assert fresh.returncode == 2 and "config.data.cov19ctdb_dir" in fresh.stderr  # then no data
  assert not (work / "DONE").exists()
  assert json.loads((work / "config.json").read_text())["train"]["learning_rate"] == 0.0003


@pytest.mark.parametrize("case,line", [
    ("no_file", f"covid3d.main: --config: {ROOT / 'configs' / 'nothere.py'}: no such file"),
    ("empty_workdir", "covid3d.main: --workdir is empty: give the folder for this stage's outputs"),
    ("unknown_field", "covid3d.main: unknown config field 'nothing'"),
])
def test_a_user_mistake_is_one_line(runs, case, line):
  code, text, _ = runs[case]
  assert code == 2 and text.strip() == line


def test_a_bad_init_from_stops_before_the_data_is_made(runs):
  code, text, workdir = runs["bad_init_from"]
  assert code == 2 and "Traceback" not in text
  assert text.strip().splitlines()[-1] == (
      f"covid3d.main: stage severity: init_from='{workdir}_none' is neither 'random', a workdir "
      "nor a checkpoint file (.pth, .pt, .tar, .bin, .ckpt, .safetensors, .npz)")
  assert not Path(f"{workdir}_phantom").exists()      # the phantom was not generated


def test_ctrl_c_before_the_training_loop_is_one_line(tmp_path):
  """SIGINT while the stage prepares its data: exit status 130 and one line, no traceback."""
  import signal
  import time
  work = tmp_path / "work"
  cmd = [sys.executable, "-m", "covid3d.main", f"--config={SEVERITY}:demo", f"--workdir={work}",
         f"--config.data.phantom_dir={tmp_path / 'phantom'}",
         f"--config.cache_dir={tmp_path / 'cache'}"]
  # Ctrl-C as in a terminal: a shell that runs the tests in the background
  # hands them SIGINT ignored, and a child inherits that. A wrapper restores it
  # and execs the command (not preexec_fn: this process runs JAX's threads).
  restore = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
             "os.execv(sys.argv[1], sys.argv[1:])")
  proc = subprocess.Popen([sys.executable, "-c", restore, *cmd], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 120
  while not (work / "config.json").exists():   # the stage has started on its data
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.1)
  # A KeyboardInterrupt raised while a garbage-collector callback runs (JAX
  # registers one) is printed and dropped by Python; a user then presses Ctrl-C
  # again, and so does this test, every 10 s until the stage stops.
  for _ in range(12):
    proc.send_signal(signal.SIGINT)
    try:
      _, err = proc.communicate(timeout=10)
      break
    except subprocess.TimeoutExpired:
      continue
  else:
    proc.kill()
    pytest.fail("the stage did not stop on Ctrl-C within 2 minutes")
  assert proc.returncode == 130, err
  assert err.count("Traceback") == err.count("Exception ignored in"), err   # only dropped ones
  assert err.strip().splitlines()[-1] == "covid3d.main: stage severity: interrupted"
