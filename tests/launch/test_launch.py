"""The launch scripts and the stage chain they run: syntax, dry-run command lines,
stage chaining, usage errors, the README's table of the chain.

The scripts print every command as '+ WORDS' (shell-quoted); the tests parse
those lines back into argument lists and compare them with the steps of
covid3d.stages.chain, where the chain is written. Real runs are checked with
stand-ins for python and gcloud that record their arguments.
"""
import ast
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from covid3d.stages import chain

REPO = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
SCRIPTS = ("common.sh", "demo.sh", "pipeline.sh", "tpu_pod.sh", "gpu.sh", "ablations.sh")
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]


def search_path(*dirs):
  """PATH with ``dirs`` first, then this interpreter's folder (its `python`), then the rest."""
  return os.pathsep.join([*map(str, dirs), str(pathlib.Path(sys.executable).parent),
                          os.environ["PATH"]])


def python_stand_in(path, body=""):
  """An executable at ``path`` that runs ``body`` (bash), but hands the chain's CLI
  (the launchers read the chain from it with $PYTHON) to this interpreter."""
  path.write_text(f"""#!/usr/bin/env bash
[[ $1 != */chain.py ]] || exec {shlex.quote(sys.executable)} "$@"
{body or f'exec {shlex.quote(sys.executable)} "$@"'}
""")
  path.chmod(0o755)
  return path


def launch(script, *args, env=None, cwd=REPO):
  """Runs launch/<script> ARGS with a clean DRY_RUN/PYTHON/CUDA_VISIBLE_DEVICES and this
  interpreter as `python` (the scripts run the chain's CLI even in dry-run mode)."""
  clean = {k: v for k, v in os.environ.items()
           if k not in ("DRY_RUN", "PYTHON", "CUDA_VISIBLE_DEVICES")}
  clean["PATH"] = search_path()
  clean.update(env or {})
  return subprocess.run(["bash", str(LAUNCH / script), *map(str, args)], cwd=cwd, env=clean,
                        capture_output=True, text=True, timeout=60, check=False)


def dry(script, *args, env=None, cwd=REPO):
  result = launch(script, *args, env={"DRY_RUN": "1", **(env or {})}, cwd=cwd)
  assert result.returncode == 0, result.stderr
  return result.stdout


def commands(stdout):
  """The '+ ' lines as argument lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def remote(argv):
  """The command a `gcloud compute tpus tpu-vm ssh` runs on the workers, as words."""
  assert argv[:5] == SSH, argv
  (command,) = [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
  return shlex.split(command)


def remote_if_ssh(argv):
  return remote(argv) if argv[:5] == SSH else argv


def parse_stage(argv):
  """`... python -m covid3d.main --config=... --workdir=... FLAGS` -> dict."""
  args = argv[argv.index("covid3d.main") + 1:]
  flags = {}
  for arg in args:
    key, _, value = arg.partition("=")
    flags[key] = value                  # the last one wins, as in absl
  config, _, suffix = flags.pop("--config").partition(":")
  return {"stage": pathlib.Path(config).stem, "config": config, "suffix": suffix,
          "workdir": flags.pop("--workdir"), "flags": flags, "args": args, "argv": argv}


def stages(stdout, unwrap=lambda argv: argv):
  return [parse_stage(unwrap(c)) for c in commands(stdout) if "covid3d.main" in unwrap(c)]


def chain_steps(root, init2d=None, targets=("severity",), **kwargs):
  """The stage steps (not the report) of covid3d.stages.chain for one run; no targets: the
  pretrainings."""
  return [s for s in chain.steps(str(root), targets or ("severity",), init2d or "", **kwargs)
          if s.kind == "stage" and (targets or not chain.stage_of(s.name).per_target)]


def expected_chain(root, init2d=None, targets=("severity",), inflation="full"):
  """(config, workdir, init_from, pseudo_labels) of every stage, in order."""
  return [(s.name, s.output, s.init_from or None, s.pseudo_labels or None)
          for s in chain_steps(root, init2d, targets, inflation=inflation)]


def chain_of(parsed):
  return [(s["stage"], s["workdir"], s["flags"].get("--config.init_from"),
           s["flags"].get("--config.pseudo_labels")) for s in parsed]


@pytest.fixture
def data(tmp_path):
  """Existing data folders and a 2-D checkpoint file for pipeline.sh."""
  dirs = {name: tmp_path / "data" / name for name in ("cov19ctdb", "lesions", "stoic", "imagenet")}
  for d in dirs.values():
    d.mkdir(parents=True)
  ckpt = tmp_path / "convnext_tiny_1k_224.pth"
  ckpt.write_bytes(b"stand-in")
  return {**{k: str(v) for k, v in dirs.items()}, "init2d": str(ckpt)}


def data_args(data, *names):
  return [w for n in names for w in (f"--{n}", data[n])]


def data_flags(data, *names):
  return {f"--config.data.{n}_dir": data[n] for n in names}


# ----------------------------------------------------------------------------- syntax


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
  result = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stderr


def test_shellcheck_is_clean():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed")
  result = subprocess.run(["shellcheck", "-x", *(f"launch/{s}" for s in SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_help(script):
  result = launch(script, "--help")
  assert result.returncode == 0 and result.stdout.startswith("Usage: bash launch/" + script)


# ----------------------------------------------------------------------------- demo


def test_demo_dry_run_chain(tmp_path):
  root = tmp_path / "demo"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  python_stand_in(bin_dir / "my-python")
  out = dry("demo.sh", root, "--config.train.num_steps=2",
            env={"PYTHON": "my-python", "PATH": search_path(bin_dir)})
  parsed = stages(out)
  assert chain_of(parsed) == expected_chain(root)
  flags = (f"--config.data.phantom_dir={root}/data", f"--config.cache_dir={root}/cache",
           "--config.train.num_steps=2")
  assert [s["argv"][1:] for s in parsed] == [
      list(s.args) for s in chain_steps(root, suffix=":demo", flags=flags)]
  for s in parsed:
    assert s["argv"][:3] == ["my-python", "-m", "covid3d.main"]
    assert s["config"] == f"configs/{s['stage']}.py" and s["suffix"] == "demo"
    assert s["flags"]["--config.data.phantom_dir"] == f"{root}/data"
    assert s["flags"]["--config.cache_dir"] == f"{root}/cache"   # everything under ROOT
    assert s["args"][-1] == "--config.train.num_steps=2"      # user overrides come last
    # the stages whose weights descend from inflated 2-D ones are told the inflation (those
    # that start from the 2-D weights inflate them; the others check their source's)
    inherits = s["flags"].get("--config.init_from", "random") not in ("random", )
    assert s["flags"].get("--config.inflation.mode") == ("full" if inherits else None)
  assert [s["workdir"].rsplit("/", 1)[1] for s in parsed
          if "--config.inflation.mode" not in s["flags"]] == ["pretrain2d", "severity_random"]
  cmds = commands(out)
  assert cmds[-1] == ["my-python", "-m", "covid3d.report", str(root)]
  assert sum(line.startswith("== [") for line in out.splitlines()) == len(parsed) + 1
  assert "total wall time" in out.splitlines()[-1]
  # The last lines point to the report's plot and show infer on the demo's ensemble.
  assert out.splitlines()[-4] == f"== results: {root}/report.md, plotted in {root}/report.png"
  assert out.splitlines()[-2].split() == [
      "my-python", "-m", "covid3d.infer", f"--model={root}/severity_segmia",
      f"--out={root}/infer", f"--lesions={root}/segmentation", "--saliency", "SCAN"]
  assert not root.exists()                                     # a dry run runs nothing


def test_ablations_dry_run(tmp_path, data):
  """The pretrainings each preset needs, of its inflation, then one run per preset, then the
  report: chain.ablation_steps, printed and not run."""
  root = tmp_path / "abl"
  out = dry("ablations.sh", "--root", root, "--config.train.num_steps=2")
  parsed = stages(out)
  full = chain_steps(root, targets=())
  two_g = [s for s in chain_steps(root, targets=(), inflation="2g") if s.name != "pretrain2d"]
  assert [s["workdir"] for s in parsed[:9]] == [s.output for s in full + two_g]
  assert [s["workdir"].rsplit("/", 1)[1] for s in parsed[5:9]] == [
      "segmentation_2g", "pseudolabel_2g", "segmia_2g", "multitask_2g"]
  assert {s["flags"]["--config.inflation.mode"] for s in parsed[5:9]} == {"2g"}
  rows = parsed[9:]
  presets = [(t.name, p.name) for t in chain.FINETUNE_TARGETS for p in t.presets]
  assert [s["workdir"] for s in rows] == [f"{root}/{t}_{p}" for t, p in presets]
  for s, (target, preset) in zip(rows, presets, strict=True):
    assert s["config"] == f"configs/{target}.py" and s["suffix"] == f"{preset},demo"
    assert s["flags"]["--config.predict.folds"] == ""          # the fold ensemble
    assert s["args"][-1] == "--config.train.num_steps=2"
    assert "--config.init_from" not in s["flags"]              # the preset names its source
  assert commands(out)[-1][1:] == ["-m", "covid3d.report", str(root)]
  assert not root.exists()
  # Severity alone on real data with a 2-D checkpoint: no pretrain2d, no 2G pretraining,
  # and the rows that start from the 2-D weights take the checkpoint.
  out = dry("ablations.sh", "--root", root, "--targets", "severity", "--cov19ctdb",
            data["cov19ctdb"], "--lesions", data["lesions"], "--stoic", data["stoic"],
            "--init2d", data["init2d"])
  parsed = stages(out)
  assert [s["stage"] for s in parsed[:4]] == ["segmentation", "pseudolabel", "segmia",
                                              "multitask"]
  rows = parsed[4:]
  assert [s["suffix"] for s in rows] == [p.name for p in chain.target("severity").presets]
  assert {s["suffix"] for s in rows if s["flags"].get("--config.init_from") == data["init2d"]} \
      == {"authors1", "table2_1g", "table2_2g", "table1_ce"}
  result = launch("ablations.sh", "--dry-run", "--inflation", "2g")
  assert result.returncode == 2 and "each preset names its own inflation" in result.stderr


def test_detection_alone_runs_only_the_pretrainings_its_presets_start_from(tmp_path):
  steps = chain.ablation_steps(str(tmp_path), ("detection",))
  assert [s.output.rsplit("/", 1)[1] for s in steps] == [
      "pretrain2d", "segmentation_2g", "pseudolabel_2g", "segmia_2g", "multitask_2g",
      *(f"detection_authors{i}" for i in range(1, 6)), "report.md"]


def test_demo_defaults_and_flag_form(tmp_path):
  """--dry-run equals DRY_RUN=1; default root; absolute configs outside the repo."""
  out = launch("demo.sh", "--dry-run", "--targets", "severity,detection", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert out.stderr == ""
  parsed = stages(out.stdout)
  assert chain_of(parsed) == expected_chain("./covid3d_demo", targets=("severity", "detection"))
  assert {pathlib.Path(s["config"]).parent for s in parsed} == {REPO / "configs"}
  assert commands(out.stdout)[0][0] == "python"
  assert not (tmp_path / "covid3d_demo").exists()


def test_demo_skips_finished_stages(tmp_path):
  for stage in ("pretrain2d", "severity_multitask"):
    (tmp_path / stage).mkdir()
    (tmp_path / stage / "DONE").write_text("{}")
  out = dry("demo.sh", tmp_path)
  skipped = {f"{tmp_path}/pretrain2d", f"{tmp_path}/severity_multitask"}
  assert [s["workdir"] for s in stages(out)] == [
      w for _, w, _, _ in expected_chain(tmp_path) if w not in skipped]
  assert out.count("DONE exists") == 2


# ----------------------------------------------------------------------------- pipeline


def test_pipeline_imagenet_chain(tmp_path, data):
  root = tmp_path / "runs"
  out = dry("pipeline.sh", *data_args(data, "cov19ctdb", "lesions", "stoic", "imagenet"),
            "--root", root, "--inflation", "2g", "--targets", "severity,detection",
            "--batch-size", "8", "--", "--config.train.learning_rate=1e-4")
  parsed = stages(out)
  assert chain_of(parsed) == expected_chain(root, targets=("severity", "detection"),
                                            inflation="2g")
  flags = data_flags(data, "cov19ctdb", "lesions", "stoic", "imagenet")
  assert [s["argv"][1:] for s in parsed] == [list(s.args) for s in chain_steps(
      root, targets=("severity", "detection"), inflation="2g",
      flags=(*(f"{k}={v}" for k, v in flags.items()), "--config.train.learning_rate=1e-4"),
      flags_3d=("--config.train.batch_size=8", "--config.train.eval_batch_size=8"))]
  for s in parsed:
    assert s["suffix"] == "" and s["argv"][0] == "python"
    assert {k: s["flags"].get(k) for k in flags} == flags
    assert s["args"][-1] == "--config.train.learning_rate=1e-4"
    is_3d = s["stage"] != "pretrain2d"
    assert s["flags"].get("--config.train.batch_size") == ("8" if is_3d else None)
    # the 2G stages and those that start from them are told it, in workdirs named for it
    inherits = s["flags"].get("--config.init_from", "random") != "random"
    assert s["flags"].get("--config.inflation.mode") == ("2g" if inherits else None)
    assert s["workdir"].endswith("_2g") == inherits
  assert commands(out)[-1] == ["python", "-m", "covid3d.report", str(root)]


def test_pipeline_init2d_skips_pretraining(tmp_path, data):
  out = dry("pipeline.sh", "--init2d", data["init2d"], "--cache", tmp_path / "cache",
            *data_args(data, "cov19ctdb", "lesions", "stoic"), "--root=" + str(tmp_path))
  parsed = stages(out)
  assert chain_of(parsed) == expected_chain(tmp_path, init2d=data["init2d"],
                                            targets=("severity", "detection"))
  for s in parsed:
    assert "--config.data.imagenet_dir" not in s["flags"]
    assert s["flags"]["--config.cache_dir"] == str(tmp_path / "cache")
    assert s["flags"]["--config.data.stoic_dir"] == data["stoic"]


def test_pipeline_runs_and_resumes(tmp_path, data):
  """A real run with a stand-in python: order, DONE skipping, failure stops the chain."""
  log = tmp_path / "calls.log"
  fake = python_stand_in(tmp_path / "fake-python", f"""
echo "$*" >> {log}
for a in "$@"; do case $a in --workdir=*) w=${{a#--workdir=}} ;; esac; done
if [[ $2 == covid3d.report ]]; then echo "| table of $3 |"; exit 0; fi
[[ $w != *"${{FAIL_AT:-none}}" ]] || exit 3
mkdir -p "$w" && touch "$w/DONE"
""")
  root = tmp_path / "runs"
  args = (*data_args(data, "cov19ctdb", "lesions", "stoic"), "--init2d", data["init2d"],
          "--root", root, "--targets", "detection")

  failed = launch("pipeline.sh", *args, env={"PYTHON": str(fake), "FAIL_AT": "segmia"})
  assert failed.returncode == 3
  ran = [line.split("--workdir=")[1].split()[0] for line in log.read_text().splitlines()]
  assert ran == [f"{root}/{s}" for s in ("segmentation", "pseudolabel", "segmia")]

  log.unlink()
  done = launch("pipeline.sh", *args, env={"PYTHON": str(fake)})
  assert done.returncode == 0, done.stderr
  calls = log.read_text().splitlines()
  expected = [w for _, w, _, _ in expected_chain(root, data["init2d"], ("detection",))][2:]
  assert [c.split("--workdir=")[1].split()[0] for c in calls[:-1]] == expected
  assert calls[-1] == f"-m covid3d.report {root}"
  assert done.stdout.count("DONE exists") == 2
  assert done.stdout.splitlines()[-2] == f"| table of {root} |"


# ----------------------------------------------------------------------------- TPU pod


def tpu_args(data, *extra):
  return ("--bucket", "gs://bucket/run1/", "--cov19ctdb", "gs://bucket/data/cov19ctdb",
          "--lesions", "/mnt/disks/data/lesions", "--stoic", "gs://bucket/data/stoic", *extra)


def gcloud_stand_in(tmp_path, body=""):
  """A `gcloud` in tmp_path/bin that logs every call to tmp_path/gcloud.log (its words
  separated by \\x1f, calls ended by \\x1e) and then runs ``body`` (bash). Unless ``body``
  exits first, the read-only lookups find nothing (no slice, no DONE) and the rest succeed.
  Returns (PATH for launch(), a function reading the log as argument lists)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "gcloud.log"
  (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
printf '%s\\x1f' gcloud "$@" >> {shlex.quote(str(log))}
printf '\\x1e' >> {shlex.quote(str(log))}
{body}
[[ $* != *"tpu-vm describe"* && $* != *"storage ls"* ]] || exit 1
""")
  (bin_dir / "gcloud").chmod(0o755)

  def calls():
    text = log.read_text() if log.exists() else ""
    return [c.split("\x1f")[:-1] for c in text.split("\x1e")[:-1]]
  return search_path(bin_dir), calls


def is_lookup(argv):
  """The read-only gcloud calls that a dry run does not print (nor make)."""
  return argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "describe"] or argv[1:3] == [
      "storage", "ls"]


def test_tpu_pod_dry_run(data):
  out = dry("tpu_pod.sh", *tpu_args(data, "--init2d", "gs://bucket/ckpt/convnext.pth",
                                    "--zone", "us-central2-b", "--project", "proj", "--delete",
                                    "--targets", "severity", "--", "--config.train.num_steps=5"))
  cmds = commands(out)
  create = cmds[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "covid3d"]
  assert {"--zone=us-central2-b", "--project=proj", "--accelerator-type=v4-32",
          "--version=tpu-ubuntu2204-base"} <= set(create) and "--spot" not in create
  ssh = [c for c in cmds if c[:5] == SSH]
  install = " ".join(remote(ssh[1]))
  assert "pip install -q -e .[tpu,torch]" in install and "python3.11 -m venv .venv" in install

  unwrap = remote_if_ssh
  parsed = stages(out, unwrap)
  local = "/tmp/covid3d_data"
  ckpt = f"{local}/init2d/convnext.pth"
  assert chain_of(parsed) == expected_chain("gs://bucket/run1", init2d=ckpt)
  for s in parsed:
    assert s["workdir"].startswith("gs://bucket/run1/")
    assert s["flags"]["--config.train.distributed.initialize"] == "True"
    assert s["config"] == f"configs/{s['stage']}.py"
    assert s["flags"]["--config.data.cov19ctdb_dir"] == f"{local}/cov19ctdb"  # copied from gs://
    assert s["flags"]["--config.data.lesions_dir"] == "/mnt/disks/data/lesions"  # as given
    assert s["flags"]["--config.cache_dir"] == f"{local}/cache"
    assert s["args"][-1] == "--config.train.num_steps=5"
  stage_ssh = [c for c in ssh if "covid3d.main" in remote(c)]
  assert all("--worker=all" in c for c in stage_ssh) and len(stage_ssh) == len(parsed)
  copies = [" ".join(remote(c)) for c in ssh if "gcloud storage" in " ".join(remote(c))]
  assert copies == [
      f"mkdir -p {local}/cov19ctdb && gcloud storage rsync --recursive gs://bucket/data/cov19ctdb "
      f"{local}/cov19ctdb",
      f"mkdir -p {local}/stoic && gcloud storage rsync --recursive gs://bucket/data/stoic "
      f"{local}/stoic",
      f"mkdir -p {local}/init2d && gcloud storage cp gs://bucket/ckpt/convnext.pth {ckpt}"]
  # order: create, install, copies, stages, report on one worker, delete
  first_stage = cmds.index(next(c for c in cmds if "covid3d.main" in unwrap(c)))
  assert max(cmds.index(c) for c in ssh[:2]) < first_stage
  report = [c for c in cmds if "covid3d.report" in unwrap(c)]
  assert len(report) == 1 and "--worker=0" in report[0]
  assert unwrap(report[0])[-3:] == ["-m", "covid3d.report", "gs://bucket/run1"]
  assert cmds[-2] == report[0]
  assert cmds[-1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "covid3d"]


def test_tpu_pod_options(data):
  out = dry("tpu_pod.sh", *tpu_args(data, "--imagenet", "/mnt/imagenet", "--skip-create",
                                    "--repo", "https://example.org/covid3d.git", "--ref", "v1"))
  cmds = commands(out)
  assert not any("create" in c or "delete" in c for c in cmds)
  assert remote(cmds[0])[-7:] == ["&&", "git", "clone", "--depth=1", "--branch=v1",
                                  "https://example.org/covid3d.git", "covid3d"]
  assert "pip install -q -e .[tpu] " in " ".join(remote(cmds[1])) + " "     # no torch needed
  parsed = stages(out, remote_if_ssh)
  assert parsed[0]["stage"] == "pretrain2d"
  assert parsed[0]["flags"]["--config.data.imagenet_dir"] == "/mnt/imagenet"
  assert parsed[1]["flags"]["--config.init_from"] == "gs://bucket/run1/pretrain2d"
  # no --delete: the run ends saying that the slice is still billed, and how to delete it
  assert out.splitlines()[-1] == (
      "   delete it with: gcloud compute tpus tpu-vm delete covid3d --zone=us-central2-b --quiet")


def test_tpu_pod_deletes_after_a_failure(tmp_path, data):
  """With --delete the slice goes even when a stage fails; the failure is the exit status."""
  path, calls = gcloud_stand_in(tmp_path, "[[ $* != *severity_multitask* ]] || exit 4")
  result = launch("tpu_pod.sh", *tpu_args(data, "--init2d", "/ckpt.pth", "--skip-install",
                                          "--delete", "--targets", "severity"),
                  env={"PATH": path})
  assert result.returncode == 4
  made = [" ".join(c) for c in calls()]
  assert "severity_multitask" in made[-2] and not any("severity_random" in c for c in made)
  assert made[-1].startswith("gcloud compute tpus tpu-vm delete covid3d")
  # the slice's name was free; every stage was first looked up on the bucket
  assert made[0] == "gcloud compute tpus tpu-vm describe covid3d --zone=us-central2-b"
  assert made.count("gcloud storage ls gs://bucket/run1/segmentation/DONE") == 1


def test_tpu_pod_hand_offs_are_on_the_bucket(data):
  """Every stage runs chain.py's step, word for word, on all workers: its workdir, the
  workdirs it starts from and the pseudo-labels it reads are on the bucket, as is the
  report; only the input copies and the record cache are on the workers' disks."""
  bucket, local = "gs://bucket/run1", "/tmp/covid3d_data"
  targets = ("severity", "detection")
  out = dry("tpu_pod.sh", *tpu_args(data, "--imagenet", "gs://bucket/data/imagenet",
                                    "--targets", ",".join(targets), "--batch-size", "8"))
  data_flags = {"cov19ctdb": f"{local}/cov19ctdb", "lesions": "/mnt/disks/data/lesions",
                "stoic": f"{local}/stoic", "imagenet": f"{local}/imagenet"}
  flags = (*(f"--config.data.{k}_dir={v}" for k, v in data_flags.items()),
           f"--config.cache_dir={local}/cache", "--config.train.distributed.initialize=True")
  steps = chain_steps(bucket, targets=targets, flags=flags, flags_3d=(
      "--config.train.batch_size=8", "--config.train.eval_batch_size=8"))
  ssh = [c for c in commands(out) if c[:5] == SSH and "covid3d.main" in remote(c)]
  assert [remote(c) for c in ssh] == [
      ["cd", "covid3d", "&&", ".venv/bin/python", *s.args] for s in steps]
  assert all("--worker=all" in c for c in ssh)
  handed = [p for s in steps for p in (s.output, s.init_from, s.pseudo_labels) if p]
  assert {p for p in handed if not p.startswith(f"{bucket}/")} == {"random"}
  assert {s.pseudo_labels for s in steps} == {"", f"{bucket}/pseudolabel"}
  (headline,) = [line for line in out.splitlines() if line.startswith("== [") and "report:" in line]
  assert headline.endswith(f"-> {bucket}/report.md")
  assert remote(commands(out)[-1])[-3:] == ["-m", "covid3d.report", bucket]


def test_tpu_pod_dry_run_is_what_runs(tmp_path, data):
  """The dry run's '+ ' lines, pasted into bash, make the very gcloud calls of a real run
  (the read-only lookups aside), in the same order."""
  args = tpu_args(data, "--init2d", "gs://bucket/ckpt/it's.pth", "--project", "my proj",
                  "--spot", "--delete", "--targets", "detection", "--",
                  "--config.notes=a 'quoted' \"value\" $HOME")
  path, calls = gcloud_stand_in(tmp_path)
  env = {"PATH": path, "TMPDIR": str(tmp_path)}
  result = launch("tpu_pod.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  real = [c for c in calls() if not is_lookup(c)]
  assert [c for c in calls() if is_lookup(c)]            # the real run did look up
  (tmp_path / "gcloud.log").unlink()

  out = dry("tpu_pod.sh", *args, env=env)
  lines = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
  pasted = subprocess.run(["bash", "-euc", "\n".join(lines)], env={**os.environ, **env},
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
  assert pasted.returncode == 0, pasted.stderr
  assert calls() == real
  assert real[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--spot" in real[0]
  assert real[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "covid3d",
                      "--zone=us-central2-b", "--project=my proj", "--quiet"]
  override = "--config.notes=a 'quoted' \"value\" $HOME"
  assert all(remote(c)[-1] == override for c in real if "covid3d.main" in " ".join(c))


def test_tpu_pod_leaves_an_existing_slice_alone(tmp_path, data):
  """A slice of that name exists: no create over it, and no delete of it even with --delete."""
  path, calls = gcloud_stand_in(tmp_path, '[[ $* != *"tpu-vm describe"* ]] || exit 0')
  result = launch("tpu_pod.sh", *tpu_args(data, "--init2d", "/ckpt.pth", "--delete"),
                  env={"PATH": path})
  assert result.returncode == 1 and "exists already" in result.stderr
  assert "--skip-create" in result.stderr
  assert "gcloud compute tpus tpu-vm delete covid3d --zone=us-central2-b --quiet" in result.stderr
  assert [c[4] for c in calls()] == ["describe"]


def test_tpu_pod_says_when_the_delete_failed(tmp_path, data):
  """A failed delete is an error (the slice is still billed), with the command to check."""
  path, calls = gcloud_stand_in(tmp_path, '[[ $* != *"tpu-vm delete"* ]] || exit 5')
  result = launch("tpu_pod.sh", *tpu_args(data, "--init2d", "/ckpt.pth", "--skip-create",
                                          "--skip-install", "--delete"), env={"PATH": path})
  assert result.returncode == 1
  assert "could not delete the TPU slice covid3d" in result.stderr
  assert "gcloud compute tpus tpu-vm list --zone=us-central2-b" in result.stderr
  assert calls()[-1][4] == "delete"


def test_docs_first_pod_run_dry_runs():
  """docs/launch.md's walkthrough: its variables and its dry-run block, pasted into bash,
  print a run with every workdir under the run's bucket path."""
  section = (REPO / "docs" / "launch.md").read_text().split("\n## Your first pod run\n")[1]
  blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
  variables = blocks[0]
  (dry_block,) = [b for b in blocks if "DRY_RUN=1 bash launch/tpu_pod.sh" in b]
  result = subprocess.run(["bash", "-euc", variables + dry_block], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False,
                          env={**os.environ, "PATH": search_path()})
  assert result.returncode == 0, result.stderr
  parsed = stages(result.stdout, remote_if_ssh)
  assert parsed and all(s["workdir"].startswith("gs://my-covid3d-bucket/runs/run1/")
                        for s in parsed)
  assert commands(result.stdout)[-1][4] == "delete"


# ----------------------------------------------------------------------------- GPU host


def test_gpu_dry_run(data):
  out = dry("gpu.sh", "--per-gpu-batch", "2", "--bf16",
            *data_args(data, "cov19ctdb", "lesions", "stoic", "imagenet"), "--targets", "detection",
            "--", "--config.train.learning_rate=1e-4", env={"CUDA_VISIBLE_DEVICES": "0,2,3"})
  check = commands(out)[0]
  assert check[:2] == ["python", "-c"] and "n != 3" in check[2]
  parsed = stages(out)
  assert chain_of(parsed) == expected_chain("./covid3d_runs", targets=("detection",))
  for s in parsed:
    assert s["flags"]["--config.model.variant"] == "tiny"
    assert s["flags"]["--config.train.compute_dtype"] == "bfloat16"
    batch = None if s["stage"] == "pretrain2d" else "6"        # 3 GPUs x 2
    assert s["flags"].get("--config.train.batch_size") == batch
    assert s["flags"].get("--config.train.eval_batch_size") == batch
    assert s["args"][-1] == "--config.train.learning_rate=1e-4"
    assert {k: s["flags"][k] for k in data_flags(data, "cov19ctdb", "imagenet")} == data_flags(
        data, "cov19ctdb", "imagenet")


def test_gpu_explicit_count_and_batch(data):
  out = dry("gpu.sh", "--gpus", "8", "--variant", "small", "--batch-size", "4", "--init2d",
            data["init2d"], *data_args(data, "cov19ctdb", "lesions", "stoic"),
            env={"CUDA_VISIBLE_DEVICES": "0"})
  parsed = stages(out)
  assert "n != 8" in commands(out)[0][2]
  assert {s["flags"]["--config.train.batch_size"] for s in parsed} == {"4"}   # given wins
  assert {s["flags"]["--config.model.variant"] for s in parsed} == {"small"}
  assert not any("--config.train.compute_dtype" in s["flags"] for s in parsed)


# ----------------------------------------------------------------------------- the chain


def test_chain_hand_offs():
  """Each stage starts from an earlier one's workdir, the 2-D checkpoint or random; those
  that start from the 2-D weights inflate them; the report comes last."""
  for init2d in ("", "/ckpt.pth"):
    steps = chain.steps("R", chain.TARGETS, init2d)
    weights_2d = init2d or "R/pretrain2d"
    made = {"random", init2d} - {""}
    for step in steps[:-1]:
      assert step.kind == "stage" and (REPO / "configs" / f"{step.name}.py").is_file()
      assert step.output.startswith("R/") and step.output not in made
      assert step.init_from in made or (step.name == "pretrain2d" and not step.init_from)
      assert step.pseudo_labels in made | {""}
      # the stages whose weights descend from the inflated 2-D ones are told the inflation
      assert ("--config.inflation.mode=full" in step.args) == (step.init_from not in (
          "", "random"))
      assert (step.init_from == weights_2d) == chain.stage_of(step.name).inflates
      made.add(step.output)
    assert ("R/pretrain2d" in made) == (not init2d)
    assert {s.pseudo_labels for s in steps if s.pseudo_labels} == {"R/pseudolabel"}
    # every target is fine-tuned from each stage that trained on pseudo-labels, and from random
    runs = {(s.name, s.init_from) for s in steps if s.name in chain.TARGETS}
    starts = {s.output for s in steps if s.pseudo_labels} | {"random"}
    assert runs == {(t, i) for t in chain.TARGETS for i in starts} and len(starts) == 3
    assert steps[-1] == chain.Step("report", "report", "R/report.md", steps[-1].headline,
                                   ("-m", "covid3d.report", "R"))


def test_chain_cli():
  """One step a line, tab-separated KIND NAME OUTPUT HEADLINE ARGS...: chain.steps()."""
  options = ["--root=/r oot", "--targets=detection,severity", "--init2d=/k.pth",
             "--inflation=1g", "--configs=/c", "--suffix=:demo", "--flag=--config.a=it's",
             "--flag-3d=--config.b=2", "--flag=--config.c=3"]
  expected = chain.steps("/r oot", ("detection", "severity"), "/k.pth", "1g", "/c", ":demo",
                         ("--config.a=it's", "--config.c=3"), ("--config.b=2",))
  cli = [sys.executable, str(REPO / "covid3d" / "stages" / "chain.py")]    # as the launchers
  out = subprocess.run([*cli, *options], capture_output=True, text=True, check=True).stdout
  assert [line.split("\t") for line in out.splitlines()] == [
      [s.kind, s.name, s.output, s.headline, *s.args] for s in expected]
  for bad, message in (("--targets=severity,covid", "target 'covid' is not severity or detection"),
                       ("--flag=--config.a=x\ty", "cannot be empty or hold a tab or newline")):
    result = subprocess.run([*cli, bad], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith("covid3d.stages.chain: ") and message in result.stderr


def test_chain_needs_the_standard_library_only():
  """The launchers run chain.py by path before every run: no package, nothing heavy."""
  tree = ast.parse((REPO / "covid3d" / "stages" / "chain.py").read_text())
  imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
              for a in n.names}
  imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
               if isinstance(n, ast.ImportFrom)}
  assert imported and imported <= sys.stdlib_module_names


def test_readme_table_is_the_chain():
  """The README's pipeline table is chain.py's, its numbered rows in the order of the chain."""
  section = (REPO / "README.md").read_text().split("\n## The pipeline\n", 1)[1].split("\n## ")[0]
  start = section.index("| # | config |")
  table = section[start:section.index("\n\n", start) + 1]
  printed = subprocess.run([sys.executable, "-m", "covid3d.stages.chain", "--markdown"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout
  assert table == printed == chain.markdown_table(), (
      "README.md: paste `python -m covid3d.stages.chain --markdown` as the pipeline table")
  cells = [row.split(" | ") for row in table.splitlines()[2:]]
  numbered = [c for c in cells if c[0] != "| -"]
  assert [c[0] for c in numbered] == [f"| {i}" for i in range(1, len(numbered) + 1)]
  order = [name for c in numbered for name in re.findall(r"`(\w+)\.py`", c[1]) or ["report"]]
  assert order == list(dict.fromkeys(s.name for s in chain.steps("R")))


def test_tasks_is_a_deprecated_alias_of_targets(data):
  """--tasks still works, with one warning line (gpu.sh hands it on as --targets)."""
  pipeline = (*data_args(data, "cov19ctdb", "lesions", "stoic", "imagenet"),)
  for script, args in (("demo.sh", ()), ("pipeline.sh", pipeline),
                       ("gpu.sh", ("--gpus", "1", *pipeline))):
    result = launch(script, *args, "--tasks", "detection", env={"DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"{script}: --tasks is deprecated, use --targets\n"
    finetuned = {s["stage"] for s in stages(result.stdout)} & set(chain.TARGETS)
    assert finetuned == {"detection"}


# ----------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize("script,args,message", [
    ("pipeline.sh", ["--lesions", "L", "--stoic", "S", "--imagenet", "I"], "missing --cov19ctdb"),
    ("pipeline.sh", ["--cov19ctdb", "C", "--stoic", "S", "--imagenet", "I"], "missing --lesions"),
    ("pipeline.sh", ["--cov19ctdb", "C", "--lesions", "L", "--stoic", "S"],
     "missing --imagenet DIR (to pretrain) or --init2d"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--init2d", "K"], "not both"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--inflation", "3g"], "'3g' is not full, 1g or 2g"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--targets", "severity,covid"],
     "--targets: target 'covid' is not severity or detection"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--batch-size", "0"], "not a positive integer"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--", "--tasks=x"], "not a --config.FIELD=VALUE"),
    ("pipeline.sh", ["@all", "--imagenet", "I", "--bogus"], "unknown option '--bogus'"),
    ("pipeline.sh", ["@all", "--imagenet"], "--imagenet needs a value"),
    ("pipeline.sh", ["@all", "--imagenet", "@missing"], "no such directory"),
    ("tpu_pod.sh", ["@all", "--imagenet", "I"], "missing --bucket"),
    ("tpu_pod.sh", ["@all", "--imagenet", "I", "--bucket", "/local/dir"], "not a gs:// path"),
    ("tpu_pod.sh", ["--bucket", "gs://b", "--imagenet", "I"], "missing --cov19ctdb"),
    ("tpu_pod.sh", ["@all", "--bucket", "gs://b", "--imagenet", "data/imagenet"],
     "--imagenet data/imagenet: give a gs:// path or an absolute path on the workers"),
    ("tpu_pod.sh", ["@all", "--bucket", "gs://b", "--init2d", "/k.pth", "--cache", "gs://b/c"],
     "--cache gs://b/c: not an absolute path on the workers"),
    ("tpu_pod.sh", ["@all", "--bucket", "gs://b", "--init2d", "/k.pth", "--worker-data", "data"],
     "--worker-data data: not an absolute path"),
    ("gpu.sh", ["@all", "--init2d", "@init2d"], "no GPU to use: --gpus is '0'"),
    ("gpu.sh", ["--gpus", "2", "--stoic", "S"], "missing --cov19ctdb"),
    ("demo.sh", ["--targets", "grading"],
     "--targets: target 'grading' is not severity or detection"),
    ("demo.sh", ["--targets"], "--targets needs a value"),
    ("demo.sh", ["root1", "root2"], "one ROOT only"),
    ("demo.sh", ["root", "--config.train.num_steps"], "not a --config.FIELD=VALUE"),
    ("demo.sh", ["--processes", "0"], "--processes: '0' is not a positive integer"),
    ("demo.sh", ["gs://b/run"], "is a bucket: give --local DIR"),
])
def test_usage_errors(tmp_path, data, script, args, message):
  words = []
  for arg in args:
    if arg == "@all":
      words += data_args(data, "cov19ctdb", "lesions", "stoic")
    elif arg == "@missing":
      words.append(str(tmp_path / "missing"))
    elif arg == "@init2d":
      words.append(data["init2d"])
    else:
      words.append(arg)
  result = launch(script, *words, env={"DRY_RUN": "1", "CUDA_VISIBLE_DEVICES": ""})
  assert result.returncode == 2, result.stdout
  assert message in result.stderr and "--help" in result.stderr
  assert not commands(result.stdout)


def test_demo_processes_runs_each_stage_as_a_pod_of_local_processes(tmp_path):
  out = dry("demo.sh", "--processes", "2", "--local", tmp_path / "local", "gs://b/run")
  assert out.splitlines()[0] == "== covid3d demo under gs://b/run (python: python, 2 processes)"
  assert dry("demo.sh", tmp_path).splitlines()[0].endswith("(python: python)")
  argvs = commands(out)
  stages = [a for a in argvs if "covid3d.main" in a]
  assert len(stages) % 2 == 0 and stages
  for first, second in zip(stages[::2], stages[1::2], strict=True):
    assert first[:3] == second[:3] == ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=2",
                                       "JAX_PLATFORMS=cpu"]
    flags = [dict(w.split("=", 1) for w in a if w.startswith("--config.")) for a in (first, second)]
    for pid, f in enumerate(flags):
      assert f["--config.train.distributed.initialize"] == "True"
      assert f["--config.train.distributed.num_processes"] == "2"
      assert f["--config.train.distributed.process_id"] == str(pid)
      assert f["--config.cache_dir"] == f"{tmp_path / 'local'}/cache/process{pid}"
      assert f["--config.data.phantom_dir"] == f"{tmp_path / 'local'}/data"
    address = "--config.train.distributed.coordinator_address"
    assert flags[0][address] == flags[1][address]
    assert [w for w in first if w.startswith("--workdir=gs://b/run/")]
  report = [a for a in argvs if "covid3d.report" in a]
  assert len(report) == 1 and "env" not in report[0]


def test_local_processes_wait_for_all_and_fail_when_one_fails(tmp_path):
  """demo.sh --processes: a step ends when every process has; one failure stops it."""
  script = (f'. "{LAUNCH}/common.sh"; LOCAL_PROCESSES=2; LOCAL_CACHE="{tmp_path}"; '
            'run_python_local_processes all -c "$1"; echo finished')
  body = ("import pathlib, sys, time; pid = sys.argv[-2].rsplit('=', 1)[1]; {}; "
          f"pathlib.Path(r'{tmp_path}', 'done' + pid).touch()")
  env = {**os.environ, "PYTHON": sys.executable}
  ok = subprocess.run(["bash", "-c", script, "bash", body.format("time.sleep(1 + int(pid))")],
                      env=env, capture_output=True, text=True, timeout=60)
  assert ok.returncode == 0 and ok.stdout.strip().endswith("finished"), ok.stderr
  assert {p.name for p in tmp_path.glob("done*")} == {"done0", "done1"}
  failed = subprocess.run(
      ["bash", "-c", script, "bash", body.format("sys.exit(3) if pid == '1' else time.sleep(30)")],
      env=env, capture_output=True, text=True, timeout=60)
  assert failed.returncode == 1 and "finished" not in failed.stdout
  assert "a process of this step failed (exit status 3); the others were stopped" in failed.stderr
