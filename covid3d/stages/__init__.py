"""The pipeline stages, one module each; ``registry.STAGES`` maps a config's ``stage`` to it.

pretrain2d -> (inflate) -> segmentation -> pseudolabel -> segmia | multitask
-> severity | detection (k-fold fine-tuning, ``finetune.py``) -> predict (fold ensemble).
The order and the hand-offs of a whole run are data in ``chain.py``.
"""
