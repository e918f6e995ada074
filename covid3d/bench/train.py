"""``python -m covid3d.bench train``: the full sharded train step.

Reports, on the devices of this process: volumes per second of the whole train
step (``covid3d.train.steps.make_train_step``: forward, backward, pmean, AdamW,
EMA) with and without on-device augmentation (``covid3d.augment.augment``,
default config without the 256^3 crop); XLA's FLOP count of one step
(``compiled.cost_analysis()``, all devices together); and the utilisation of
the device's peak (``PEAK_TFLOPS`` below); memory: XLA's plan for the
compiled step (``memory_analysis``) and, where the runtime reports it (GPU/TPU:
``jax.devices()[0].memory_stats()``), the device's peak bytes in use since the
process started (so the augmentation row's peak covers both rows).
``--size`` sets the cube edge per example, ``--batch-per-device`` the examples
per device. ``--scaling 1,2,4,8`` re-runs the no-augmentation step in
subprocesses with that many simulated CPU devices
(``--xla_force_host_platform_device_count``) at the same per-device batch.
``--markdown FILE`` appends the rows to one markdown table
(``covid3d/bench/gpu_check.sh``).
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from covid3d.bench.common import (append_markdown, compile_timed, device_line, gib,
                                  peak_device_bytes, print_table, random_params)

# Peak dense TFLOP/s per device, (float32, bfloat16), matched by substring of
# device_kind (first match wins). GPU figures are the vendors' dense (no
# sparsity) numbers for the SXM parts; float32 = plain FP32, not TF32.
PEAK_TFLOPS = (
    ("H200", (67.0, 989.0)), ("H100", (67.0, 989.0)), ("A100", (19.5, 312.0)),
    ("L4", (30.3, 121.0)), ("V100", (15.7, 125.0)), ("TPU v6", (None, 918.0)),
    ("TPU v5p", (None, 459.0)), ("TPU v5", (None, 197.0)), ("TPU v4", (None, 275.0)),
)
# CPU: no reliable table; assume 32 float32 FLOP per cycle per core (two AVX2
# FMA units of 8 lanes) at 3 GHz, for os.cpu_count() cores, float32 and bf16 alike.
CPU_FLOP_PER_CYCLE, CPU_GHZ = 32, 3.0


def peak_tflops(device, dtype: str) -> float | None:
  """Peak TFLOP/s of one ``device`` for ``dtype`` ('float32'/'bfloat16'), or None."""
  if device.platform == "cpu":
    return os.cpu_count() * CPU_FLOP_PER_CYCLE * CPU_GHZ / 1e3 / len(jax.devices())
  for name, (fp32, bf16) in PEAK_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return bf16 if dtype == "bfloat16" or fp32 is None else fp32
  return None


def register(subparsers):
  p = subparsers.add_parser("train", help="full train step: volumes/s, FLOPs, utilisation, scaling")
  p.add_argument("--variant", default="nano")
  p.add_argument("--size", type=int, default=None,
                 help="cube edge in voxels (default 224 on GPU/TPU, 32 on CPU)")
  p.add_argument("--batch-per-device", type=int, default=1)
  p.add_argument("--micro-batches", type=int, default=1)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--impl", default="auto", help="depthwise-conv backend")
  p.add_argument("--remat", default="none")
  p.add_argument("--steps", type=int, default=5, help="timed steps per figure")
  p.add_argument("--scaling", default="",
                 help="device counts for the CPU scaling runs, e.g. '1,2,4,8'")
  p.add_argument("--no-augment", action="store_true", help="skip the with-augmentation figure")
  p.add_argument("--augment-only", action="store_true",
                 help="only the figure with augmentation (one compile fewer)")
  p.add_argument("--markdown", default=None, metavar="FILE",
                 help="append the rows to this markdown table")
  p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
  p.set_defaults(func=run)


def _measure(args, augment: bool) -> dict:
  """Compiles and times the train step on all devices of this process."""
  from covid3d import augment as aug  # pylint: disable=import-outside-toplevel
  from covid3d import train  # pylint: disable=import-outside-toplevel
  from covid3d.models import ConvNeXt, variant  # pylint: disable=import-outside-toplevel

  size = args.size or (32 if jax.devices()[0].platform == "cpu" else 224)
  mesh = train.make_mesh()
  batch = args.batch_per_device * mesh.size
  model = ConvNeXt(**variant(args.variant), num_classes=4, drop_path_rate=0.1,
                   dwconv_impl=args.impl, remat=args.remat)
  rng = np.random.default_rng(0)
  host = {"image": rng.random((batch, size, size, size, 1), np.float32),
          "label": rng.integers(0, 4, batch).astype(np.int32)}
  # Host-drawn values of the right shapes: compiling model.init on a CPU takes
  # longer than the steps measured here.
  params = random_params(model, jnp.asarray(host["image"][:1]))
  config = train.default_config()
  tx = train.make_optimizer(config)
  augment_fn = None
  if augment:
    aug_config = aug.default_config()
    aug_config.crop.p = 0.0
    augment_fn = functools.partial(aug.augment_example, config=aug_config)
  task = train.classification_task(4, class_counts=[1, 1, 1, 1])
  step = train.make_train_step(train.flax_apply_fn(model), task.loss_fn, tx, mesh,
                               ema_decay=0.99, micro_batches=args.micro_batches,
                               augment_fn=augment_fn,
                               compute_dtype=jnp.dtype(args.dtype))
  state = train.replicate(train.create_state(params, tx, 0), mesh)
  sharded = train.shard_batch(host, mesh)
  compiled, compile_s, plan = compile_timed(step, state, sharded)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # The cost of the SPMD program is per device: times the devices for the step.
  flops = float(cost.get("flops", float("nan"))) * mesh.size
  state, metrics = compiled(state, sharded)  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, sharded)
  jax.block_until_ready((state, metrics))
  seconds = (time.perf_counter() - t0) / args.steps
  peak = peak_tflops(jax.devices()[0], args.dtype)
  util = flops / seconds / (peak * 1e12 * mesh.size) if peak else float("nan")
  return {"augment": "yes" if augment else "no", "devices": mesh.size, "size": size,
          "batch": batch, "compile_s": compile_s, "step_s": seconds,
          "volumes_per_s": batch / seconds, "gflop_per_step": flops / 1e9,
          "utilisation_%": 100 * util, "plan_GiB": gib(plan),
          "peak_GiB": gib(peak_device_bytes())}


def _scaling_row(args, devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "covid3d.bench", "train", "--json", "--no-augment",
         "--variant", args.variant, "--batch-per-device", str(args.batch_per_device),
         "--micro-batches", str(args.micro_batches), "--dtype", args.dtype, "--impl", args.impl,
         "--remat", args.remat, "--steps", str(args.steps)]
  if args.size:
    cmd += ["--size", str(args.size)]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def run(args):
  if args.json:  # a scaling subprocess: one row as JSON
    print(json.dumps(_measure(args, augment=False)))
    return
  print(device_line())
  if args.no_augment and args.augment_only:
    raise SystemExit("--no-augment and --augment-only exclude each other")
  rows = [] if args.augment_only else [_measure(args, augment=False)]
  if not args.no_augment:
    rows.append(_measure(args, augment=True))
  print_table(rows)
  append_markdown(args.markdown, f"train step {args.variant} {args.dtype} impl {args.impl}",
                  [dict(r, what=f"augment {r['augment']}") for r in rows], "what")
  peak = peak_tflops(jax.devices()[0], args.dtype)
  print(f"peak assumed: {peak} TFLOP/s per device ({args.dtype})" if peak
        else "peak: unknown device kind, utilisation not computed")
  if args.scaling:
    counts = [int(c) for c in args.scaling.split(",")]
    scaling = [_scaling_row(args, n) for n in counts]
    base = scaling[0]["volumes_per_s"] / scaling[0]["devices"]
    for row in scaling:
      row["speedup_vs_linear"] = row["volumes_per_s"] / (base * row["devices"])
    print(f"scaling over simulated CPU devices (same {os.cpu_count()} host cores, "
          f"{args.batch_per_device} volume(s) per device):")
    print_table([{k: r[k] for k in ("devices", "batch", "volumes_per_s", "step_s",
                                    "speedup_vs_linear")} for r in scaling])
