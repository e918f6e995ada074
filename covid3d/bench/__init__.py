"""Benchmarks: ``python -m covid3d.bench {model,augment,data,train,imagenet,memory} ...``.

Each submodule defines ``register(subparsers)``, which adds its sub-command and
sets ``func`` to the function that runs it. Figures print as a table with the
device they ran on; compare ratios within one run.
"""
