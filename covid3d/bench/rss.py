"""This process's resident memory, read from /proc (Linux): what the host benchmarks measure."""
import re


def memory() -> dict:
  """{'VmRSS', 'VmHWM'} of this process in bytes (Linux): resident now and at its peak.

  VmHWM is the peak of this process image alone; ru_maxrss is not, as Linux
  carries the parent's resident memory at fork into a spawned child's.
  """
  with open("/proc/self/status") as f:
    found = dict(re.findall(r"(VmRSS|VmHWM):\s+(\d+) kB", f.read()))
  return {k: int(v) * 1024 for k, v in found.items()}


def reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False
