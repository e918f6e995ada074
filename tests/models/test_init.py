"""Weight init matches PyTorch's trunc_normal_(std=.02): N(0, 0.02) cut at absolute +-2."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from covid3d.models import VARIANTS, ConvNeXt
from covid3d.models.layers import INIT, trunc_normal_abs

NANO = dict(zip(("depths", "dims"), VARIANTS["nano"], strict=True))
N = 1_000_000


def _within_sampling_error(x, std, z=5.0):
  """Sample std and mean of ``x`` agree with N(0, std) within ``z`` standard errors."""
  n = x.size
  assert abs(x.std() - std) < z * std / np.sqrt(2 * n), x.std()
  assert abs(x.mean()) < z * std / np.sqrt(n), x.mean()


def test_large_kernel_has_std_002_and_stays_within_2():
  x = np.asarray(INIT(jax.random.key(0), (1000, 1000), jnp.float32), np.float64)
  assert x.dtype == np.float64 and x.shape == (1000, 1000)
  # Flax's truncated_normal(0.02) would give 0.0176 here, 170 standard errors away.
  _within_sampling_error(x, 0.02)
  assert np.abs(x).max() <= 2.0
  # Not cut at 2 sigma (0.04): the tails of N(0, 0.02) are there (P(|x| > 0.04) = 4.55 %).
  np.testing.assert_allclose(np.mean(np.abs(x) > 0.04), 0.0455, atol=0.001)


def test_bound_is_absolute_not_in_sigmas():
  x = np.asarray(trunc_normal_abs(stddev=1.0, bound=2.0)(jax.random.key(1), (N,)))
  assert np.abs(x).max() == 2.0  # clipped at the value 2, i.e. 2 sigma for std 1
  assert np.asarray(INIT(jax.random.key(1), (4, 4), jnp.bfloat16)).dtype == jnp.bfloat16


def test_model_weights_use_it():
  model = ConvNeXt(**NANO, spatial_dims=2, num_classes=3, head_hidden=128)
  params = model.init(jax.random.key(0), jnp.ones((1, 32, 32, 1)))["params"]
  kernels = [np.ravel(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
             if str(getattr(p[-1], "key", p[-1])) == "kernel"]
  _within_sampling_error(np.concatenate(kernels).astype(np.float64), 0.02)


def test_same_distribution_as_torch():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  theirs = torch.nn.init.trunc_normal_(torch.empty(N), std=0.02).numpy().astype(np.float64)
  ours = np.asarray(INIT(jax.random.key(2), (N,)), np.float64)
  # Two-sample Kolmogorov-Smirnov: the largest CDF gap stays below its 0.1 % critical value.
  grid = np.sort(np.concatenate([ours, theirs]))
  gap = np.abs(np.searchsorted(np.sort(ours), grid, side="right")
               - np.searchsorted(np.sort(theirs), grid, side="right")).max() / N
  assert gap < 1.95 * np.sqrt(2 / N), gap
  _within_sampling_error(theirs, 0.02)
  assert np.abs(theirs).max() <= 2.0
