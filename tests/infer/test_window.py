"""``covid3d.inference.window``: windows that cover the cube, and their mean."""
import numpy as np

from covid3d.inference.window import sliding_window, window_starts


def test_windows_cover_the_cube_with_the_overlap_asked():
  assert window_starts(64, 32, 0.5) == [0, 16, 32]
  assert window_starts(64, 32, 0.0) == [0, 32]
  assert window_starts(70, 32, 0.25) == [0, 24, 38]   # the last one flush with the end
  assert window_starts(32, 32, 0.5) == window_starts(16, 32, 0.5) == [0]


def test_the_mean_over_windows_of_a_voxelwise_model_is_the_model():
  x = np.random.default_rng(0).random((2, 24, 24, 24, 1), np.float32)
  calls = []

  def forward(window):
    calls.append(window.shape)
    return 2 * window
  np.testing.assert_allclose(sliding_window(forward, x, 16, 0.5), 2 * x, rtol=1e-6)
  assert calls == [(2, 16, 16, 16, 1)] * 8   # starts (0, 8) on each axis
