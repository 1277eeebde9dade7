"""Tuning modes applied to the adapter blocks only: full, LoRA (PEFT), Houlsby bottleneck adapters, BitFit.

The same `apply_mode` runs on the data owner's emulator (at emulator positions) and on the owner's full
model (at original indices) during plug-in, so both sides derive the trainable tensors' names, shapes
and dtypes from one piece of code; the package is validated against exactly that.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn
from pydantic import ValidationError

from offsite_ds.errors import OffsiteError, UnsupportedModelError
from offsite_ds.families import Family, fan_in_fan_out, family_of, get_path, out_features
from offsite_ds.manifests import DEFAULT_BOTTLENECK, MODES, SETTINGS, LoraSettings, ModeSettings, describe_error

LORA_ADAPTER_NAME = "default"


class BottleneckAdapter(nn.Module):
    """Houlsby adapter: h + up(gelu(down(h))), with `up` zero-initialised so it starts as the identity."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=1e-3)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(torch.nn.functional.gelu(self.down(h)))


def _adapter_hook(module: nn.Module, _inputs, output):
    """Forward hook that routes a sub-layer's output projection through its bottleneck adapter."""
    if isinstance(output, tuple):
        return (module.bottleneck_adapter(output[0]),) + output[1:]
    return module.bottleneck_adapter(output)


def insert_bottleneck_adapters(model: nn.Module, positions: list[int], bottleneck: int) -> None:
    """Attach an adapter after the attention and MLP output projections of each listed block (Houlsby)."""
    family = family_of(model)
    blocks = get_path(model, family.blocks)
    for pos in positions:
        for path in (family.attn_out, family.mlp_out):
            proj = get_path(blocks[pos], path)
            if proj is None:
                raise OffsiteError(f"block {pos} has no '{path}' for a bottleneck adapter (family {family.name}; an "
                                   "MoE block has no single MLP output layer): use --mode full or lora")
            if hasattr(proj, "bottleneck_adapter"):
                continue
            ref = next(proj.parameters())
            try:
                width = out_features(proj)
            except UnsupportedModelError:
                raise OffsiteError(f"cannot attach a bottleneck adapter to {type(proj).__name__}")
            proj.bottleneck_adapter = BottleneckAdapter(width, bottleneck).to(ref.device, ref.dtype)
            proj.register_forward_hook(_adapter_hook)


def lora_config(model: nn.Module, positions: list[int], settings: LoraSettings, task_type: str | None = None):
    """The one PEFT LoraConfig for resolved LoRA `settings` on blocks `positions` of `model`.

    Used to inject LoRA for training and to write the PEFT export, so both describe the same adapter. The blocks
    are named by `layers_to_transform`, not by a regex over module paths: under transformers 5, PEFT rewrites a
    regex into bare leaf names for MoE models (Mixtral), which put LoRA into every block.
    """
    from peft import LoraConfig

    family = family_of(model)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.targets or family.lora_targets),
                      layers_to_transform=sorted(positions), layers_pattern=family.blocks.rpartition(".")[2],
                      fan_in_fan_out=fan_in_fan_out(model), bias="none", task_type=task_type)


def settings_for(mode: str, **values) -> ModeSettings:
    """The typed settings of `mode` from keyword values (None: the default), one line on a bad one.

    How the commands build what `apply_mode` takes from their flags, checked with the manifests' own schema.
    """
    if mode not in MODES:
        raise OffsiteError(f"unknown tuning mode '{mode}'; choose one of {', '.join(MODES)}")
    given = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v is not None}
    unknown = set(given) - set(SETTINGS[mode].model_fields)
    if unknown:
        raise OffsiteError(f"mode '{mode}' has no setting(s) {', '.join(sorted(unknown))}")
    try:
        return SETTINGS[mode].model_validate(given)
    except ValidationError as exc:
        raise OffsiteError(f"mode '{mode}' setting {describe_error(exc)}")


def check_bottleneck(bottleneck: int, hidden: int, what: str = "--bottleneck") -> None:
    """The one bound on a Houlsby bottleneck, for a tuning request and a received package alike: at most the
    hidden size it projects down from (wider would add parameters without narrowing anything)."""
    if bottleneck > hidden:
        raise OffsiteError(f"{what} {bottleneck} exceeds the hidden size {hidden}; a bottleneck is at most the "
                           "hidden size")


def apply_mode(model: nn.Module, positions: list[int], mode: str = "full",
               settings: ModeSettings | None = None) -> ModeSettings:
    """Freeze everything, then make the `mode`'s parameters inside blocks `positions` trainable.

    Returns the settings resolved against the model (LoRA's targets, the bottleneck's width): what the
    AdapterPackage records. Embeddings, head and final norm always stay frozen; so does every block not listed.
    """
    if mode not in MODES:
        raise OffsiteError(f"unknown tuning mode '{mode}'; choose one of {', '.join(MODES)}")
    settings = SETTINGS[mode]() if settings is None else settings
    if not isinstance(settings, SETTINGS[mode]):
        raise OffsiteError(f"mode '{mode}' takes {SETTINGS[mode].__name__}, not {type(settings).__name__}")
    family = family_of(model)
    blocks = get_path(model, family.blocks)
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "full":
        for pos in positions:
            blocks[pos].requires_grad_(True)
    elif mode == "bitfit":
        found = False
        for pos in positions:
            for name, p in blocks[pos].named_parameters():
                if name.endswith("bias"):
                    p.requires_grad_(True)
                    found = True
        if not found:
            raise OffsiteError(f"BitFit trains biases, but {family.name} blocks have none; use --mode lora or adapter")
    elif mode == "adapter":
        hidden = out_features(get_path(blocks[positions[0]], family.attn_out)) if positions else DEFAULT_BOTTLENECK
        settings = settings.model_copy(update={"bottleneck": settings.bottleneck or min(DEFAULT_BOTTLENECK, hidden)})
        check_bottleneck(settings.bottleneck, hidden)
        insert_bottleneck_adapters(model, positions, settings.bottleneck)
        for pos in positions:
            for name, p in blocks[pos].named_parameters():
                if ".bottleneck_adapter." in f".{name}":
                    p.requires_grad_(True)
    elif mode == "lora":
        from peft import inject_adapter_in_model

        targets = list(settings.targets or family.lora_targets)
        settings = settings.model_copy(update={"targets": targets})
        config = lora_config(model, positions, settings)
        try:
            inject_adapter_in_model(config, model, adapter_name=LORA_ADAPTER_NAME)
        except ValueError as exc:
            raise OffsiteError(f"LoRA targets {targets} not found in the adapter blocks ({str(exc).splitlines()[0]}); "
                               f"pass --lora-targets with module names of a {family.name} block")
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
    return settings


def canonical_name(name: str) -> str:
    """Parameter name without PEFT's adapter-name infix, e.g. 'q_proj.lora_A.default.weight' -> 'q_proj.lora_A.weight'."""
    return name.replace(f".{LORA_ADAPTER_NAME}.", ".")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors under canonical names (what an AdapterPackage carries)."""
    return {canonical_name(n): p.detach() for n, p in model.named_parameters() if p.requires_grad}


def rename_blocks(names_to_tensors: dict[str, torch.Tensor], family: Family, index_map: dict[int, int]) -> dict:
    """Rename '<blocks>.<i>.' prefixes through index_map (emulator position <-> original index)."""
    prefix = re.compile(rf"^{re.escape(family.blocks)}\.(\d+)\.")
    out = {}
    for name, tensor in names_to_tensors.items():
        m = prefix.match(name)
        if m is None:
            raise OffsiteError(f"trainable tensor '{name}' is outside the adapter blocks; this is a bug in the mode")
        out[f"{family.blocks}.{index_map[int(m.group(1))]}.{name[m.end():]}"] = tensor
    return out


def lora_layers(model: nn.Module) -> dict[str, tuple[float, bool]]:
    """Module name -> (scaling, fan_in_fan_out) of every LoRA-wrapped layer."""
    from peft.tuners.lora import LoraLayer

    return {name: (float(m.scaling[LORA_ADAPTER_NAME]), bool(getattr(m, "fan_in_fan_out", False)))
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@torch.no_grad()
def merge_lora_state(state: dict[str, torch.Tensor], layers: dict[str, tuple[float, bool]]) -> dict[str, torch.Tensor]:
    """Fold LoRA into a gathered state dict: W + scaling * B @ A, plain module names, no LoRA tensors.

    Works on the state dict rather than the live modules, so a sharded model needs no in-place merge.
    """
    merged = dict(state)
    for name, (scaling, fan_in_fan_out) in layers.items():
        base = merged.pop(f"{name}.base_layer.weight")
        a = merged.pop(f"{name}.lora_A.{LORA_ADAPTER_NAME}.weight").float()
        b = merged.pop(f"{name}.lora_B.{LORA_ADAPTER_NAME}.weight").float()
        delta = (b @ a) * scaling
        merged[f"{name}.weight"] = (base.float() + (delta.T if fan_in_fan_out else delta)).to(base.dtype)
        if not torch.isfinite(merged[f"{name}.weight"]).all():  # a package's LoRA tensors can overflow
            raise OffsiteError(f"merging LoRA into '{name}' gives non-finite weights: the LoRA tensors overflow; "
                               "refusing them")
        if f"{name}.base_layer.bias" in merged:
            merged[f"{name}.bias"] = merged.pop(f"{name}.base_layer.bias")
    leftover = [k for k in merged if ".lora_" in k or ".base_layer." in k]
    if leftover:
        raise OffsiteError(f"LoRA tensor '{leftover[0]}' could not be merged; this is a bug in the export")
    return merged


@torch.no_grad()
def merge_lora_(model: nn.Module) -> None:
    """Fold LoRA into the live model's base weights and drop the LoRA wrappers (plain module names again).

    The same merge as an exported state dict gets (`merge_lora_state`), loaded into the unwrapped layers.
    """
    from offsite_ds.families import set_path

    layers = lora_layers(model)
    if not layers:
        return
    merged = merge_lora_state(model.state_dict(), layers)
    for name in layers:
        set_path(model, name, get_path(model, name).get_base_layer())
    model.load_state_dict(merged, strict=True)
