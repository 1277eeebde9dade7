"""Swap the fused kernels into an HF causal LM (emulator or full model), and take them out again.

Where things are comes from the family table (`family_of`: head, final_norm, blocks, mlp_in, activation)
and from module types; nothing here branches on family names. Every swap is checked first: the kernel's
plain-torch reference is run against the module's own forward on a small probe input, and a module whose
maths differs (say an RMSNorm variant that scales by 1 + weight, or a head followed by logit soft-capping)
keeps its own forward and is listed in `skipped` with the reason. Swaps replace `forward` on the module
instance only, so parameters, buffers and state-dict names are untouched (saving and exporting are
unaffected) and `unpatch` restores the original exactly.

Call `patch` after the tuning mode is applied (LoRA modules must exist to be swapped). Whether a norm
or head is frozen is read at every call from `requires_grad`, not fixed at patch time.
"""
from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from offsite_ds.errors import OffsiteError
from offsite_ds.families import Family, family_of, get_path
from offsite_ds.kernels.bias_activation import ACTIVATIONS, linear_bias_activation, reference_bias_activation
from offsite_ds.kernels.layer_norm import layer_norm, reference_layer_norm, reference_rms_norm, rms_norm
from offsite_ds.kernels.linear_cross_entropy import (LIBRARIES, library_available, library_linear_cross_entropy,
                                                     linear_cross_entropy)
from offsite_ds.kernels.lora_linear import DEFAULT_GEMM, GEMMS, lora_linear
from offsite_ds.kernels.runtime import INTERPRETING

HANDLE_ATTR = "_offsite_kernels"
IGNORE_INDEX = -100
PARTS = ("loss", "norms", "mlp", "lora", "attention")
# "mlp" (fused bias + activation) moves as many bytes as eager's cuBLAS epilogue + activation; it is kept
# selectable but off by default until a GPU measurement (scripts/gpu_acceptance.sh) shows it faster.
DEFAULT_PARTS = ("loss", "norms", "lora", "attention")


@dataclass
class PatchHandle:
    """What `patch` swapped (module path -> kernel) and what it left alone (path -> reason)."""

    swapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    attention: str | None = None
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for kernel in self.swapped.values():
            counts[kernel] = counts.get(kernel, 0) + 1
        parts = [f"{n} x {k}" for k, n in sorted(counts.items())]
        if self.attention:
            parts.append(f"attention: {self.attention}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} left unpatched")
        return "; ".join(parts) or "nothing patched"

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


CHOICES = ("auto", "ours", "liger", "cce", "off", "on")  # "on": the older name of "ours"
# What `auto` picks on a GPU, first importable wins. Ours are not in it: no GPU measurement has shown them
# beating the library kernels yet (scripts/gpu_acceptance.sh measures both; put "ours" first once it does).
AUTO_ORDER = ("cce", "liger")


def kernels_enabled(choice: str) -> bool:
    """Whether `--kernels CHOICE` patches anything here. 'ours'/'on' refuse where no Triton kernel can run;
    'auto' is off without CUDA and never picks the interpreter (a debugging aid)."""
    return resolve_kernels(choice) != "off"


def resolve_kernels(choice: str) -> str:
    """`--kernels auto|ours|liger|cce|off` -> the implementation that runs here: ours, liger, cce or off."""
    if choice == "off":
        return "off"
    if choice in ("on", "ours"):
        if torch.cuda.is_available() or INTERPRETING:
            return "ours"
        why = ("TRITON_INTERPRET=1 was set after triton was imported"
               if os.environ.get("TRITON_INTERPRET") == "1" else "this machine has no CUDA GPU")
        raise OffsiteError(f"--kernels {choice}: the Triton kernels need a CUDA GPU and {why}; use --kernels auto or "
                           "off (or set TRITON_INTERPRET=1 before starting, for the slow CPU interpreter)")
    if choice in LIBRARIES:
        package = LIBRARIES[choice][0]
        if not torch.cuda.is_available():
            raise OffsiteError(f"--kernels {choice}: {package} runs on CUDA only and this machine has no CUDA GPU; "
                               "use --kernels auto or off")
        if not library_available(choice):
            raise OffsiteError(f"--kernels {choice}: {package} is not installed; pip install {package} "
                               "(or: pip install offsite-ds[baselines])")
        return choice
    if choice == "auto":
        if not torch.cuda.is_available() or INTERPRETING:
            return "off"
        return next((name for name in AUTO_ORDER if name == "ours" or library_available(name)), "off")
    raise OffsiteError(f"--kernels {choice}: choose {', '.join(c for c in CHOICES if c != 'on')}")


def kernels_for_training(choice: str, zero3: bool = False) -> str:
    """`tune --kernels CHOICE` resolved before any work: ours, liger, cce or off.

    ZeRO-3 partitions every weight outside its module's forward, and the fused loss and LoRA read the head
    and base weights from outside (the probes too): under ZeRO-3 an explicit choice is refused with one line
    and 'auto' is off (it says so).
    """
    impl = resolve_kernels(choice)
    if impl != "off" and zero3:
        if choice != "auto":
            raise OffsiteError(f"--kernels {choice} cannot run under ZeRO-3 (the fused loss/LoRA kernels read weights "
                               f"ZeRO-3 partitions); use --kernels off, or a ZeRO-2 config with --kernels {choice}")
        print("kernels: off under ZeRO-3 (the fused loss/LoRA kernels read partitioned weights)", flush=True)
        return "off"
    return impl


def patch_for_training(model: nn.Module, impl: str) -> PatchHandle | None:
    """Apply what `kernels_for_training` chose: ours = every default part of `patch`; liger/cce = that
    library's fused linear cross-entropy for the frozen-head loss, the rest eager; off = nothing (None)."""
    if impl == "off":
        return None
    return patch(model) if impl == "ours" else patch(model, ("loss",), loss_impl=impl)


# ---------------------------------------------------------------- probes: does the module do our maths?

def tolerance(dtype: torch.dtype) -> float:
    """The one tolerance table of a kernel against its fp32 reference (max error relative to the reference's
    scale): fp32 must agree closely; bf16/fp16 round every element, so their kernels get 3e-2."""
    return 1e-4 if dtype == torch.float32 else 3e-2


def _matches(expected: torch.Tensor, got: torch.Tensor) -> bool:
    if expected.shape != got.shape:
        return False
    expected, got = expected.float(), got.float()
    tol = tolerance(got.dtype if got.dtype != torch.float32 else expected.dtype)
    scale = max(1.0, float(expected.abs().max()))
    return bool(torch.isfinite(got).all()) and float((expected - got).abs().max()) <= tol * scale


class _eval_mode:
    """Probe without dropout: eval mode for the duration, every module's own flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: dict[nn.Module, bool] = {}

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.model.eval()
        return self

    def __exit__(self, *exc):
        for module, flag in self.flags.items():
            module.training = flag


def _param_ref(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _probe_input(module: nn.Module, width: int, rows: int = 3) -> torch.Tensor:
    ref = _param_ref(module)
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(rows, width, generator=gen).to(device=ref.device, dtype=ref.dtype)


# ---------------------------------------------------------------- instance-level forward swaps

def _swap_forward(handle: PatchHandle, module: nn.Module, new_forward: Callable) -> None:
    had = "forward" in module.__dict__
    previous = module.__dict__.get("forward")
    module.forward = types.MethodType(new_forward, module)

    def undo():
        if had:
            module.forward = previous
        else:
            module.__dict__.pop("forward", None)

    handle._undo.append(undo)


def _layer_norm_forward(self, x):
    return layer_norm(x, self.weight, self.bias, self.eps)


def _rms_norm_forward(self, x):
    return rms_norm(x, self.weight, self._offsite_eps)


def _identity_forward(self, x):
    return x


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    conv = _conv1d_type()
    return conv is not None and type(module) is conv


# ---------------------------------------------------------------- norms

def _rms_eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _patch_norms(model: nn.Module, family: Family, handle: PatchHandle) -> None:
    final_norm = get_path(model, family.final_norm)
    rms_type = None if final_norm is None or isinstance(final_norm, nn.LayerNorm) else type(final_norm)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            if len(module.normalized_shape) != 1 or not isinstance(module.weight, nn.Parameter):
                handle.skipped[name] = "LayerNorm without a 1-D affine: kept as is"
                continue
            x = _probe_input(module, module.normalized_shape[0])
            with torch.no_grad():
                same = _matches(module(x), reference_layer_norm(x, module.weight, module.bias, module.eps))
            if not same:
                handle.skipped[name] = "LayerNorm subclass computes something else (probe mismatch)"
                continue
            _swap_forward(handle, module, _layer_norm_forward)
            handle.swapped[name] = "layer_norm"
        elif rms_type is not None and type(module) is rms_type:
            eps, weight = _rms_eps(module), getattr(module, "weight", None)
            if eps is None or not isinstance(weight, nn.Parameter) or weight.dim() != 1:
                handle.skipped[name] = f"{rms_type.__name__} has no float eps / 1-D weight: kept as is"
                continue
            x = _probe_input(module, weight.shape[0])
            with torch.no_grad():
                same = _matches(module(x), reference_rms_norm(x, weight, eps))
            if not same:
                handle.skipped[name] = f"{rms_type.__name__} is not x*rsqrt(mean(x^2)+eps)*weight (probe mismatch)"
                continue
            module._offsite_eps = eps
            _swap_forward(handle, module, _rms_norm_forward)
            handle._undo.append(lambda m=module: m.__dict__.pop("_offsite_eps", None))
            handle.swapped[name] = "rms_norm"


# ---------------------------------------------------------------- MLP: bias + activation

def _find_activation(parent: nn.Module, fc: nn.Module, width: int, preferred: str) -> tuple[str, nn.Module, str] | None:
    """The parameterless child of `parent` that applies a supported activation (checked on a probe)."""
    kinds = [preferred] + [k for k in ACTIVATIONS if k != preferred] if preferred in ACTIVATIONS else list(ACTIVATIONS)
    z = _probe_input(fc, width) * 3
    for child_name, child in parent.named_children():
        if child is fc or any(True for _ in child.parameters()) or isinstance(child, nn.Dropout):
            continue
        try:
            with torch.no_grad():
                out = child(z)
        except Exception:  # noqa: BLE001 - a child that is not an activation simply does not match
            continue
        if not isinstance(out, torch.Tensor):
            continue
        for kind in kinds:
            if _matches(out, reference_bias_activation(z, None, kind)):
                return child_name, child, kind
    return None


def _make_mlp_in_forward(kind: str, weight_is_in_out: bool):
    def forward(self, x):
        return linear_bias_activation(x, self.weight, self.bias, kind, weight_is_in_out)
    return forward


def _patch_mlp(model: nn.Module, family: Family, handle: PatchHandle) -> None:
    blocks = get_path(model, family.blocks)
    if not family.mlp_in:
        handle.skipped[f"{family.blocks}.*.mlp"] = (f"{family.name} MLP is gated ({family.activation}); "
                                                    "no bias+activation kernel for it")
        return
    parent_path, _, _ = family.mlp_in.rpartition(".")
    for index, block in enumerate(blocks):
        where = f"{family.blocks}.{index}.{family.mlp_in}"
        fc = get_path(block, family.mlp_in)
        parent = get_path(block, parent_path) if parent_path else block
        plain = type(fc) is nn.Linear or _is_conv1d(fc)
        if fc is None or parent is None or not plain:
            handle.skipped[where] = f"{type(fc).__name__} is not a plain Linear/Conv1D (e.g. LoRA-wrapped): kept"
            continue
        if fc.bias is None:
            handle.skipped[where] = "no bias to fuse: kept"
            continue
        in_out = _is_conv1d(fc)
        width = fc.weight.shape[1] if in_out else fc.weight.shape[0]
        found = _find_activation(parent, fc, width, family.activation)
        if found is None:
            handle.skipped[where] = "no ReLU/GELU activation module found beside it (probe): kept"
            continue
        act_name, act, kind = found
        x = _probe_input(fc, fc.weight.shape[0] if in_out else fc.weight.shape[1])
        with torch.no_grad():
            same = _matches(act(fc(x)), reference_bias_activation(x @ fc.weight if in_out else F.linear(x, fc.weight),
                                                                  fc.bias, kind))
        if not same:
            handle.skipped[where] = "fc + activation do not compute act(xW + b) (probe mismatch): kept"
            continue
        _swap_forward(handle, fc, _make_mlp_in_forward(kind, in_out))
        _swap_forward(handle, act, _identity_forward)  # the activation now happens inside mlp_in
        handle.swapped[where] = f"linear+bias+{kind}"
        handle.swapped[f"{family.blocks}.{index}.{parent_path + '.' if parent_path else ''}{act_name}"] = \
            "identity (fused into mlp_in)"


# ---------------------------------------------------------------- LoRA

def _lora_layer_type() -> type | None:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    return LoraLinear


def _lora_fusable(module: nn.Module) -> str | None:
    """None when the fused forward can serve this PEFT LoRA layer now, else why not."""
    if module.disable_adapters or module.merged:
        return "adapters disabled or merged"
    if len(module.active_adapters) != 1:
        return "more than one active adapter"
    name = module.active_adapters[0]
    if name not in module.lora_A:
        return "active adapter has no LoRA weights here"
    if getattr(module, "use_dora", {}).get(name, False):
        return "DoRA"
    if getattr(module.lora_B[name], "bias", None) is not None:
        return "LoRA bias"
    base = module.base_layer
    if not (type(base) is nn.Linear or _is_conv1d(base)):
        return f"base layer {type(base).__name__} is not Linear/Conv1D"
    if _is_conv1d(base) != bool(getattr(module, "fan_in_fan_out", False)):
        return "fan_in_fan_out does not match the base layer's layout"
    return None


def _lora_forward(self, x, *args, **kwargs):
    if args or kwargs or _lora_fusable(self) is not None:
        return self._offsite_original_forward(x, *args, **kwargs)
    name = self.active_adapters[0]
    base = self.base_layer
    x_lora = self.lora_dropout[name](x)
    return lora_linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                       self.scaling[name], weight_is_in_out=_is_conv1d(base),
                       x_lora=None if x_lora is x else x_lora, gemm=self._offsite_lora_gemm)


def _patch_lora(model: nn.Module, handle: PatchHandle, gemm: str) -> None:
    lora_type = _lora_layer_type()
    if lora_type is None:
        return
    for name, module in model.named_modules():
        if not isinstance(module, lora_type):
            continue
        why = _lora_fusable(module)
        if why is not None:
            handle.skipped[name] = f"LoRA layer not fusable ({why}): kept"
            continue
        x = _probe_input(module.base_layer, module.lora_A[module.active_adapters[0]].weight.shape[1])
        module._offsite_original_forward = module.forward
        module._offsite_lora_gemm = gemm
        with torch.no_grad():
            expected = module(x)
            got = _lora_forward(module, x)  # the fused forward itself, reference backend on CPU
        if not _matches(expected, got):
            del module._offsite_original_forward, module._offsite_lora_gemm
            handle.skipped[name] = "LoRA layer computes something else (probe mismatch): kept"
            continue
        _swap_forward(handle, module, _lora_forward)
        handle._undo.append(lambda m=module: [m.__dict__.pop(k, None) for k in ("_offsite_original_forward",
                                                                                "_offsite_lora_gemm")])
        handle.swapped[name] = "lora_linear"


# ---------------------------------------------------------------- causal-LM loss through the frozen head

def _causal_lm_forward(self, input_ids=None, *args, **kwargs):
    """HF CausalLM forward; with labels and a frozen head, the loss comes from the fused kernel and
    `logits` is None (they are never materialised). Anything else goes to the original forward."""
    labels = kwargs.get("labels")
    head = self._offsite_head
    if (args or labels is None or kwargs.get("return_dict") is False or kwargs.get("logits_to_keep") not in (None, 0)
            or (torch.is_grad_enabled() and (head.weight.requires_grad
                                             or (head.bias is not None and head.bias.requires_grad)))):
        return self._offsite_original_forward(input_ids, *args, **kwargs)
    return fused_causal_lm_loss(self, head, input_ids, impl=self.__dict__.get("_offsite_loss_impl", "ours"), **kwargs)


def fused_causal_lm_loss(model: nn.Module, head: nn.Linear, input_ids=None, backend: str = "auto", impl: str = "ours",
                         **kwargs):
    """Run the base model, then the frozen-head linear cross-entropy (ours, or a library's) with HF's label
    shift."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    labels = kwargs.pop("labels")
    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    kwargs.pop("logits_to_keep", None)
    kwargs.pop("return_dict", None)
    outputs = model.base_model(input_ids=input_ids, return_dict=True, **kwargs)
    hidden = outputs[0]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    targets = shift_labels.to(hidden.device)
    reduction = "sum" if num_items is not None else "mean"
    if impl == "ours":
        loss = linear_cross_entropy(hidden, head.weight, targets, head.bias, IGNORE_INDEX, reduction, backend=backend)
    else:
        loss = library_linear_cross_entropy(impl, hidden, head.weight, targets, head.bias, IGNORE_INDEX, reduction)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=getattr(outputs, "past_key_values", None),
                                  hidden_states=getattr(outputs, "hidden_states", None),
                                  attentions=getattr(outputs, "attentions", None))


def _patch_loss(model: nn.Module, family: Family, handle: PatchHandle, impl: str = "ours") -> None:
    head = get_path(model, family.head)
    base = getattr(model, "base_model", None)
    where = family.head
    if type(head) is not nn.Linear or base is None or base is model:
        handle.skipped[where] = f"head {type(head).__name__} is not a plain Linear under a base model: loss kept"
        return
    if impl == "cce" and head.bias is not None:
        handle.skipped[where] = "Cut Cross-Entropy has no head bias: loss kept"
        return
    vocab = head.weight.shape[0]
    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, min(vocab, 256), (1, 8), generator=gen).to(head.weight.device)
    with torch.no_grad(), _eval_mode(model):
        expected = model(input_ids=ids, labels=ids).loss
        got = fused_causal_lm_loss(model, head, ids, backend="reference", labels=ids).loss
    if expected is None or not _matches(expected.reshape(1), got.reshape(1)):
        handle.skipped[where] = ("the model's loss is not cross-entropy of the head's logits "
                                 "(e.g. logit scaling or soft-capping; probe mismatch): loss kept")
        return
    model.__dict__["_offsite_head"] = head  # plain attribute: assigning a Module would register it (state dict)
    model.__dict__["_offsite_loss_impl"] = impl
    model._offsite_original_forward = model.forward
    _swap_forward(handle, model, _causal_lm_forward)
    handle._undo.append(lambda: [model.__dict__.pop(k, None)
                                 for k in ("_offsite_head", "_offsite_original_forward", "_offsite_loss_impl")])
    handle.swapped["<causal-lm loss>"] = ("linear_cross_entropy (frozen head)" if impl == "ours"
                                          else f"{LIBRARIES[impl][0]} linear cross-entropy (frozen head)")


# ---------------------------------------------------------------- entry points

def patch(model: nn.Module, parts: tuple[str, ...] | list[str] = DEFAULT_PARTS,
          lora_gemm: str = DEFAULT_GEMM, loss_impl: str = "ours") -> PatchHandle:
    """Swap the kernels into `model` (in place) and return what was done; `unpatch(model)` reverts.

    lora_gemm: "cublas" (cuBLAS + addmm_, the default) or "triton" (the fused GEMM; see lora_linear.py).
    loss_impl: whose fused frozen-head linear cross-entropy the loss runs: "ours", "liger" or "cce".
    Patching twice re-patches from scratch (picking up LoRA layers added since).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise OffsiteError(f"unknown kernel part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    if lora_gemm not in GEMMS:
        raise OffsiteError(f"lora_gemm '{lora_gemm}': choose {' or '.join(GEMMS)}")
    if loss_impl not in ("ours", *LIBRARIES):
        raise OffsiteError(f"loss_impl '{loss_impl}': choose ours, {', '.join(LIBRARIES)}")
    unpatch(model)
    family = family_of(model)
    handle = PatchHandle()
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        handle.skipped["<model>"] = ("ZeRO-3 partitioned parameters: the probes cannot read them and the fused "
                                     "loss/LoRA read weights outside their modules; kernels not applied")
    else:
        if "norms" in parts:
            _patch_norms(model, family, handle)
        if "mlp" in parts:
            _patch_mlp(model, family, handle)
        if "lora" in parts:
            _patch_lora(model, handle, lora_gemm)
        if "loss" in parts:
            _patch_loss(model, family, handle, loss_impl)
    if "attention" in parts:
        from offsite_ds.attention import use_fast_attention

        attention = use_fast_attention(model)
        handle.attention = attention.chosen
        handle._undo.insert(0, attention.undo)  # undone last, after every forward swap
    model.__dict__[HANDLE_ATTR] = handle
    return handle


def unpatch(model: nn.Module) -> bool:
    """Restore every forward `patch` swapped; False when the model was not patched."""
    handle = model.__dict__.pop(HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.undo()
    return True


def patched(model: nn.Module) -> PatchHandle | None:
    return model.__dict__.get(HANDLE_ATTR)


__all__ = ["AUTO_ORDER", "CHOICES", "DEFAULT_PARTS", "PARTS", "PatchHandle", "fused_causal_lm_loss",
           "kernels_enabled", "kernels_for_training", "patch", "patch_for_training", "patched", "resolve_kernels",
           "unpatch"]
