"""Triton kernels for the data owner's emulator loop, imported as `offsite_ds.kernels`.

Each kernel file holds the Triton kernel(s), a torch.autograd.Function, a plain-torch `reference_*` of the
same maths and a user-facing function that runs Triton on CUDA (or under TRITON_INTERPRET=1) and the
reference otherwise. `patch(model)` swaps them into an HF causal LM; `unpatch(model)` restores it.

The sources live in the repository's top-level `kernels/` folder, which deliberately has no `__init__.py`:
a regular package there would shadow Hugging Face's `kernels` (imported by transformers) whenever the
repository root is on sys.path. A wheel copies the sources next to this file; in a checkout this package's
search path is extended to that folder (offsite_ds.resources finds it).
"""
from pathlib import Path

from offsite_ds.resources import resource_dir

_SOURCES = resource_dir("kernels", "runtime.py")
if _SOURCES != Path(__file__).resolve().parent:  # a checkout; in a wheel the sources sit here already
    __path__.append(str(_SOURCES))  # noqa: F821 - the package's own search path

from offsite_ds.kernels.bias_activation import bias_activation, linear_bias_activation, reference_bias_activation
from offsite_ds.kernels.layer_norm import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm
from offsite_ds.kernels.linear_cross_entropy import linear_cross_entropy, reference_linear_cross_entropy
from offsite_ds.kernels.lora_linear import lora_linear, matmul_lowrank, reference_lora_linear
from offsite_ds.kernels.patch import (DEFAULT_PARTS, PARTS, PatchHandle, kernels_enabled, kernels_for_training, patch,
                                     patch_for_training, patched, resolve_kernels, unpatch)

__all__ = ["DEFAULT_PARTS", "PARTS", "PatchHandle", "bias_activation", "kernels_enabled", "kernels_for_training", "layer_norm",
           "linear_bias_activation", "linear_cross_entropy", "lora_linear", "matmul_lowrank", "patch",
           "patch_for_training", "patched", "reference_bias_activation", "reference_layer_norm",
           "reference_linear_cross_entropy", "reference_lora_linear", "reference_rms_norm", "resolve_kernels",
           "rms_norm", "unpatch"]
