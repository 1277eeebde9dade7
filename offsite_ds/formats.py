"""The file-format facts every layer reads: dtype names <-> torch dtypes, safetensors file names, header cap.

One home, so that the checkpoint reader, the artifact validator, the manifests and the command-line
`--dtype` options cannot disagree about what a dtype is called or how a weights file is named.
"""
from __future__ import annotations

import re

import torch

# safetensors dtype code -> torch dtype (the codes torch can hold)
SAFETENSORS_TORCH = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                     "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                     "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
TORCH_SAFETENSORS = {v: k for k, v in SAFETENSORS_TORCH.items()}
# every safetensors dtype code -> bytes per element (the validator accepts the codes torch cannot hold, too)
SAFETENSORS_ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                          "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16': the name manifests record."""
    return str(dtype).removeprefix("torch.")


# safetensors dtype code -> the torch name a manifest records for it ('BF16' -> 'bfloat16')
SAFETENSORS_NAMES = {code: dtype_name(dtype) for code, dtype in SAFETENSORS_TORCH.items()}
# the weight dtypes a command accepts by name (--dtype of emulate / plug-in) and a bundle may record
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_DTYPE_NAMES = tuple(WEIGHT_DTYPES)
# the dtypes an adapter package's tensors may have (its manifest's tensor table)
TENSOR_DTYPE_NAMES = (*WEIGHT_DTYPE_NAMES, "float64")
# the short spellings (lm-eval's --dtype, the benchmark settings) next to the long ones
DTYPE_ALIASES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, **WEIGHT_DTYPES}

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def shard_name(i: int, n: int) -> str:
    """The HF name of shard i of n (1-based), which `SHARD` matches."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"
