#!/usr/bin/env python
"""Compile every Triton kernel for sm_90 and sm_80 without a GPU (the CI tier by default, --all for the
full matrix); prints per-kernel compile time, registers, spills and tensor-core use. See
offsite_ds/kernels/compile_gate.py (kernels/compile_gate.py in the repository)."""
import sys

from offsite_ds.kernels.compile_gate import main

if __name__ == "__main__":
    sys.exit(main())
