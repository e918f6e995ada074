"""python -m covid3d.data.tfds_builders build NAME [NAME ...] --data_dir ...

The in-process equivalent of `tfds build`, which needs no TensorFlow (the
`tfds` command itself imports TensorFlow at start-up).
"""
import argparse
import logging
import sys

from covid3d.data import tfds_builders


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(prog="python -m covid3d.data.tfds_builders",
                                   description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  b = commands.add_parser("build", help="prepare datasets")
  b.add_argument("names", nargs="+", choices=tfds_builders.NAMES)
  b.add_argument("--data_dir", required=True, help="TFDS data dir")
  b.add_argument("--manual_dir", help="raw data (default "
                 "<download_dir>/manual)")
  b.add_argument("--download_dir",
                 help="downloads + preprocessing cache (default "
                 "<data_dir>/downloads)")
  b.add_argument("--config", default="default", help="'default' or 'demo'")
  b.add_argument("--workers", type=int, help="preprocessing processes")
  b.add_argument("--strict", action="store_true",
                 help="fail on the first bad scan instead of skipping it")
  b.add_argument("--overwrite", action="store_true",
                 help="regenerate an already prepared dataset")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO)
  for name in args.names:
    builder = tfds_builders.build(
        name, data_dir=args.data_dir, manual_dir=args.manual_dir,
        download_dir=args.download_dir, config=args.config,
        workers=args.workers, strict=args.strict, overwrite=args.overwrite)
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    print(f"{name}/{args.config}: {builder.data_dir} {splits}")


if __name__ == "__main__":
  main(sys.argv[1:])
