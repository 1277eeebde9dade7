"""Efficiency benchmark suite: tokens/s, peak memory and MFU of FT, FT+LoRA, OT, OT+LoRA, OT+LoRA+kernels.

Every setting trains for real through the toolkit's one training loop (`offsite_ds.train.train`) on a
model built from a config with random weights, so no download is ever needed. Pieces:
`shapes` (which model), `settings` (what each setting freezes), `flops` (the honest FLOP count),
`devices` (peak FLOP/s), `runner` (the measurement), `report` (JSON, markdown, PNG).
"""
from offsite_ds.bench.runner import BenchSpec, run_suite

__all__ = ["BenchSpec", "run_suite"]
