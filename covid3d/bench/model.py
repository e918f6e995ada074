"""``python -m covid3d.bench model``: ConvNeXt forward+backward per depthwise-conv backend.

For each backend (and remat mode) it reports the compile time, the median time
of a jitted forward+backward step, and the peak memory: XLA's buffer
assignment of the compiled step (arguments + outputs + temporaries, every
platform) and, where the runtime reports it (GPU/TPU), the device's measured
peak. ``--compile-only`` skips running, which lets a CPU report the memory
plan of a 224^3 step it would take minutes to run.
"""
import time

import jax
import jax.numpy as jnp

from covid3d.bench.common import device_line, print_table
from covid3d.models import DWCONV_IMPLS, ConvNeXt, variant
from covid3d.timing import median_seconds


def register(subparsers):
  p = subparsers.add_parser("model", help="ConvNeXt forward+backward per dwconv backend")
  p.add_argument("--variant", default="tiny")
  p.add_argument("--size", type=int, default=64, help="cube edge in voxels")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
  p.add_argument("--impl", default="all", help="a backend, or 'all'")
  p.add_argument("--remat", default="none", help="none, block, stage or 'all'")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--compile-only", action="store_true", help="report compile time and memory plan only")
  p.set_defaults(func=run)


def _peak_device_bytes():
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def bench_step(variant_name, size, batch, spatial_dims, impl, remat, dtype, reps, compile_only):
  """One row of the table: a dict of measured figures."""
  model = ConvNeXt(**variant(variant_name), spatial_dims=spatial_dims, num_classes=2,
                   dwconv_impl=impl, remat=remat, dtype=jnp.dtype(dtype))
  x = jnp.ones((batch,) + (size,) * spatial_dims + (1,), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  labels = jnp.zeros((batch,), jnp.int32)

  def loss(p, x):
    logits = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])

  step = jax.jit(jax.value_and_grad(loss))
  t0 = time.perf_counter()
  compiled = step.lower(params, x).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  plan = None
  if mem is not None:
    plan = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes)
  row = {"impl": impl, "remat": remat, "compile_s": compile_s,
         "plan_GiB": plan / 2**30 if plan is not None else float("nan")}
  if compile_only:
    return row
  seconds = median_seconds(compiled, params, x, reps=reps)
  peak = _peak_device_bytes()
  row.update(step_s=seconds, vol_per_s=batch / seconds,
             peak_GiB=peak / 2**30 if peak is not None else float("nan"))
  return row


def run(args):
  impls = DWCONV_IMPLS if args.impl == "all" else (args.impl,)
  remats = ("none", "block", "stage") if args.remat == "all" else (args.remat,)
  print(device_line())
  print(f"ConvNeXt-{args.variant} {args.spatial_dims}-D, input {args.size}^{args.spatial_dims}, "
        f"batch {args.batch}, {args.dtype}, forward+backward")
  rows = []
  for impl in impls:
    for remat in remats:
      rows.append(bench_step(args.variant, args.size, args.batch, args.spatial_dims, impl, remat,
                             args.dtype, args.reps, args.compile_only))
      print_table(rows[-1:], header=len(rows) == 1)
  return rows
