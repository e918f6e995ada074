"""Import (and export) PyTorch ConvNeXt weights for ``covid3d.models``.

One concern per module:

* ``files``: reading checkpoint files safely (``torch.load(weights_only=True)``
  with plain data allowed, safetensors, npz) and unwrapping their state dicts;
* ``torch_convnext``: official and timm ConvNeXt state dicts as
  ``covid3d.models.ConvNeXt`` parameters (``load_torch_convnext``);
* ``slice_axis``: weights trained on slice-last volumes for slice-first ones;
* ``authors``: the authors' (Kienzle et al.) pretraining, training and
  submission files as ``MultitaskModel`` parameters (``load_authors_checkpoint``);
* ``to_torch``: a ConvNeXt parameter tree as a PyTorch state dict
  (``export_torch_convnext``).

The public names of all of them are importable from here (docs/weights.md).
"""
from covid3d.weights.authors import (authors_target, fold_states, load_authors_checkpoint,
                                     multitask_config)
from covid3d.weights.files import (CHECKPOINT_SUFFIXES, TORCH_SUFFIXES, read_checkpoint,
                                   read_state_dict)
from covid3d.weights.slice_axis import SLICE_AXES, permute_kernels
from covid3d.weights.to_torch import export_torch_convnext
from covid3d.weights.torch_convnext import (NAMINGS, convnext_config, detect_naming,
                                            load_torch_convnext, split_authors_state)
