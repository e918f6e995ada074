"""The stage chain: which stages run, in what order, and what each hands to the next.

A run of the pipeline is a chain of ``python -m covid3d.main`` stages, each in
its own workdir under a root R, and the report at the end. A stage starts from
an earlier one's workdir (``--config.init_from``) and may train on another's
masks (``--config.pseudo_labels``):

  pretrain2d -> segmentation -> pseudolabel -> segmia, multitask
  -> per fine-tuning target (severity, detection) one run from each of segmia,
     multitask and random (workdirs <target>_<init>) -> report

Given a 2-D checkpoint (``init2d``), the checkpoint stands in for R/pretrain2d
and pretraining does not run. ``STAGES`` is this chain as data, one entry per
stage (plus ``predict``, which is run by hand, not chained), and the one registry
of the stages: each names the module that runs it (``covid3d.stages.registry``
dispatches on it) and its hand-offs; ``FINETUNE_TARGETS`` holds each fine-tuning
target's presets (the authors' runs and the paper's rows, with the paper's
figures); what a target predicts, and which stages' models draw lesion masks,
is ``covid3d.inference.workdir``'s, which reads finished workdirs. ``steps()``
turns the chain into the commands of one run, which launch/common.sh runs, and
``markdown_table()`` into the README's pipeline table.

The CLI uses the standard library only, so that the launchers start it fast;
they run this file by path, which skips the package's imports:

  python -m covid3d.stages.chain [--root R] [--targets severity,detection]
      [--init2d CHECKPOINT] [--inflation full|1g|2g] [--configs DIR]
      [--suffix :demo] [--flag=FLAG ...] [--flag-3d=FLAG ...]

prints the steps of one run, one per line, fields separated by tabs:

  KIND  NAME  OUTPUT  HEADLINE  ARG  ARG ...

KIND is "stage" (a covid3d.main run on every host, skipped when OUTPUT/DONE
exists; OUTPUT is its workdir) or "report" (run once, always; OUTPUT is the
report's file); NAME is the stage's config (configs/NAME.py) or "report";
HEADLINE says in words what the step does; the ARGs are python's arguments
(``-m covid3d.main --config=... --workdir=... ...``). No field is empty or
holds a tab or a newline: a value that would make one is an error. An error is
one line on stderr ("covid3d.stages.chain: MESSAGE"), exit status 2.

With ``--ablations`` it prints, in the same format, the steps of
launch/ablations.sh (``ablation_steps``): every preset of the targets, after
the pretrainings each needs, of its own inflation.

  python -m covid3d.stages.chain --markdown

prints the README's pipeline table (``# | config | does | reads | writes``);

  python -m covid3d.stages.chain --paper-rows TARGET

the presets of TARGET that reproduce a row of the paper, one a line: NAME, a
tab, the stage it starts from (``random``, ``pretrain2d``, ...); and

  python -m covid3d.stages.chain --presets-markdown

docs/method.md's preset table.
"""
import argparse
import dataclasses
import sys

PROG = "covid3d.stages.chain"


@dataclasses.dataclass(frozen=True)
class Preset:
  """A fine-tuning preset, ``configs/<target>.py:<name>``: an authors' run or a paper's row.

  ``init`` is the stage whose workdir (beside the run's own) it starts from, or
  "random"; ``inflation`` how the ImageNet weights were inflated: here when
  ``init`` is "pretrain2d", else in the pretraining it starts from, whose
  workdir is then named for it (``source``: ``segmia_2g``; the run stops when
  that workdir's recorded inflation differs); ``new_axis`` and ``norm`` the
  rest of the inflation (``inflation.new_axis``, ``inflation.norm``: the
  authors' ImageNet fine-tuning put the 2-D kernel in the (slice, row) plane,
  new axis 2, and their 1G rescaled per slice); ``rot90`` the quarter-turn probability; ``balanced``
  balanced or plain CE; ``folds`` 5 or 1 (no cross-validation);
  ``submission``: predict with the last fold alone, as the challenge code did
  (else the fold ensemble, as the paper's tables report). ``run`` names the
  authors' run or the paper's row; ``paper_cv_macro_f1`` is the paper's CV macro
  F1 (%) of that row (None: the paper gives none), which the report puts beside
  the run's own.
  """
  name: str
  run: str
  init: str
  inflation: str
  new_axis: int = 0
  norm: str = "sum"
  rot90: float = 0.0
  balanced: bool = True
  folds: int = 5
  submission: bool = True
  paper_cv_macro_f1: float | None = None

  @property
  def source(self) -> str:
    """The workdir (beside the run's own) it starts from: "random", "pretrain2d", or the
    pretraining's workdir as the chain names it for ``inflation`` (``inflated_name``)."""
    if self.init in ("random", "pretrain2d"):
      return self.init
    return inflated_name(self.init, self.inflation)


def inflated_name(name: str, inflation: str) -> str:
  """The workdir name of a stage whose weights descend from ``inflation``: NAME for the
  default ``full``, else NAME_<inflation> (``segmia_2g``), so the two can share a root."""
  return name if inflation == "full" else f"{name}_{inflation}"


@dataclasses.dataclass(frozen=True)
class Target:
  """A fine-tuning target: its config (configs/<name>.py) and its presets."""
  name: str
  presets: tuple = ()


# The paper's figures are severity CV macro F1 (%) from Tables 1-3 and 5 of
# Kienzle et al.; its Table 1 gives 64.99 for the balanced-CE ImageNet row that
# Tables 2, 3 and 5 give as 65.67. The severity presets are listed in the order
# launch/ablations.sh runs them.
FINETUNE_TARGETS = (
    Target("severity", (
        Preset("table3_random", "Table 3, random", "random", "full", submission=False,
               paper_cv_macro_f1=62.71),
        Preset("authors1", "severity submission 1", "pretrain2d", "full", new_axis=2,
               paper_cv_macro_f1=65.67),
        Preset("table2_1g", "Table 2, 1G", "pretrain2d", "1g", new_axis=2, norm="sum_per_slice",
               submission=False, paper_cv_macro_f1=65.81),
        Preset("table2_2g", "Table 2, 2G", "pretrain2d", "2g", new_axis=2, submission=False,
               paper_cv_macro_f1=69.61),
        Preset("authors2", "severity submission 2", "segmentation", "full",
               paper_cv_macro_f1=67.25),
        Preset("authors3", "severity submission 3", "segmia", "full", paper_cv_macro_f1=66.48),
        Preset("authors4", "severity submission 4", "multitask", "full",
               paper_cv_macro_f1=68.18),
        Preset("table1_ce", "Table 1, plain CE", "pretrain2d", "full", new_axis=2,
               balanced=False, submission=False, paper_cv_macro_f1=65.37),
        Preset("authors5", "severity submission 5", "segmentation", "full", rot90=0.25,
               paper_cv_macro_f1=71.74),
    )),
    Target("detection", (
        Preset("authors1", "detection submission 1", "pretrain2d", "full", new_axis=2,
               paper_cv_macro_f1=91.73),
        Preset("authors2", "detection submission 2", "multitask", "2g"),
        Preset("authors3", "detection submission 3", "segmia", "2g"),
        Preset("authors4", "detection submission 4", "segmia", "2g", rot90=0.25, folds=1),
        Preset("authors5", "detection submission 5", "segmentation", "2g", folds=1),
    )),
)
# The fine-tuning targets' names, in the order a run fine-tunes them.
TARGETS = tuple(t.name for t in FINETUNE_TARGETS)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of the pipeline: its configs, its hand-offs and its row of the table.

  ``init_from`` names the earlier stages (or "random") it starts from, one run
  each (in workdir <config>_<init>) when there are several; ``pseudo_labels``
  the stage whose masks it trains on. The table's ``reads`` and ``writes`` may
  hold ``{init_from}`` and ``{pseudo_labels}``, written out with those stages'
  numbers, and ``{number[NAME]}``, another stage's number. ``headline``, the
  launchers' line before each run, may hold ``{init_from}`` (the workdir or
  checkpoint the run starts from), ``{init}`` (its stage's name) and
  ``{inflation}``. A ``per_target`` stage runs ``FINETUNE_TARGETS``.
  """
  name: str
  configs: tuple
  does: str
  reads: str
  writes: str
  headline: str = ""
  runner: str = ""                  # module whose run(config, workdir) runs it (covid3d.main)
  init_from: tuple = ()
  pseudo_labels: str = ""           # trains on this stage's masks: --config.pseudo_labels
  inflates: bool = False            # 2-D weights are inflated: --config.inflation.mode
  is_3d: bool = True                # takes the 3-D stages' flags (batch size)
  per_target: bool = False          # runs the chosen targets of ``configs``
  kind: str = "stage"               # "stage": covid3d.main; "report": covid3d.report
  chained: bool = True              # run by the launchers


STAGES = (
    Stage("pretrain2d", ("pretrain2d",), is_3d=False,
          does="2-D one-channel ConvNeXt: grayscale ImageNet (TFDS `imagenet2012`, "
          "`--config.data.imagenet_dir`), or import of a PyTorch checkpoint "
          "(`--config.init_from=x.pth`), or (demo) phantom axial slices; the launchers' "
          "`--init2d CHECKPOINT` skips it, the checkpoint standing in for its workdir",
          reads="ImageNet / checkpoint", writes="`checkpoints/` (2-D)",
          headline="2-D grayscale ConvNeXt pretraining", runner="covid3d.stages.pretrain2d"),
    Stage("segmentation", ("segmentation",), init_from=("pretrain2d",), inflates=True,
          runner="covid3d.stages.segmentation",
          does="lesion segmentation (soft Dice + BCE), best by EMA Dice",
          reads="COVID-19-20 lesions; {init_from} (inflated)", writes="`checkpoints/`",
          headline="lesion segmentation, weights inflated ({inflation}) from {init_from}"),
    Stage("pseudolabel", ("pseudolabel",), init_from=("segmentation",),
          runner="covid3d.stages.pseudolabel",
          does="the EMA teacher labels COV19-CT-DB and STOIC (hard masks; from augmented "
          "inputs and `upsample` as the authors, or `sliding` window)",
          reads="{init_from}",
          writes="`masks/<dataset>/*.npz`, `nifti/<dataset>/*_pseudo.nii.gz` in each scan's own "
          "geometry",
          headline="the segmentation model writes lesion masks of COV19-CT-DB and STOIC"),
    Stage("segmia", ("segmia",), init_from=("pretrain2d",), pseudo_labels="pseudolabel",
          inflates=True, runner="covid3d.stages.segmia",
          does="segmentation on COV19-CT-DB pseudo-labels, validated on the real lesion masks; "
          "the student then fine-tuned on the lesions at lr/5",
          reads="{init_from} (inflated), {pseudo_labels}, COVID-19-20 lesions",
          writes="`student/`, `checkpoints/` (the fine-tune)",
          headline="segmentation of the pseudo-labels, from {init_from}"),
    Stage("multitask", ("multitask",), init_from=("pretrain2d",), pseudo_labels="pseudolabel",
          inflates=True, runner="covid3d.stages.multitask",
          does="STOIC probSevere (COVID-positive cases) + pseudo-label segmentation, losses 1:1; "
          "the student then fine-tuned on the lesions at lr/5",
          reads="{init_from} (inflated), {pseudo_labels}, COVID-19-20 lesions",
          writes="`student/`, `checkpoints/` (the fine-tune)",
          headline="STOIC severity + pseudo-label segmentation, from {init_from}"),
    Stage("finetune", TARGETS, init_from=("segmia", "multitask", "random"), per_target=True,
          runner="covid3d.stages.finetune",
          does="4- or 2-class fine-tuning with stratified 5-fold CV (balanced CE, EMA), then the "
          "fold-ensemble prediction; workdir `<target>_<init>`",
          reads="{init_from}, a run each (by hand: any other workdir or checkpoint)",
          writes="`folds.csv`, `fold<k>/`, `cv.json`, `predictions_<partition>.csv`, "
          "`submission_<partition>/<class>.csv`, `metrics_validation.json`, "
          "`confusion_validation.png`, `MODEL_CARD.md`",
          headline="5-fold CV fine-tuning from {init}, then the fold ensemble predicts"),
    Stage("report", (), kind="report",
          does="`python -m covid3d.report R`: the CV macro F1 table of every fine-tuning run",
          reads="`R/*/cv.json` (stage {number[finetune]})", writes="`R/report.md`, `R/report.png`",
          headline="CV macro F1 of the fine-tuning runs"),
    Stage("predict", ("predict",), init_from=("finetune",), chained=False,
          runner="covid3d.stages.predict",
          does="by hand, not chained: the ensemble of a finished fine-tuning run on the "
          "validation/test partitions (`--config.predict.folds=4` = the authors' fifth-fold-only "
          "submissions)",
          reads="{init_from}", writes="as stage {number[finetune]}"),
)




def stage_of(config: str) -> Stage:
  """The stage that runs ``configs/<config>.py`` (``config.stage``); KeyError if none."""
  for stage in STAGES:
    if config in stage.configs:
      return stage
  raise KeyError(config)


def target(name: str) -> Target:
  """The fine-tuning target ``name`` (severity or detection); KeyError if none."""
  for t in FINETUNE_TARGETS:
    if t.name == name:
      return t
  raise KeyError(name)


def paper_rows(target_name: str) -> tuple:
  """The presets of ``target_name`` that reproduce a row of the paper, in order."""
  return tuple(p for p in target(target_name).presets if p.paper_cv_macro_f1 is not None)


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of a run: a stage's covid3d.main in its workdir, or the report.

  ``output`` is the stage's workdir (the report's file for the report);
  ``init_from`` and ``pseudo_labels`` are the workdirs (or checkpoint, or
  "random") it was handed, also in ``args``, python's arguments.
  """
  kind: str
  name: str
  output: str
  headline: str
  args: tuple
  init_from: str = ""
  pseudo_labels: str = ""


def steps(root, targets=TARGETS, init2d="", inflation="full", configs="configs", suffix="",
          flags=(), flags_3d=()):
  """The steps of one run under ``root``, in order; the report is the last.

  ``targets`` are the fine-tuning targets, in the order they run; a 2-D
  checkpoint ``init2d`` replaces pretraining. A stage runs
  ``configs/<config>.py<suffix>``; ``flags_3d`` go to the 3-D stages, then
  ``flags`` to every stage (so a later flag wins, as in absl). The workdirs of
  the stages whose weights descend from an ``inflation`` other than ``full``
  are named for it (``inflated_name``), and those stages are told it
  (``--config.inflation.mode``), which each checks against its source's.
  """
  if not targets:
    raise ValueError("no fine-tuning target")
  return (*_stage_steps(root, targets, init2d, inflation, configs, suffix, flags, flags_3d),
          _report_step(root))


def _check_targets(targets):
  for name in targets:
    if name not in TARGETS:
      raise ValueError(f"target {name!r} is not {' or '.join(TARGETS)}")


def _report_step(root):
  (stage,) = (s for s in STAGES if s.kind == "report")
  return Step("report", "report", f"{root}/report.md", stage.headline,
              ("-m", "covid3d.report", root))


def _stage_steps(root, targets, init2d, inflation, configs, suffix, flags, flags_3d):
  """The chain's stage steps (``steps`` without the report); no targets: the pretrainings."""
  _check_targets(targets)
  # What a stage hands on: its workdir, by stage name; a given checkpoint is
  # pretrain2d's, which then does not run.
  workdirs = {"random": "random"}
  if init2d:
    workdirs["pretrain2d"] = init2d
  inflated = set()      # the stages whose weights descend from the inflation
  out = []
  for stage in STAGES:
    if not stage.chained or stage.kind != "stage" or stage.name in workdirs:
      continue
    for config in targets if stage.per_target else stage.configs:
      for init in stage.init_from or ("",):
        descends = stage.inflates or init in inflated
        name = f"{config}_{init}" if len(stage.init_from) > 1 else config
        workdir = f"{root}/{inflated_name(name, inflation) if descends else name}"
        start = workdirs[init] if init else ""
        labels = workdirs[stage.pseudo_labels] if stage.pseudo_labels else ""
        args = ["-m", "covid3d.main", f"--config={configs}/{config}.py{suffix}",
                f"--workdir={workdir}"]
        args += [f"--config.init_from={start}"] if start else []
        args += [f"--config.pseudo_labels={labels}"] if labels else []
        args += [f"--config.inflation.mode={inflation}"] if descends else []
        args += [*flags_3d] if stage.is_3d else []
        args += flags
        headline = stage.headline.format(init_from=start, init=init, inflation=inflation)
        out.append(Step("stage", config, workdir, headline, tuple(args), start, labels))
        workdirs[stage.name] = workdir
        if descends:
          inflated.add(stage.name)
  return out


def ablation_steps(root, targets=TARGETS, init2d="", configs="configs", suffix="", flags=(),
                   flags_3d=()):
  """The steps of ``launch/ablations.sh``: every preset of ``targets``, each with what it needs.

  First the pretrainings the presets start from, of each inflation they name
  (the chain's stages of that inflation, ``steps``, that lead to a preset's
  ``source``; each workdir once), then one run per preset in
  ``root/<target>_<preset>`` (``configs/<target>.py:<preset><suffix>``, its
  source resolved by name; ``init2d`` for those that start from the 2-D
  weights; the fold ensemble predicts, ``--config.predict.folds=``), then the report.
  """
  _check_targets(targets)
  presets = [(name, p) for name in targets for p in target(name).presets]
  if not presets:
    raise ValueError("no preset to run")
  out, made = [], set()
  for inflation in dict.fromkeys(p.inflation for _, p in presets):
    pretraining = _stage_steps(root, (), init2d, inflation, configs, suffix, flags, flags_3d)
    needed = {f"{root}/{p.source}" for _, p in presets if p.inflation == inflation}
    for step in reversed(pretraining):     # what the needed stages start from is needed too
      if step.output in needed:
        needed |= {step.init_from, step.pseudo_labels}
    for step in pretraining:
      if step.output in needed and step.output not in made:
        out.append(step)
        made.add(step.output)
  words = suffix.removeprefix(":")
  for name, p in presets:
    workdir = f"{root}/{name}_{p.name}"
    start = init2d if init2d and p.init == "pretrain2d" else ""
    args = ["-m", "covid3d.main", f"--config={configs}/{name}.py:{p.name}"
            + (f",{words}" if words else ""), f"--workdir={workdir}"]
    args += [f"--config.init_from={start}"] if start else []
    args += ["--config.predict.folds=", *flags_3d, *flags]
    inflated = "" if p.init == "random" else f" ({p.inflation} inflation)"
    headline = f"{p.run}, from {start or p.source}{inflated}"
    source = start or (p.source if p.init == "random" else f"{root}/{p.source}")
    out.append(Step("stage", name, workdir, headline, tuple(args), source))
  return (*out, _report_step(root))


def markdown_table():
  """The README's pipeline table: one row per stage, chained ones numbered in order."""
  chained = [s.name for s in STAGES if s.chained]
  number = {name: str(i) for i, name in enumerate(chained, 1)}

  def hand_off(field, names):
    words = ["`random`" if n == "random" else number[n] for n in names]
    listed = " or ".join([", ".join(words[:-1]), words[-1]] if len(words) > 1 else words)
    return f"`{field}` = stage {listed}"

  rows = ["| # | config | does | reads | writes |", "|---|---|---|---|---|"]
  for s in STAGES:
    fields = {"number": number}
    if s.init_from:
      fields["init_from"] = hand_off("init_from", s.init_from)
    if s.pseudo_labels:
      fields["pseudo_labels"] = hand_off("pseudo_labels", (s.pseudo_labels,))
    config = " / ".join(f"`{c}.py`" for c in s.configs) or "-"
    rows.append(f"| {number.get(s.name, '-')} | {config} | {s.does} | {s.reads.format(**fields)} "
                f"| {s.writes.format(**fields)} |")
  return "\n".join(rows) + "\n"


def presets_markdown():
  """docs/method.md's preset table: one row per preset of each fine-tuning target."""
  rows = ["| preset | the authors' run | starts from | inflation | quarter turns | CV "
          "| predicts with |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for t in FINETUNE_TARGETS:
    for p in t.presets:
      start = {"random": "random", "pretrain2d": "`pretrain2d` (ImageNet)"}.get(
          p.init, f"`{p.source}`")
      inflation = "-" if p.init == "random" else ", ".join(
          [{"full": "full"}.get(p.inflation, p.inflation.upper())]
          + [f"`new_axis={p.new_axis}`"] * (p.new_axis != 0)
          + [f"`norm={p.norm}`"] * (p.norm != "sum"))
      cv = f"{p.folds} folds" if p.folds > 1 else "none"
      predicts = "ensemble" if not p.submission else "fold 5" if p.folds > 1 else "the one model"
      rows.append(f"| `{t.name}.py:{p.name}` | {p.run} | {start} | {inflation} | {p.rot90:g} "
                  f"| {cv} | {predicts} |")
  return "\n".join(rows) + "\n"


def step_line(step):
  """``step`` as one tab-separated line (see the module docstring)."""
  fields = (step.kind, step.name, step.output, step.headline, *step.args)
  for field in fields:
    if not field or "\t" in field or "\n" in field:
      raise ValueError(f"{field!r} in the chain: a word cannot be empty or hold a tab or newline")
  return "\t".join(fields) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                   description="Prints the stage chain of one run (see the "
                                   "module docstring for the format).")
  parser.add_argument("--root", default="R", help="workdir root (default R)")
  parser.add_argument("--targets", default=",".join(TARGETS),
                      help="comma-separated fine-tuning targets (default %(default)s)")
  parser.add_argument("--init2d", default="", help="2-D checkpoint that replaces pretraining")
  parser.add_argument("--inflation", default="full", help="inflation mode (default full)")
  parser.add_argument("--configs", default="configs", help="folder of the stage configs")
  parser.add_argument("--suffix", default="", help="config argument, e.g. ':demo'")
  parser.add_argument("--flag", action="append", default=[],
                      help="flag of every stage, last (give as --flag=FLAG; repeatable)")
  parser.add_argument("--flag-3d", action="append", default=[],
                      help="flag of the 3-D stages (give as --flag-3d=FLAG; repeatable)")
  parser.add_argument("--markdown", action="store_true", help="print the README's table")
  parser.add_argument("--paper-rows", metavar="TARGET",
                      help="print the presets of TARGET that reproduce the paper's rows")
  parser.add_argument("--presets-markdown", action="store_true",
                      help="print docs/method.md's preset table")
  parser.add_argument("--ablations", action="store_true",
                      help="print the steps of launch/ablations.sh instead: every preset of "
                      "--targets, after the pretrainings each needs (--inflation is theirs)")
  args = parser.parse_args(argv)
  if args.markdown:
    sys.stdout.write(markdown_table())
    return 0
  if args.presets_markdown:
    sys.stdout.write(presets_markdown())
    return 0
  if args.paper_rows:
    if args.paper_rows not in TARGETS:
      print(f"{PROG}: target {args.paper_rows!r} is not {' or '.join(TARGETS)}", file=sys.stderr)
      return 2
    sys.stdout.write("".join(f"{p.name}\t{p.init}\n" for p in paper_rows(args.paper_rows)))
    return 0
  targets, flags, flags_3d = tuple(args.targets.split(",")), tuple(args.flag), tuple(args.flag_3d)
  try:
    if args.ablations:
      plan = ablation_steps(args.root, targets, args.init2d, args.configs, args.suffix, flags,
                            flags_3d)
    else:
      plan = steps(args.root, targets, args.init2d, args.inflation, args.configs, args.suffix,
                   flags, flags_3d)
    lines = [step_line(s) for s in plan]
  except ValueError as error:
    print(f"{PROG}: {error}", file=sys.stderr)
    return 2
  sys.stdout.write("".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
