"""Inference from trained workdirs, as a library: what ``infer``, ``export`` and the stages share.

``workdir`` reads a finished stage's workdir (its saved config, its best
parameters, what it predicts) without writing to it; ``build`` makes a model
from a config; ``ensemble`` loads the fold models of a fine-tuning workdir and
makes their mean softmax; ``teacher`` loads a segmentation model's lesion
head; ``window`` predicts a large cube in overlapping windows. Nothing here
imports the pipeline (``covid3d.stages``), so the front door (``covid3d.infer``,
``covid3d.export``) does not either.
"""
