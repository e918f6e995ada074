"""Entry point of ``python -m covid3d.bench``."""
import argparse
import importlib
import sys

SUBCOMMANDS = ("model", "augment", "data", "train", "imagenet", "memory", "infer")


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m covid3d.bench", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name in SUBCOMMANDS:
    try:
      module = importlib.import_module(f"covid3d.bench.{name}")
    except ModuleNotFoundError as e:
      # A machine without one benchmark's dependencies still runs the others.
      print(f"covid3d.bench: '{name}' unavailable ({e})", file=sys.stderr)
      continue
    module.register(sub)
  args = parser.parse_args(argv)
  args.func(args)


if __name__ == "__main__":
  main()
