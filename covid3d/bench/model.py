"""``python -m covid3d.bench model``: ConvNeXt forward+backward per depthwise-conv backend.

For each backend (and remat mode) it reports the compile time, the median time
of a jitted forward+backward step, and the peak memory: XLA's buffer
assignment of the compiled step (arguments + outputs + temporaries, every
platform) and, where the runtime reports it (GPU/TPU), the device's measured
peak. ``--compile-only`` skips running, which lets a CPU report the memory
plan of a 224^3 step it would take minutes to run.

``--impl`` takes a backend, a comma-separated list, ``auto`` (the model's
default: it prints what it chose per stage) or ``all`` (every backend, ``shift``
last; on CPU ``pallas`` only when named, because there it runs in Pallas's
interpreter).

``--torch`` also times a PyTorch ConvNeXt of the same variant and size
(written below: the official architecture, channels-first, in 2-D or 3-D) on
the same device in the same run: forward+backward, and a whole step with
``torch.optim.AdamW``; the JAX rows then get the same AdamW step (optax) and
the ratios JAX time / PyTorch time.

``--dwconv-check B,D,H,W,C`` instead checks the depthwise backends alone at
one activation shape: forward, input and kernel gradients against
``covid3d.models.dwconv.lax_depthwise_conv`` at HIGHEST precision, and
their times (``covid3d/bench/gpu_check.sh`` runs it at ConvNeXt-Tiny's first
stage at 224^3). It exits with status 1 when a backend is off.

``--markdown FILE`` appends the rows to one markdown table (``common.append_markdown``).
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covid3d.bench.common import (append_markdown, compile_timed, device_line, gib,
                                  peak_device_bytes, print_table, random_params)
from covid3d.models import DWCONV_IMPLS, ConvNeXt, choose_impl, depthwise_conv, variant
from covid3d.models.dwconv import lax_depthwise_conv
from covid3d.timing import median_seconds


def register(subparsers):
  p = subparsers.add_parser("model", help="ConvNeXt forward+backward per dwconv backend")
  p.add_argument("--variant", default="tiny")
  p.add_argument("--size", type=int, default=64, help="cube edge in voxels")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
  p.add_argument("--impl", default="all",
                 help="a backend, a comma-separated list, 'auto' or 'all'")
  p.add_argument("--remat", default="none", help="none, block, stage or 'all'")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--compile-only", action="store_true",
                 help="report compile time and memory plan only")
  p.add_argument("--torch", action="store_true",
                 help="also time a PyTorch ConvNeXt (forward+backward, AdamW step) and print "
                      "the ratios")
  p.add_argument("--dwconv-check", default=None, metavar="B,D,H,W,C",
                 help="check and time the depthwise backends alone at this activation shape")
  p.add_argument("--kernel-size", type=int, default=7, help="depthwise kernel of --dwconv-check")
  p.add_argument("--markdown", default=None, metavar="FILE",
                 help="append the rows to this markdown table")
  p.set_defaults(func=run)


def parse_impls(spec: str, platform: str):
  """Backends named by ``--impl``: one, a comma list, ``auto`` or ``all``."""
  if spec == "all":
    # The CPU runs Pallas only in its interpreter: minutes per step, not a contender.
    # ``shift`` (the slowest at large sizes) goes last, so a time limit cuts it first.
    impls = [i for i in DWCONV_IMPLS if i != "pallas" or platform != "cpu"]
    return tuple(sorted(impls, key=lambda i: i == "shift"))
  impls = tuple(s.strip() for s in spec.split(",") if s.strip())
  bad = [i for i in impls if i not in DWCONV_IMPLS + ("auto",)]
  if bad:
    raise SystemExit(f"--impl: unknown backend(s) {bad}; "
                     f"choose from {DWCONV_IMPLS + ('auto', 'all')}")
  return impls


def _adamw():
  import optax  # pylint: disable=import-outside-toplevel
  return optax.adamw(1e-3, weight_decay=0.05)


def bench_step(variant_name, size, batch, spatial_dims, impl, remat, dtype, reps, compile_only,
               adamw=False):
  """One row of the table: a dict of measured figures."""
  model = ConvNeXt(**variant(variant_name), spatial_dims=spatial_dims, num_classes=2,
                   dwconv_impl=impl, remat=remat, dtype=jnp.dtype(dtype))
  x = jnp.ones((batch,) + (size,) * spatial_dims + (1,), jnp.float32)
  params = random_params(model, x)
  labels = jnp.zeros((batch,), jnp.int32)

  def loss(p, x):
    logits = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), labels])

  compiled, compile_s, plan = compile_timed(jax.jit(jax.value_and_grad(loss)), params, x)
  row = {"impl": impl, "remat": remat, "compile_s": compile_s, "plan_GiB": gib(plan)}
  if compile_only:
    return row
  seconds = median_seconds(compiled, params, x, reps=reps)
  row.update(step_s=seconds, vol_per_s=batch / seconds)
  if adamw:
    tx = _adamw()

    def train_step(p, opt_state, x):
      _, grads = jax.value_and_grad(loss)(p, x)
      updates, opt_state = tx.update(grads, opt_state, p)
      return jax.tree.map(jnp.add, p, updates), opt_state

    opt_state = tx.init(params)
    train = jax.jit(train_step).lower(params, opt_state, x).compile()
    row["adamw_step_s"] = median_seconds(train, params, opt_state, x, reps=reps)
  row["peak_GiB"] = gib(peak_device_bytes())
  return row


def auto_choices(variant_name, size, batch, spatial_dims, dtype, kernel_size=7):
  """What ``auto`` chose for each stage's depthwise convolution (cached, so free after a run)."""
  dims = variant(variant_name)["dims"]
  out = []
  for i, c in enumerate(dims):
    n = size // (4 * 2 ** i)
    shape = (batch,) + (n,) * spatial_dims + (c,)
    out.append(choose_impl(shape, (kernel_size,) * spatial_dims + (1, c), jnp.dtype(dtype)))
  return out


# ------------------------------------------------------------------ PyTorch

def torch_convnext(torch, depths, dims, spatial_dims=3, in_chans=1, num_classes=2,
                   kernel_size=7, layer_scale_init=1e-6, head_hidden=0):
  """The official ConvNeXt (Liu et al. 2022) in PyTorch, channels-first, 2-D or 3-D.

  Stem: ``4^d`` conv stride 4 + channels-first LayerNorm; downsampling:
  LayerNorm + ``2^d`` conv stride 2; blocks: ``k^d`` depthwise conv ->
  LayerNorm -> Linear 4C -> GELU -> Linear C -> layer scale -> residual;
  head: global average pool, LayerNorm, (with ``head_hidden``: the authors'
  Linear + ReLU,) Linear. Its parameters come in the order of
  ``covid3d.weights.to_torch.export_torch_convnext``'s entries.
  """
  nn = torch.nn
  conv = nn.Conv3d if spatial_dims == 3 else nn.Conv2d

  class ChannelsFirstLayerNorm(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
      return self.norm(x.movedim(1, -1)).movedim(-1, 1)

  class Block(nn.Module):
    def __init__(self, c):
      super().__init__()
      self.dwconv = conv(c, c, kernel_size, padding=kernel_size // 2, groups=c)
      self.norm = nn.LayerNorm(c, eps=1e-6)
      self.pwconv1 = nn.Linear(c, 4 * c)
      self.act = nn.GELU()
      self.pwconv2 = nn.Linear(4 * c, c)
      self.gamma = nn.Parameter(torch.full((c,), layer_scale_init))

    def forward(self, x):
      y = self.dwconv(x).movedim(1, -1)
      y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
      return x + (self.gamma * y).movedim(-1, 1)

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      layers = []
      for i, (depth, c) in enumerate(zip(depths, dims, strict=True)):
        if i == 0:
          layers += [conv(in_chans, c, 4, stride=4), ChannelsFirstLayerNorm(c)]
        else:
          layers += [ChannelsFirstLayerNorm(dims[i - 1]), conv(dims[i - 1], c, 2, stride=2)]
        layers += [Block(c) for _ in range(depth)]
      self.features = nn.Sequential(*layers)
      self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
      self.pre_head = (nn.Sequential(nn.Linear(dims[-1], head_hidden), nn.ReLU()) if head_hidden
                       else nn.Identity())
      self.head = nn.Linear(head_hidden or dims[-1], num_classes)

    def forward(self, x):
      x = self.features(x)
      return self.head(self.pre_head(self.norm(x.mean(dim=tuple(range(2, x.ndim))))))

  return Net()


def _import_torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return torch


def bench_torch(torch, variant_name, size, batch, spatial_dims, dtype, reps):
  """PyTorch forward+backward and AdamW step on the device JAX uses; None if torch lacks it."""
  platform = jax.devices()[0].platform
  if platform == "gpu":
    if not torch.cuda.is_available():
      print("--torch: this PyTorch has no CUDA; its CPU time would not compare with the GPU")
      return None
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
  elif platform == "cpu":
    device = torch.device("cpu")
  else:
    print(f"--torch: no PyTorch device for JAX platform {platform!r}")
    return None
  torch.manual_seed(0)
  net = torch_convnext(torch, **variant(variant_name), spatial_dims=spatial_dims).to(device)
  x = torch.randn((batch, 1) + (size,) * spatial_dims, device=device)
  labels = torch.zeros(batch, dtype=torch.long, device=device)
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def fwd_bwd():
    net.zero_grad(set_to_none=True)
    with autocast:
      loss = torch.nn.functional.cross_entropy(net(x), labels)
    loss.backward()

  def adamw_step():
    fwd_bwd()
    opt.step()

  def median(fn):
    fn()
    sync()
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - t0)
    return float(np.median(times))

  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  row = {"impl": f"torch {torch.__version__}", "remat": "none", "compile_s": float("nan"),
         "plan_GiB": float("nan")}
  row["step_s"] = median(fwd_bwd)
  row["vol_per_s"] = batch / row["step_s"]
  row["adamw_step_s"] = median(adamw_step)
  row["peak_GiB"] = (torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
                     else float("nan"))
  return row


# ------------------------------------------------------- depthwise check

def dwconv_check(shape, kernel_size, dtype, impls, reps, markdown=None):
  """Rows per backend: relative errors of y, dx, dkernel against lax, and times.

  Each row is printed (and appended to ``markdown``) as soon as it is measured.
  """
  nd = len(shape) - 2
  kx, kk, kc = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape).astype(dtype)
  kernel = (jax.random.normal(kk, (kernel_size,) * nd + (1, shape[-1])) / kernel_size).astype(dtype)
  cot = jax.random.normal(kc, shape)

  def value_and_vjp(fn):
    def run(x, kernel):
      y, vjp = jax.vjp(fn, x, kernel)
      return y, vjp(cot.astype(y.dtype))
    return jax.jit(run)

  ref = value_and_vjp(functools.partial(lax_depthwise_conv, precision=lax.Precision.HIGHEST))(
      x.astype(jnp.float32), kernel.astype(jnp.float32))
  ref = [np.asarray(r, np.float32) for r in jax.tree.leaves(ref)]
  tol = 1e-4 if jnp.dtype(dtype) == jnp.float32 else 2e-2
  rows = []
  for impl in impls:
    row = {"impl": impl, "dtype": jnp.dtype(dtype).name, "shape": "x".join(map(str, shape)),
           "k": kernel_size}
    try:
      both = value_and_vjp(lambda a, b, impl=impl: depthwise_conv(a, b, None, impl))
      compiled, row["compile_s"], _ = compile_timed(both, x, kernel)
      got = [np.asarray(g, np.float32) for g in jax.tree.leaves(compiled(x, kernel))]
      errs = [float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
              for g, r in zip(got, ref, strict=True)]
      row.update(err_y=errs[0], err_dx=errs[1], err_dw=errs[2],
                 check="ok" if max(errs) <= tol else f"FAIL (tol {tol:g})")
      fwd = jax.jit(lambda a, b, impl=impl: depthwise_conv(a, b, None, impl))
      row["fwd_ms"] = 1e3 * median_seconds(fwd, x, kernel, reps=reps)
      row["fwd_bwd_ms"] = 1e3 * median_seconds(compiled, x, kernel, reps=reps)
    except Exception as e:  # pylint: disable=broad-except
      # A backend the device cannot compile (or run out of memory in) is a row, not a crash.
      row["check"] = f"FAIL ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
    row["peak_GiB"] = gib(peak_device_bytes())
    rows.append(row)
    print_table(rows[-1:], header=len(rows) == 1)
    append_markdown(markdown, f"dwconv check {row['dtype']}", rows[-1:], "impl")
  return rows


def run(args):
  platform = jax.devices()[0].platform
  impls = parse_impls(args.impl, platform)
  print(device_line())
  if args.dwconv_check:
    shape = tuple(int(s) for s in args.dwconv_check.split(","))
    print(f"depthwise {args.kernel_size}^{len(shape) - 2} at {shape}, {args.dtype}: forward, dx, "
          "dkernel vs lax (HIGHEST precision); errors are max |diff| / max |reference|")
    rows = dwconv_check(shape, args.kernel_size, jnp.dtype(args.dtype),
                        tuple(i for i in impls if i != "auto"), args.reps, args.markdown)
    if any(r["check"] != "ok" for r in rows):
      sys.exit(1)
    return rows
  remats = ("none", "block", "stage") if args.remat == "all" else (args.remat,)
  what = f"model {args.variant} {args.size}^{args.spatial_dims} b{args.batch} {args.dtype}"
  torch = _import_torch() if args.torch else None
  if args.torch and torch is None:
    print("--torch: PyTorch is not installed (pip install torch); timing JAX only")
  trow = None
  if torch is not None and not args.compile_only:
    # PyTorch first: its figure (and each JAX row's ratio) is on record even if
    # a slow backend is stopped later.
    print(f"PyTorch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ""))
    trow = bench_torch(torch, args.variant, args.size, args.batch, args.spatial_dims, args.dtype,
                       args.reps)
    if trow is not None:
      print_table([trow])
      append_markdown(args.markdown, what, [trow], "impl")
  print(f"ConvNeXt-{args.variant} {args.spatial_dims}-D, input {args.size}^{args.spatial_dims}, "
        f"batch {args.batch}, {args.dtype}, forward+backward"
        + (", and a step with AdamW" if trow is not None else ""))
  rows = []
  for impl in impls:
    for remat in remats:
      row = bench_step(args.variant, args.size, args.batch, args.spatial_dims, impl, remat,
                       args.dtype, args.reps, args.compile_only, adamw=trow is not None)
      if impl == "auto":
        choices = auto_choices(args.variant, args.size, args.batch, args.spatial_dims, args.dtype)
        row["impl"] = f"auto ({'/'.join(choices)})"
      if trow is not None:
        row["ratio_vs_torch"] = row["step_s"] / trow["step_s"]
        row["adamw_ratio_vs_torch"] = row["adamw_step_s"] / trow["adamw_step_s"]
      rows.append(row)
      print_table(rows[-1:], header=len(rows) == 1)
      append_markdown(args.markdown, what, rows[-1:], "impl")
  if trow is not None:
    print("JAX time / PyTorch time (below 1: JAX is faster):")
    print_table([{"impl": r["impl"], "remat": r["remat"],
                  "fwd+bwd": r["ratio_vs_torch"], "adamw step": r["adamw_ratio_vs_torch"]}
                 for r in rows])
    rows.append(trow)
  return rows
