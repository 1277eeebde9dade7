"""Memory estimates per GPU and per node for each role, before a job is launched, and what would make it fit.

Parameter counts are exact: the model is built on the meta device from its config (no weights, no
download). Model-state bytes (weights, gradients, Adam states) follow DeepSpeed's own estimators
(`estimate_zero3_model_states_mem_needs`, `estimate_zero2_model_states_mem_needs`, bf16 mixed
precision: 2 bytes per weight, 16 per trainable weight for gradients and fp32 master + Adam moments),
generalised to partly frozen models: frozen weights cost only their 2 bytes. For a model with every
weight trainable (FT) they equal DeepSpeed's figures exactly. Activations follow Korthikanti et al.
(2022): 34*s*b*h bytes per block in bf16, plus 5*a*s^2*b when attention materialises its scores (eager
attention, e.g. BLOOM's ALiBi), 2*s*b*h per block with gradient checkpointing (plus one block
recomputed), nothing kept for blocks run without gradients; logits cost 10 bytes per vocabulary entry
per token (bf16 logits, fp32 upcast and its gradient). These are estimates: allocator fragmentation,
CUDA context and communication buffers are covered by a fixed overhead and a headroom factor.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

from offsite_ds.errors import OffsiteError
from offsite_ds.manifests import LoraSettings
from offsite_ds.paper_models import PAPER_MODELS, paper_config, paper_layout, read_model_config
from offsite_ds.sandwich import Layout

GiB = 1 << 30
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor for CPU memory
RUNTIME_OVERHEAD = 1.5 * GiB  # CUDA context, NCCL and allocator reserve per GPU (assumed, not measured)
ROLES = ("distill", "ft", "ft-lora", "tune")
LORA_R = LoraSettings().r  # the rank planned for when none is given: tune's and finetune's default

KNOWN_MODELS = PAPER_MODELS  # the paper's models: plan for them by name, no download


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about a model, counted exactly from a meta-device instance."""

    name: str
    family: str
    n_layers: int
    hidden: int
    heads: int
    vocab: int
    total_params: int  # shared (tied) weights once
    block_params: int  # one transformer block
    largest_layer_params: int  # largest single module, as DeepSpeed's estimator counts it
    lora_params_per_block: dict = field(default_factory=dict)  # LoRA rank 1 params per block, by target set
    eager_attention: bool = False
    default_layout: str | None = None

    @property
    def outer_params(self) -> int:
        """Embeddings, final norm, head: everything outside the blocks."""
        return self.total_params - self.n_layers * self.block_params


def _config_from(spec: str):
    return paper_config(spec) if spec in PAPER_MODELS else read_model_config(spec, PAPER_MODELS)


@lru_cache(maxsize=16)
def model_shape(spec: str) -> ModelShape:
    """Count a model's parameters from its config on the meta device (instant, no memory, no download)."""
    import torch
    from transformers import AutoModelForCausalLM

    from offsite_ds.families import blocks_of, supported_build

    config = _config_from(spec)
    with torch.device("meta"):
        model, family = supported_build(lambda: AutoModelForCausalLM.from_config(config))
    blocks = blocks_of(model)
    total = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    lora: dict[str, int] = {}  # leaf module name (what LoRA targets name) -> in + out features
    for name, module in blocks[0].named_modules():
        weight = getattr(module, "weight", None)
        if name and weight is not None and weight.dim() == 2:
            leaf = name.rsplit(".", 1)[-1]
            lora[leaf] = lora.get(leaf, 0) + int(sum(weight.shape))
    attn = getattr(model.config, "_attn_implementation", "eager")
    return ModelShape(
        name=spec, family=family.name, n_layers=len(blocks), hidden=int(model.config.hidden_size),
        heads=int(model.config.num_attention_heads), vocab=int(model.config.vocab_size), total_params=total,
        block_params=sum(p.numel() for p in blocks[0].parameters()), largest_layer_params=largest,
        lora_params_per_block=lora, eager_attention=attn == "eager",
        default_layout=paper_layout(spec))


# ------------------------------------------------------------------------------------ model states

@dataclass(frozen=True)
class Setup:
    gpus_per_node: int
    nodes: int = 1
    zero: int = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    gradient_checkpointing: bool = False
    micro_batch: int = 8
    seq_len: int = 512

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        offload = ("optimizer+params" if self.offload_params else "optimizer") if self.offload_optimizer else None
        parts = [f"ZeRO-{self.zero}", f"offload {offload}" if offload else "no offload",
                 "grad checkpointing" if self.gradient_checkpointing else "no grad checkpointing",
                 f"micro-batch {self.micro_batch} x {self.seq_len} tokens",
                 f"{self.nodes} node(s) x {self.gpus_per_node} GPU(s)"]
        return ", ".join(parts)


def model_state_bytes(params: int, trainable: int, largest_layer: int, setup: Setup) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for weights, gradients and optimizer states.

    DeepSpeed's estimator formulas with the 16 gradient+optimizer bytes charged to trainable weights only.
    """
    w, g, nodes = setup.world, setup.gpus_per_node, setup.nodes
    if setup.offload_params and (setup.zero < 3 or not setup.offload_optimizer):
        raise OffsiteError("parameter offload needs ZeRO-3 with optimizer offload")
    if setup.zero == 3:
        largest = 4 * largest_layer
        if setup.offload_optimizer and setup.offload_params:
            return largest, int((2 * params + 16 * trainable) / nodes * BUFFER_FACTOR)
        if setup.offload_optimizer:
            return largest + int(2 * params / w), int(16 * trainable / nodes * BUFFER_FACTOR)
        return largest + int((2 * params + 16 * trainable) / w), int(largest_layer * 4 * g * BUFFER_FACTOR)
    if setup.zero in (1, 2):
        if setup.offload_optimizer:
            return 2 * params, int(max(4 * params * w, 16 * trainable) * BUFFER_FACTOR)
        return 2 * params + int(18 * trainable / w), int(params * 4 * g * BUFFER_FACTOR)
    if setup.zero == 0:
        if setup.offload_optimizer:
            raise OffsiteError("offload needs ZeRO stage 2 or 3")
        return 2 * params + 18 * trainable, int(params * 4 * g * BUFFER_FACTOR)
    raise OffsiteError(f"ZeRO stage {setup.zero} must be 0, 1, 2 or 3")


# ------------------------------------------------------------------------------------- activations

def block_activation_bytes(shape: ModelShape, setup: Setup) -> int:
    """One block's saved activations for backward, bf16 (Korthikanti et al. 2022)."""
    s, b, h, a = setup.seq_len, setup.micro_batch, shape.hidden, shape.heads
    scores = 5 * a * s * s * b if shape.eager_attention else 0
    return 34 * s * b * h + scores


def activation_bytes(shape: ModelShape, setup: Setup, backward_blocks: int, no_grad_blocks: int) -> int:
    """Blocks that gradients cross keep activations; no-grad blocks need one block's worth, transiently."""
    full = block_activation_bytes(shape, setup)
    if setup.gradient_checkpointing:
        kept = backward_blocks * 2 * setup.seq_len * setup.micro_batch * shape.hidden + full
    else:
        kept = backward_blocks * full
    transient = full if no_grad_blocks else 0
    logits = 10 * setup.micro_batch * setup.seq_len * shape.vocab
    return max(kept, transient) + logits


# ------------------------------------------------------------------------------------------- roles

@dataclass
class RoleEstimate:
    role: str
    params: int
    trainable: int
    gpu_model_states: int
    gpu_activations: int
    cpu_per_node: int
    setup: Setup

    @property
    def gpu_total(self) -> int:
        return self.gpu_model_states + self.gpu_activations + int(RUNTIME_OVERHEAD)

    def fits(self, gpu_bytes: float, cpu_bytes: float, headroom: float = 0.1) -> bool:
        return self.gpu_total * (1 + headroom) <= gpu_bytes and self.cpu_per_node <= cpu_bytes

    def as_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "setup"}, "gpu_total": self.gpu_total,
                "setup": asdict(self.setup)}


def role_counts(shape: ModelShape, role: str, layout: Layout, lora_r: int = LORA_R,
                lora_targets: tuple[str, ...] | None = None) -> tuple[int, int, int, int]:
    """(resident params, trainable params, blocks gradients cross, blocks run without gradients)."""
    n, blk, outer = shape.n_layers, shape.block_params, shape.outer_params
    emulator = outer + layout.depth * blk
    middle = n - layout.bottom - layout.top
    if role == "distill":  # emulator + teacher middle; student trains; bottom blocks and teacher run no-grad
        return emulator + middle * blk, layout.kept * blk, layout.kept + layout.top, layout.bottom + middle
    if role == "ft":
        return shape.total_params, shape.total_params, n, 0
    if role == "ft-lora":
        from offsite_ds.families import family_by_name

        targets = lora_targets or family_by_name(shape.family).lora_targets
        missing = [t for t in targets if t not in shape.lora_params_per_block]
        if missing:
            raise OffsiteError(f"LoRA target '{missing[0]}' is not a linear layer of a {shape.family} block")
        lora = n * lora_r * sum(shape.lora_params_per_block[t] for t in targets)
        return shape.total_params + lora, lora, n, 0
    if role == "tune":  # data owner: adapter blocks train, gradients cross the whole emulator
        return emulator, (layout.bottom + layout.top) * blk, layout.depth, 0
    raise OffsiteError(f"unknown role '{role}'; choose from {', '.join(ROLES)}")


def estimate(shape: ModelShape, role: str, setup: Setup, layout: Layout, lora_r: int = LORA_R) -> RoleEstimate:
    params, trainable, backward_blocks, no_grad_blocks = role_counts(shape, role, layout, lora_r)
    gpu_states, cpu = model_state_bytes(params, trainable, shape.largest_layer_params, setup)
    acts = activation_bytes(shape, setup, backward_blocks, no_grad_blocks)
    return RoleEstimate(role, params, trainable, gpu_states, acts, cpu, setup)


def candidate_setups(base: Setup) -> list[Setup]:
    """Cheapest first: less offload and recomputation before more; then smaller micro-batches."""
    options = []
    for micro in sorted({base.micro_batch, *(m for m in (4, 2, 1) if m < base.micro_batch)}, reverse=True):
        for zero, opt, par, ckpt in ((2, False, False, False), (3, False, False, False), (3, False, False, True),
                                     (3, True, False, True), (3, True, True, True)):
            options.append(Setup(base.gpus_per_node, base.nodes, zero, opt, par, ckpt, micro, base.seq_len))
    return options


def suggestion(shape: ModelShape, role: str, base: Setup, layout: Layout, gpu_bytes: float, cpu_bytes: float,
               lora_r: int = LORA_R) -> str:
    """What would make `role` fit: the cheapest setting on this allocation, or how many nodes are needed."""
    for setup in candidate_setups(base):
        if estimate(shape, role, setup, layout, lora_r).fits(gpu_bytes, cpu_bytes):
            accum = max(1, math.ceil(base.micro_batch / setup.micro_batch))
            extra = f" (grad-accum x{accum} keeps the batch)" if accum > 1 else ""
            return f"fits with {setup.describe()}{extra}"
    for nodes in (2, 4, 8, 16, 32, 64):
        if nodes <= base.nodes:
            continue
        for setup in candidate_setups(Setup(base.gpus_per_node, nodes, micro_batch=base.micro_batch,
                                            seq_len=base.seq_len)):
            if estimate(shape, role, setup, layout, lora_r).fits(gpu_bytes, cpu_bytes):
                return f"needs {nodes} nodes: {setup.describe()}"
    return "does not fit on up to 64 nodes of this kind; use larger GPUs, or shorter sequences"


def plan(spec: str, setup: Setup, layout_spec: str | None = None, roles: tuple[str, ...] = ROLES,
         gpu_gib: float = 80.0, cpu_gib: float = 512.0, lora_r: int = LORA_R) -> dict:
    """Estimates for every role on `setup`, with a fit verdict and a suggestion when one does not fit."""
    if setup.gpus_per_node < 1 or setup.nodes < 1:
        raise OffsiteError("--gpus and --nodes must be >= 1")
    shape = model_shape(spec)
    layout_spec = layout_spec or shape.default_layout or f"2-{max(1, (shape.n_layers - 4) // 2)}-2"
    layout = Layout.parse(layout_spec, shape.n_layers)
    gpu_bytes, cpu_bytes = gpu_gib * GiB, cpu_gib * GiB
    rows = []
    for role in roles:
        est = estimate(shape, role, setup, layout, lora_r)
        fits = est.fits(gpu_bytes, cpu_bytes)
        rows.append({**est.as_dict(), "fits": fits,
                     "suggestion": None if fits else suggestion(shape, role, setup, layout, gpu_bytes, cpu_bytes,
                                                                lora_r)})
    return {"model": spec, "shape": asdict(shape), "layout": str(layout), "setup": asdict(setup),
            "gpu_gib": gpu_gib, "cpu_gib": cpu_gib, "roles": rows}


def format_plan(result: dict) -> str:
    shape, setup = result["shape"], Setup(**result["setup"])
    lines = [f"{result['model']}: {shape['family']}, {shape['n_layers']} blocks, hidden {shape['hidden']}, "
             f"{shape['total_params'] / 1e9:.2f}B params; layout {result['layout']}",
             f"setup: {setup.describe()}; budget {result['gpu_gib']:g} GiB per GPU, {result['cpu_gib']:g} GiB CPU "
             "per node (bf16 mixed precision, AdamW)",
             f"{'role':<8} {'params':>8} {'trainable':>10} {'states/GPU':>11} {'activ/GPU':>10} {'total/GPU':>10} "
             f"{'CPU/node':>9}  fits"]
    for r in result["roles"]:
        lines.append(f"{r['role']:<8} {r['params'] / 1e9:>7.2f}B {r['trainable'] / 1e6:>9.1f}M "
                     f"{r['gpu_model_states'] / GiB:>10.1f}G {r['gpu_activations'] / GiB:>9.1f}G "
                     f"{r['gpu_total'] / GiB:>9.1f}G {r['cpu_per_node'] / GiB:>8.1f}G  "
                     f"{'yes' if r['fits'] else 'NO'}")
    for r in result["roles"]:
        if r["suggestion"]:
            lines.append(f"  {r['role']}: {r['suggestion']}")
    lines.append(f"(total/GPU includes {RUNTIME_OVERHEAD / GiB:g} GiB assumed runtime overhead; 'fits' keeps 10% "
                 "headroom. Estimates, not measurements.)")
    return "\n".join(lines)
