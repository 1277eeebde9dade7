"""How far a kernel may be from its fp32 reference: the one table, by purpose and compute dtype.

Imported as `offsite_ds.kernels.tolerances` by the patch probes, the CPU kernel tests and the GPU acceptance
run (scripts/gpu_acceptance.py), so a tolerance is changed in one place and the three cannot drift.
Each bound is on max |kernel - reference| relative to the reference's magnitude (see each user).
"""
from __future__ import annotations

import torch

# kernel vs its plain-torch reference on the same inputs (tests/test_kernels.py: fp32 through assert_close's
# rtol = atol, lower precisions relative to max(1, |reference|))
PARITY = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# compiled kernels on a GPU vs the fp32 reference (scripts/gpu_acceptance.py: relative to |reference|)
ACCEPTANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# patch probes: does a model's module do our maths? Its reductions run in another order, so looser
PROBE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}


def tolerance(table: dict[torch.dtype, float], dtype: torch.dtype) -> float:
    """The table's bound for `dtype`; a dtype it does not list gets its loosest bound."""
    return table.get(dtype, max(table.values()))
