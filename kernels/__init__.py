"""Triton kernels for the data owner's emulator loop (imported as offsite_ds.kernels)."""
