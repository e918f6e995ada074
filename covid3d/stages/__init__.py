"""The pipeline stages, one module each; ``chain.STAGES`` names each config's module.

pretrain2d -> (inflate) -> segmentation -> pseudolabel -> segmia | multitask
-> severity | detection (k-fold fine-tuning, ``finetune.py``) -> predict (fold ensemble).
The order and the hand-offs of a whole run are data in ``chain.py``.
"""
