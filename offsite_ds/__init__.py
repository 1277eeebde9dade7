"""offsite-ds: Offsite-Tuning (Xiao, Lin, Han 2023) on DeepSpeed.

The model owner splits an LLM into adapter blocks and a compressed emulator; the data owner tunes the
adapter through the emulator; the owner plugs the tuned adapter back into the full model.
"""
__version__ = "0.1.0"
