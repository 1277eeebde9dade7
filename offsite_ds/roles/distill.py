"""Owner's role: distil the emulator's kept middle blocks (student) against the full middle (teacher).

The recipe of the original code: the student and the frozen teacher both read the hidden states that
the bottom adapter blocks produce; the loss is `lm_weight * LM + kd_weight * KD`, LM being the
emulator's own causal-LM loss (through the student) and KD the MSE between the student's and the
teacher's outputs divided by the teacher's mean square (its RMS squared): scale-free across models.
Two options measured on SmolLM2 (see the README): `kd_norm="token"` divides each token's error by that
token's own teacher energy, so a few huge attention-sink activations cannot dominate the loss, and
`logit_weight` adds KL(teacher || student) of the next-token distributions, the teacher's logits being
the emulator's own top blocks and head run on the teacher middle's output (the full model's output).
Both head losses go through the head a chunk of rows at a time (evaluate.head_loss), so neither model's
logits are held whole: at BLOOM's 250k vocabulary each would be 8 GB of fp32 at 4 x 2048 tokens.

Under ZeRO-3 both the emulator and the full model are built sharded; only the full model's middle
blocks (the teacher) are kept, and the trained emulator is gathered on rank 0 only, to export a new
EmulatorBundle whose manifest records the distillation.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from offsite_ds.atomic import utc_stamp
from offsite_ds.bundle import check_bundle, save_bundle
from offsite_ds.data import load_blocks
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.evaluate import head_loss, logit_kl
from offsite_ds.manifests import BundleManifest, dump
from offsite_ds.families import backbone_and_head, block_prefix, family_of, get_path, logit_transform
from offsite_ds.roles.base import Role, owner_corpus
from offsite_ds.runtime import Runtime
from offsite_ds.surgery import block_output
from offsite_ds.train import TrainConfig, for_output, train
from offsite_ds.zero3 import enable_activation_checkpointing, gathered_state_dict, tensors_equal

DEFAULT_KD_WEIGHT = 30.0
DEFAULT_LM_WEIGHT = 1.0
BUNDLE_KEYS_REWRITTEN = ("format", "version", "files", "fingerprint")  # save_bundle writes these afresh


KD_NORMS = ("global", "token")


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
            norm: str = "global") -> torch.Tensor:
    """Normalised MSE over real tokens, in fp32: sum err^2 / sum teacher^2 ("global"), or the mean over
    tokens of each token's err^2 / teacher^2 ("token": every token counts alike, sinks included)."""
    s, t = student.float(), teacher.float()
    m = torch.ones(t.shape[:-1], dtype=t.dtype, device=t.device) if mask is None else mask.to(t.dtype)
    err, energy = (s - t).pow(2).sum(-1), t.pow(2).sum(-1)
    if norm == "token":
        return (err / energy.clamp_min(1e-12) * m).sum() / m.sum().clamp_min(1)
    return (err * m).sum() / (energy * m).sum().clamp_min(1e-12)


class DistillModel(nn.Module):
    """The emulator (student middle trainable) plus the frozen teacher middle; forward returns the losses.

    Hooks on the student's first and last block capture the input hidden states (with the mask,
    positions, ALiBi... arguments the model passes its blocks) and the student's output; the teacher
    blocks then run on exactly that input, with the same arguments, without gradients.
    """

    def __init__(self, emulator: nn.Module, teacher: nn.ModuleList, bottom: int, kept: int,
                 kd_weight: float = DEFAULT_KD_WEIGHT, lm_weight: float = DEFAULT_LM_WEIGHT, kd_norm: str = "global",
                 logit_weight: float = 0.0):
        super().__init__()
        self.emulator, self.teacher = emulator, teacher
        self.config = emulator.config  # the ds config's bucket sizes are filled from it
        self.kd_weight, self.lm_weight, self.logit_weight = float(kd_weight), float(lm_weight), float(logit_weight)
        self.kd_norm = kd_norm
        blocks = get_path(emulator, family_of(emulator).blocks)
        self._blocks_path, self._span = family_of(emulator).blocks, (bottom, kept)
        self._capture: dict | None = None
        self._replace: torch.Tensor | None = None
        blocks[bottom].register_forward_pre_hook(self._take_input, with_kwargs=True)
        blocks[bottom + kept - 1].register_forward_hook(self._take_output)

    @property
    def student(self) -> nn.ModuleList:
        """The emulator's kept middle blocks (not registered twice: ZeRO-3 hooks every module once)."""
        bottom, kept = self._span
        return get_path(self.emulator, self._blocks_path)[bottom:bottom + kept]

    def _take_input(self, _module, args, kwargs):
        if self._capture is not None and "args" not in self._capture:
            self._capture["args"], self._capture["kwargs"] = args, kwargs

    def _take_output(self, _module, _args, output):
        if self._replace is not None:  # the teacher pass: the rest of the emulator reads the teacher's output
            return (self._replace, *output[1:]) if isinstance(output, tuple) else self._replace
        if self._capture is not None:
            self._capture["output"] = block_output(output)
        return None

    @torch.no_grad()
    def _teacher_final(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       hidden: torch.Tensor) -> torch.Tensor:
        """The full model's final hidden states: the emulator's own outer parts run on the teacher middle's output."""
        self._replace = hidden
        try:
            return backbone_and_head(self.emulator)[0](input_ids=input_ids, attention_mask=attention_mask,
                                                       use_cache=False)[0]
        finally:
            self._replace = None

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the target must not carry dropout noise
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        backbone = backbone_and_head(self.emulator)[0]
        self._capture = {}
        try:
            final = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
            args, kwargs, student_out = self._capture["args"], self._capture["kwargs"], self._capture["output"]
        finally:
            self._capture = None
        with torch.no_grad():
            hidden = args[0].detach()
            for block in self.teacher:
                hidden = block_output(block(hidden, *args[1:], **kwargs))
        kd = kd_loss(student_out, hidden, attention_mask, self.kd_norm)
        teacher_final = self._teacher_final(input_ids, attention_mask, hidden) if self.logit_weight > 0 else None
        head_losses, parts = self._head_losses(final, input_ids if labels is None else labels, attention_mask,
                                               teacher_final)
        loss = head_losses + self.kd_weight * kd
        losses = {"lm_loss": parts["lm_loss"], "kd_loss": kd.detach()}
        if teacher_final is not None:
            losses["logit_kl"] = parts["logit_kl"]
        return {"loss": loss, **losses}

    def _head_losses(self, final: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None,
                     teacher_final: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """lm_weight x the causal-LM loss (HF's: labels shifted, -100 ignored, the mean) + logit_weight x
        logit_kl against the teacher's final states (the mean over real tokens), in one pass through the head
        a chunk of rows at a time (evaluate.head_loss): neither model's logits are ever whole, which at BLOOM's
        vocabulary would be 8 GB of fp32 per tensor at 4 x 2048 tokens. Returns the weighted sum and both means."""
        targets = torch.full_like(labels, -100)
        targets[:, :-1] = labels[:, 1:]
        targets = targets.reshape(-1)
        mask = (torch.ones_like(labels) if attention_mask is None else attention_mask).reshape(-1).float()
        n_lm, n_kl = (targets != -100).sum().clamp_min(1), mask.sum().clamp_min(1)
        teacher = None if teacher_final is None else teacher_final.reshape(-1, teacher_final.shape[-1])
        parts = {"lm_loss": torch.zeros((), device=final.device), "logit_kl": torch.zeros((), device=final.device)}

        def chunk_loss(logits: torch.Tensor, rows: slice, logits_of) -> torch.Tensor:
            ce = F.cross_entropy(logits, targets[rows], reduction="sum")
            parts["lm_loss"] += ce.detach() / n_lm
            loss = ce * (self.lm_weight / n_lm)
            if teacher is not None:
                with torch.no_grad():
                    target = logits_of(teacher[rows])
                m = mask[rows]
                kl = logit_kl(logits, target, m) * m.sum()
                parts["logit_kl"] += kl.detach() / n_kl
                loss = loss + kl * (self.logit_weight / n_kl)
            return loss

        head = backbone_and_head(self.emulator)[1]
        return head_loss(final, head, chunk_loss, logit_transform(self.emulator.config)), parts


class Distill(Role):
    name = "distill"

    def __init__(self, model: DistillModel, source_manifest: BundleManifest, tokenizer, out_dir: str | Path,
                 settings: dict, eval_blocks: torch.Tensor | None = None, eval_batch_size: int = 4,
                 runtime: Runtime | None = None):
        super().__init__(model, runtime)
        self.source_manifest, self.tokenizer = source_manifest, tokenizer
        self.out_dir, self.settings = Path(out_dir), settings
        self.eval_blocks, self.eval_batch_size = eval_blocks, eval_batch_size

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.student.parameters() if p.requires_grad]

    def compute_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
        return out["loss"], {k: float(v) for k, v in out.items() if k != "loss"}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        """Held-out distillation loss (the objective itself), KD and LM, averaged over the eval blocks."""
        if self.eval_blocks is None:
            return None
        was_training = model.training
        model.eval()
        device = next(model.student.parameters()).device
        totals: dict[str, float] = {}
        n = 0
        for start in range(0, len(self.eval_blocks), self.eval_batch_size):
            ids = self.eval_blocks[start:start + self.eval_batch_size].to(device)
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
            for name, value in out.items():
                totals[name] = totals.get(name, 0.0) + float(value) * len(ids)
            n += len(ids)
        model.train(was_training)
        return {f"eval_{name}": total / n for name, total in totals.items()}

    def _mean_over_ranks(self, value: float | None) -> float | None:
        if value is None or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t) / torch.distributed.get_world_size()

    def export(self, model: nn.Module, summary: dict) -> None:
        """Gather the emulator (collective: every rank calls this) and write the new bundle on rank 0."""
        step_metrics = summary.get("final_metrics", {})  # this rank's means over the last optimizer step
        finals = {f"final_{name}": self._mean_over_ranks(step_metrics.get(name))
                  for name in dict.fromkeys(["kd_loss", "lm_loss", *step_metrics])}
        state = gathered_state_dict(model.emulator, to_rank=0)
        if not self.runtime.is_main:
            return
        manifest = {k: v for k, v in dump(self.source_manifest).items() if k not in BUNDLE_KEYS_REWRITTEN}
        compression = dict(manifest["compression"])
        previous = compression.get("distillation")
        compression.update(distilled=True, distillation={
            **{k: v for k, v in summary.items() if k in ("steps", "tokens", "final_loss", "wall_seconds")},
            **finals,
            **({"eval": summary["eval"]} if summary.get("eval") else {}),
            **self.settings,
            "source_bundle_fingerprint": self.source_manifest.fingerprint,
            "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
            "exported_at": utc_stamp(),
            **({"previous": previous} if previous else {}),
        })
        manifest["compression"] = compression
        save_bundle(_StateDictModel(model.emulator, state), self.tokenizer, manifest, self.out_dir)


class _StateDictModel:
    """Lets save_bundle write a (possibly sharded) model from its gathered state dict."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor]):
        self.model, self.state = model, state

    def save_pretrained(self, directory, **kwargs) -> None:
        self.model.save_pretrained(directory, state_dict=self.state, **kwargs)


def _check_same_model(emulator: nn.Module, full: nn.Module, manifest: BundleManifest, where: Path) -> None:
    """The bundle's embeddings, adapter blocks, norm and head must be the full model's own (value for value).

    That is what makes both student and teacher read the hidden states of the full model's bottom
    blocks; it also refuses a bundle made from another model. Works sharded (gathers pair by pair).
    """
    family = family_of(full)
    kept = set(range(len(manifest.block_map))) - set(manifest.adapter_positions)
    full_params = dict(full.named_parameters())
    pairs = []
    for name, param in emulator.named_parameters():
        target = name
        if name.startswith(family.blocks + "."):
            position = int(name[len(family.blocks) + 1:].split(".", 1)[0])
            if position in kept:
                continue
            target = block_prefix(family, manifest.block_map[position]) + name[len(block_prefix(family, position)):]
        if target not in full_params:
            raise ArtifactError(f"{where}: tensor '{name}' has no counterpart '{target}' in the full model; "
                                "distil with the model the bundle was made from")
        pairs.append((name, param, full_params[target]))
    differing = tensors_equal(pairs)
    if differing is not None:
        raise ArtifactError(f"{where}: '{differing}' differs from the full model's; the bundle was not made from "
                            "this model (distil with the model it was made from)")


def build_distill_model(model_dir: str | Path, bundle_dir: str | Path, manifest: BundleManifest,
                        runtime: Runtime | None, kd_weight: float, lm_weight: float,
                        gradient_checkpointing: bool = False, kd_norm: str = "global",
                        logit_weight: float = 0.0) -> DistillModel:
    """Load full model and emulator (sharded under ZeRO-3), keep the full middle as teacher, freeze all but the student."""
    runtime = runtime or Runtime()
    full = runtime.load_model(model_dir)
    family = family_of(full)
    blocks = get_path(full, family.blocks)
    if family.name != manifest.family or len(blocks) != manifest.base_depth:
        raise ArtifactError(f"{bundle_dir}: the bundle is for a {manifest.base_depth}-block {manifest.family} "
                            f"model, {model_dir} is a {len(blocks)}-block {family.name} model")
    emulator = runtime.load_model(bundle_dir)
    if len(get_path(emulator, family.blocks)) != len(manifest.block_map):
        raise ArtifactError(f"{bundle_dir}: the model has a different number of blocks than its block_map")
    bottom, kept, top = manifest.layout_spec.bottom, manifest.layout_spec.kept, manifest.layout_spec.top
    _check_same_model(emulator, full, manifest, Path(bundle_dir))
    teacher = nn.ModuleList(blocks[bottom:len(blocks) - top])
    del full, blocks  # the rest of the full model is not needed: the emulator has the same outer parts
    for p in emulator.parameters():
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = get_path(emulator, family.blocks)[bottom:bottom + kept]
    for p in student.parameters():
        p.requires_grad_(True)
    if gradient_checkpointing:
        enable_activation_checkpointing(emulator)
    return DistillModel(emulator, teacher, bottom, kept, kd_weight, lm_weight, kd_norm, logit_weight)


def distill(model_dir: str | Path, bundle_dir: str | Path, data: str | Path, out_dir: str | Path,
            cfg: TrainConfig | None = None, seq_len: int = 512, kd_weight: float = DEFAULT_KD_WEIGHT,
            lm_weight: float = DEFAULT_LM_WEIGHT, eval_data: str | Path | None = None, text_field: str = "text",
            max_train_blocks: int | None = None, max_eval_blocks: int | None = None,
            gradient_checkpointing: bool = False, kd_norm: str = "global", logit_weight: float = 0.0) -> dict:
    """Owner's `distill`: full model + layer-drop bundle + corpus -> a distilled EmulatorBundle at out_dir."""
    cfg = for_output(cfg or TrainConfig(), out_dir)
    weights = {"--kd-weight": kd_weight, "--lm-weight": lm_weight, "--logit-weight": logit_weight}
    if any(not math.isfinite(w) or w < 0 for w in weights.values()) or sum(weights.values()) == 0:
        raise OffsiteError(f"{', '.join(f'{k} {v:g}' for k, v in weights.items())}: each must be >= 0 and finite, "
                           "not all 0")
    if kd_norm not in KD_NORMS:
        raise OffsiteError(f"--kd-norm {kd_norm}: choose one of {', '.join(KD_NORMS)}")
    manifest = check_bundle(bundle_dir)  # validate the bundle before loading anything large
    if "share_map" in manifest:
        raise OffsiteError(f"{bundle_dir} is a shared (CRaSh) bundle; distillation trains distinct kept blocks: "
                           "distil an emulator built without --share")
    with Runtime.from_config(cfg) as runtime:
        tokenizer, loader, fingerprint = owner_corpus(runtime, cfg, model_dir, bundle_dir, data, seq_len, text_field,
                                                      max_train_blocks)
        eval_blocks = None
        if eval_data is not None:
            eval_blocks, _ = load_blocks(eval_data, tokenizer, seq_len, text_field, max_eval_blocks)
        model = build_distill_model(model_dir, bundle_dir, manifest, runtime, kd_weight, lm_weight,
                                    gradient_checkpointing, kd_norm, logit_weight)
        settings = {"kd_weight": kd_weight, "lm_weight": lm_weight, "kd_norm": kd_norm, "logit_weight": logit_weight,
                    "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                    "seq_len": seq_len, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                    "world_size": runtime.world, "data_fingerprint": fingerprint, "zero_stage": runtime.zero_stage}
        role = Distill(model, manifest, tokenizer, out_dir, settings, eval_blocks, runtime=runtime)
        return train(role, loader, cfg, runtime)
