"""What each benchmark setting trains, and how its model is built (random weights, never a download).

ft               every parameter of the full model
ft-lora          LoRA (the toolkit's `apply_mode`, rank 4 as in the paper) in every block of the full model
ot               the emulator (`build_emulator`, uniform layer-drop), adapter blocks fully trainable
ot-lora          the emulator, LoRA in the adapter blocks only
ot-lora-kernels  ot-lora with `offsite_ds.kernels.patch` applied (skipped, with the reason, when absent)

The full model is never materialised for the OT settings: the emulator is selected from a meta-device
model by the toolkit's own `build_emulator`, then materialised from its (shrunk) config on the target
device and checked tensor by tensor against that selection. The weights are random either way.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from offsite_ds.bench.flops import FlopPlan, plan_from_model
from offsite_ds.errors import OffsiteError
from offsite_ds.manifests import LoraSettings
from offsite_ds.zero3 import full_numel


@dataclass(frozen=True)
class Setting:
    name: str
    label: str  # as in the paper's Table 6
    emulator: bool  # train through the emulator (OT) or the full model (FT)
    mode: str  # "all" (every parameter), "full" (whole adapter blocks) or "lora"
    kernels: bool = False
    paper_row: str | None = None  # row of the paper's Table 6 this setting reproduces


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("ft", "FT", False, "all", paper_row="FT"),
    Setting("ft-lora", "FT+LoRA", False, "lora", paper_row="FT+LoRA"),
    Setting("ot", "OT", True, "full", paper_row="OT"),
    Setting("ot-lora", "OT+LoRA", True, "lora", paper_row="OT+LoRA"),
    Setting("ot-lora-kernels", "OT+LoRA+kernels", True, "lora", kernels=True),
)}


class SettingSkipped(Exception):
    """The setting cannot run here (e.g. the kernels are not built yet); recorded with its reason."""


def parse_settings(spec: str | list[str]) -> list[Setting]:
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise OffsiteError(f"unknown setting(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SETTINGS)}")
    return [SETTINGS[n] for n in dict.fromkeys(names)]


@dataclass
class Prepared:
    """A model ready to train for one setting, with what the results record about it."""

    model: nn.Module
    base_params: int  # the full model's parameter count
    resident_params: int  # parameters of the model being trained (on the device unless offloaded)
    trainable_params: int
    flop_plan: FlopPlan | None = None  # read before any kernel patch: the model's math, not the kernels'
    block_map: list[int] | None = None  # emulator position -> original block (OT settings)
    kernels: dict | None = None


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied weights once); ZeRO-3 partitioned ones by their full size."""
    return sum(full_numel(p) for p in model.parameters()
               if p.requires_grad or not trainable_only)


def build_random(config: PretrainedConfig, device: torch.device | str | None, dtype: torch.dtype,
                 seed: int) -> nn.Module:
    """A randomly initialised model of `config`, created directly on `device` (no CPU copy first).

    `device=None` leaves placement to whoever is in charge (DeepSpeed's zero.Init under ZeRO-3).
    """
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)


def meta_model(config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _materialise_emulator(config: PretrainedConfig, layout_spec: str, device, dtype, seed: int):
    from offsite_ds.emulator import build_emulator
    from offsite_ds.families import depth_of
    from offsite_ds.sandwich import Layout

    full = meta_model(config)
    layout = Layout.parse(layout_spec, depth_of(full))
    selected, block_map = build_emulator(full, layout)
    base_params = count_params(full)
    model = build_random(selected.config, device, dtype, seed)
    expected = {k: tuple(v.shape) for k, v in selected.state_dict().items()}
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != built:
        diff = sorted(set(expected.items()) ^ set(built.items()))[:3]
        raise RuntimeError(f"the emulator built from its config differs from build_emulator's selection: {diff}")
    return model, layout, block_map, base_params


def load_kernel_patch():
    """`offsite_ds.kernels.patch`, or SettingSkipped saying why it is unavailable."""
    try:
        from offsite_ds.kernels import patch
    except ImportError as exc:
        raise SettingSkipped(f"offsite_ds.kernels.patch is not available in this checkout ({exc})")
    return patch


def kernel_report(handle) -> dict:
    """What the kernel patch did, in JSON: its summary line, kernels by count, what it left alone and why."""
    import json

    out: dict = {"patched": True}
    summary = getattr(handle, "summary", None)
    if callable(summary):
        out["summary"] = str(summary())
    swapped = getattr(handle, "swapped", None)
    if isinstance(swapped, dict):
        counts: dict[str, int] = {}
        for kernel in swapped.values():
            counts[str(kernel)] = counts.get(str(kernel), 0) + 1
        out["swapped"] = counts
    skipped = getattr(handle, "skipped", None)
    if isinstance(skipped, dict):
        out["left_unpatched"] = {str(k): str(v) for k, v in skipped.items()}
    attention = getattr(handle, "attention", None)
    if attention is not None:
        out["attention"] = str(attention)
    if len(out) == 1 and handle is not None:
        try:
            out["result"] = json.loads(json.dumps(handle))
        except (TypeError, ValueError):
            out["result"] = repr(handle)[:300]
    return out


def prepare(setting: Setting, config: PretrainedConfig, layout: str | None, device: torch.device | str | None,
            dtype: torch.dtype, lora: LoraSettings | None = None, seed: int = 0) -> Prepared:
    """Build the model for `setting` and freeze what the setting freezes (the toolkit's `apply_mode`)."""
    from offsite_ds.families import depth_of
    from offsite_ds.peft_modes import apply_mode

    patch = load_kernel_patch() if setting.kernels else None  # skip before spending time on a model
    block_map = None
    if setting.emulator:
        if layout is None:
            raise OffsiteError(f"setting {setting.name} needs a layout: pass --layout L-K-R")
        model, parsed, block_map, base_params = _materialise_emulator(config, layout, device, dtype, seed)
        positions = parsed.adapter_positions
    else:
        model = build_random(config, device, dtype, seed)
        base_params = count_params(model)
        positions = list(range(depth_of(model)))
    if setting.mode == "all":
        model.requires_grad_(True)
    else:
        apply_mode(model, positions, setting.mode, lora if setting.mode == "lora" else None)
    plan = plan_from_model(model)
    kernels = None
    if patch is not None:
        try:
            kernels = kernel_report(patch(model))
        except OffsiteError as exc:  # e.g. the kernels refuse this device: the setting cannot run here
            raise SettingSkipped(f"offsite_ds.kernels.patch refused: {exc}")
    return Prepared(model, base_params, count_params(model), count_params(model, trainable_only=True),
                    plan, block_map, kernels)
