"""Typed manifests: one strict schema per artifact (`offsite.json` of bundles, packages, plugged models).

The manifests cross the owner / data-owner boundary, so they are parsed strictly (pydantic v2 strict
mode): unknown fields, wrong types, bools where ints belong, non-finite floats, out-of-range numbers and
file names that could leave the artifact directory are refused with one line. Bounds that need the
model (LoRA rank vs. the target's width, bottleneck vs. hidden size, target names) are checked in
`offsite_ds.validate` against the model's config before anything is allocated. Code reads these typed
fields (`manifest.adapter_blocks`, `manifest.layout`, `manifest.mode_settings.r`), never raw dict keys.
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (BaseModel, ConfigDict, Field, JsonValue, ValidationError, field_validator, model_validator)

from offsite_ds.errors import ArtifactError, LayoutError, OffsiteError
from offsite_ds.families import Family, family_by_name
from offsite_ds.formats import TENSOR_DTYPE_NAMES, WEIGHT_DTYPE_NAMES
from offsite_ds.sandwich import SELECTIONS, Layout, adapter_indices

MANIFEST = "offsite.json"
BUNDLE_FORMAT = "offsite-ds.emulator-bundle"
ADAPTER_FORMAT = "offsite-ds.adapter-package"
PLUGGED_FORMAT = "offsite-ds.plugged-model"
FINETUNED_FORMAT = "offsite-ds.finetuned-model"
FORMAT_VERSION = 1
METHODS = ("drop", "prune", "quantize")  # how the emulator's kept middle is compressed (emulator.compression_transform)
# what `emulate --fit` reads: the owner's public text, or text sampled from the full model itself (--fit-text)
FIT_TEXTS = ("public", "self")

MAX_DEPTH = 1024  # blocks of any model we accept (the largest open models have ~130)
MAX_FILES = 4096
MAX_FILE_BYTES = 1 << 40
MAX_RANK = 1 << 16  # an absolute cap on r / bottleneck before the model's own bound is known

# a relative POSIX path of plain names: no '..', '.', '~', absolute paths, backslashes, NUL or odd characters
_PATH_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]{0,511}")
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,7}")


def check_relpath(rel: str) -> str:
    """A file name inside an artifact: relative, normalised, at most 8 levels of plain names."""
    parts = rel.split("/")
    if len(rel) > 1024 or len(parts) > 8 or not all(_PATH_PART.fullmatch(p) for p in parts):
        raise ValueError(f"file name {rel[:80]!r} is not a plain relative path inside the artifact")
    return rel


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


Index = Annotated[int, Field(ge=0, lt=MAX_DEPTH)]
Hex32 = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ShortText = Annotated[str, Field(max_length=4096)]
Positive = Annotated[float, Field(gt=0)]


class FileEntry(Strict):
    bytes: Annotated[int, Field(ge=0, le=MAX_FILE_BYTES)]
    sha256: Sha256


class TensorEntry(Strict):
    shape: Annotated[list[Annotated[int, Field(ge=0, le=1 << 40)]], Field(max_length=8)]
    dtype: Literal[TENSOR_DTYPE_NAMES]


# --------------------------------------------------------------------------------- mode settings
# The typed settings of each tuning mode: what the commands build from their flags, what
# offsite_ds.peft_modes.apply_mode takes and resolves, and what a manifest records. Their defaults are the
# only copy of the numbers (the flags' defaults and help read them from here).

DEFAULT_BOTTLENECK = 64  # a bottleneck left unset becomes min(this, the hidden size) (apply_mode resolves it)


class LoraSettings(Strict):
    """LoRA on the adapter blocks; the defaults are the paper's (r=4, alpha=32), targets None: the family's."""
    r: Annotated[int, Field(ge=1, le=MAX_RANK)] = 4
    alpha: Annotated[float, Field(gt=0, le=1e6)] = 32.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    targets: Annotated[list[str], Field(min_length=1, max_length=32)] | None = None
    # a written manifest always holds these; a received one without them is refused, not read with the
    # defaults (which would silently change the adapter that was trained)
    RECORDED: ClassVar[tuple[str, ...]] = ("r", "alpha")

    @field_validator("targets")
    @classmethod
    def _names(cls, targets):
        if targets is not None:
            bad = [t for t in targets if not _MODULE_NAME.fullmatch(t)]
            if bad:
                raise ValueError(f"{bad[0][:80]!r} is not a module name")
            if len(set(targets)) != len(targets):
                raise ValueError("targets repeat a module name")
        return targets


class BottleneckSettings(Strict):
    """Houlsby adapters; bottleneck None: min(DEFAULT_BOTTLENECK, hidden size), at most the hidden size."""
    bottleneck: Annotated[int, Field(ge=1, le=MAX_RANK)] | None = None
    RECORDED: ClassVar[tuple[str, ...]] = ()


class NoSettings(Strict):
    """Full and BitFit tuning have no settings."""
    RECORDED: ClassVar[tuple[str, ...]] = ()


# the tuning modes, each with its settings class (adding a mode is one entry here)
SETTINGS: dict[str, type[Strict]] = {"full": NoSettings, "lora": LoraSettings, "adapter": BottleneckSettings,
                                     "bitfit": NoSettings}
MODES = tuple(SETTINGS)
FINETUNE_SETTINGS: dict[str, type[Strict]] = {"ft": NoSettings, "ft+lora": LoraSettings}  # finetune's FT, FT+LoRA
FINETUNE_MODES = tuple(FINETUNE_SETTINGS)
ModeSettings = LoraSettings | BottleneckSettings | NoSettings


def _settings_of(classes: dict[str, type[Strict]], mode: Any, value: Any) -> ModeSettings:
    """Parse mode_settings with the class of the (already validated) mode: one clear error per field."""
    if mode not in classes:
        raise ValueError("cannot be checked without a valid 'mode'")
    cls = classes[mode]
    if isinstance(value, cls):
        return value
    missing = [name for name in cls.RECORDED if not (isinstance(value, dict) and name in value)]
    if isinstance(value, dict) and missing:
        raise ValidationError.from_exception_data(cls.__name__, [{"type": "missing", "loc": (name,), "input": value}
                                                                 for name in missing])
    return cls.model_validate(value)


# --------------------------------------------------------------------------------- shared sections

class Calibration(Strict):
    corpus_fingerprint: ShortText
    tokens: Annotated[int, Field(ge=0)]


class EliminationStep(Strict):
    """One removal of `--select iterative`: the original block and the calibration ratio after it."""
    removed: Annotated[int, Field(ge=0, lt=MAX_DEPTH)]
    ratio: Positive


class FitBlock(Strict):
    """One fitted kept block: its run's end and the relative error to it before and after the fit."""
    block: Annotated[int, Field(ge=0, lt=MAX_DEPTH)]
    end: Annotated[int, Field(ge=0, le=MAX_DEPTH)]
    before: Annotated[float, Field(ge=0)]
    after: Annotated[float, Field(ge=0)]


class FitKL(Strict):
    """`emulate --fit --fit-kl-epochs N`: mean KL(full || emulator) before and after, on `held_out_tokens` public
    tokens the fit never read (the guard's calibration tokens), or on the fitting tokens where that is absent
    (bundles written before 2026-12-06)."""
    before: Annotated[float, Field(ge=0)]
    after: Annotated[float, Field(ge=0)]
    held_out_tokens: Annotated[int, Field(ge=2)] | None = None
    interface_before: Annotated[float, Field(ge=0)] | None = None  # --fit-kl-interface: the top adapter's input's
    interface_after: Annotated[float, Field(ge=0)] | None = None  # relative error to the full model's
    perturbed_before: Annotated[float, Field(ge=0)] | None = None  # --fit-kl-perturb: the KL with the bottom
    perturbed_after: Annotated[float, Field(ge=0)] | None = None  # adapter perturbed, and how far that moved
    perturb_shift: Annotated[float, Field(ge=0)] | None = None  # its output (relative error)
    reverted: bool = False  # the KL phase did not lower the KL where measured: its change dropped (after = before)


class FitSample(Strict):
    """`emulate --fit-text self`: the tokens the full model sampled for the fit, from which token, in how long."""
    tokens: Annotated[int, Field(ge=1)]
    start_id: Annotated[int, Field(ge=0)]
    seconds: Annotated[float, Field(ge=0)]


class FitRecord(Strict):
    """`emulate --fit`: the settings (offsite_ds.fitting.FitSettings) and each block's result."""
    tokens: Annotated[int, Field(ge=1)]
    epochs: Annotated[int, Field(ge=1)]
    lr: Positive
    batch_size: Annotated[int, Field(ge=1)]
    seq_len: Annotated[int, Field(ge=2)]
    weight_decay: Annotated[float, Field(ge=0)]
    seed: int
    blocks: Annotated[list[FitBlock], Field(max_length=MAX_DEPTH)]
    kl_epochs: Annotated[int, Field(ge=0)] = 0
    kl_lr: Positive = 1e-4
    kl_tokens: Annotated[int, Field(ge=0)] = 0
    kl_rank: Annotated[int, Field(ge=0)] = 0
    align: bool = False  # the KL phase also trained the adapter blocks: the plug-in takes their shift out
    kl_interface: Annotated[float, Field(ge=0)] = 0.0  # the KL loss's weight on the top adapter's input's error
    kl_perturb: Annotated[float, Field(ge=0)] = 0.0  # the noise on the bottom adapter's matrices in the KL phase
    precision: Literal["fp32", "bf16"] = "fp32"  # the training steps ran under bf16 autocast, or not
    kl: FitKL | None = None
    text: Literal[FIT_TEXTS] = "public"  # the fit read the owner's public text, or the model's own samples
    sampled: FitSample | None = None


class MlpWidth(Strict):
    """`emulate --mlp-width F`: each kept middle block kept `width` of its `full_width` MLP channels (the best
    scored on `tokens` calibration tokens), stored zero-padded at the others."""
    fraction: Annotated[float, Field(gt=0, le=1)]
    width: Annotated[int, Field(ge=1, le=1 << 20)]
    full_width: Annotated[int, Field(ge=1, le=1 << 20)]
    tokens: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _narrower(self) -> "MlpWidth":
        if self.width > self.full_width:
            raise ValueError(f"width {self.width} exceeds full_width {self.full_width}")
        return self


class Compression(Strict):
    """How the emulator's middle was built; builder facts (select, shared, calibration, scores) included."""
    method: Literal[METHODS]
    kept: Annotated[int, Field(ge=1, le=MAX_DEPTH)]
    middle: Annotated[int, Field(ge=1, le=MAX_DEPTH)]
    distilled: bool = False
    prune_ratio: Annotated[float, Field(gt=0, lt=1)] | None = None
    bits: Annotated[int, Field(ge=2, le=16)] | None = None
    select: Literal[SELECTIONS] | None = None
    shared: bool | None = None
    calibration: Calibration | None = None
    scores: Annotated[list[float], Field(max_length=MAX_DEPTH)] | None = None
    elimination: Annotated[list[EliminationStep], Field(max_length=MAX_DEPTH)] | None = None
    max_ratio: Positive | None = None  # the owner's fidelity target K was chosen for (emulate --max-ratio)
    fit: FitRecord | None = None  # the kept blocks were fitted to their runs (emulate --fit)
    mlp_width: MlpWidth | None = None  # the kept blocks' MLPs were narrowed (emulate --mlp-width)
    distillation: dict[str, JsonValue] | None = None


class Quality(Strict):
    """The emulator's measured quality against the full model (filled by `emulate`)."""
    emulator_ppl: Positive
    full_ppl: Positive
    ratio: Positive
    tokens: Annotated[int, Field(ge=1)]
    corpus_fingerprint: ShortText


LearningRate = Annotated[float, Field(gt=0, le=1)]
MAX_PROBE_LRS = 16


class ProbePoint(Strict):
    lr: LearningRate
    plugin_ppl: Positive


class LrAdvice(Strict):
    """The owner's learning-rate probe (`offsite-ds probe-lr`): the adapter tuned through this emulator on public
    text at each lr and plugged into the full model; `lr` is the largest whose plug-in stayed within `tolerance` x
    `full_ppl` on public held-out text (offsite_ds.lr_probe). `tune` uses it when no --lr is given and its --mode
    is `mode`."""
    lr: LearningRate
    mode: Literal[MODES]
    steps: Annotated[int, Field(ge=1, le=1 << 24)]
    tokens: Annotated[int, Field(ge=1)]  # tuning tokens per lr
    eval_tokens: Annotated[int, Field(ge=1)]
    full_ppl: Positive
    tolerance: Annotated[float, Field(ge=1)]
    points: Annotated[list[ProbePoint], Field(min_length=1, max_length=MAX_PROBE_LRS)]
    corpus_fingerprint: ShortText

    @model_validator(mode="after")
    def _lr_probed(self):
        if self.lr not in [p.lr for p in self.points]:
            raise ValueError("advice.lr is not one of the probed points")
        return self


class ModelFacts(Strict):
    """What bundle and package both say about the model and its split."""
    version: Literal[1]
    family: Annotated[str, Field(max_length=128)]
    model_type: Annotated[str, Field(max_length=128)] | None = None
    base_depth: Annotated[int, Field(ge=2, le=MAX_DEPTH)]
    base_fingerprint: Hex32
    layout: Annotated[str, Field(pattern=r"^\d{1,4}-\d{1,4}-\d{1,4}$")]
    block_map: Annotated[list[Index], Field(min_length=1, max_length=MAX_DEPTH)]
    adapter_positions: Annotated[list[Index], Field(max_length=MAX_DEPTH)]
    files: Annotated[dict[str, FileEntry], Field(max_length=MAX_FILES)]

    @field_validator("family")
    @classmethod
    def _known_family(cls, name):
        try:
            family_by_name(name)
        except OffsiteError as exc:
            raise ValueError(str(exc))
        return name

    @field_validator("files")
    @classmethod
    def _paths(cls, files):
        for rel in files:
            check_relpath(rel)
        if MANIFEST in files:
            raise ValueError(f"lists {MANIFEST} itself")
        return files

    @model_validator(mode="after")
    def _consistent(self):
        family = self.family_spec
        if self.model_type is not None and self.model_type not in family.model_types:
            raise ValueError(f"model_type '{self.model_type}' is not of family '{family.name}'")
        n, base = len(self.block_map), self.base_depth
        try:
            lay = self.layout_spec
        except LayoutError:
            lay = None
        if lay is None or lay.depth != n:
            raise ValueError(f"layout {self.layout} does not fit block_map of {n} blocks in a {base}-block model")
        if any(b >= base for b in self.block_map) or any(a >= b for a, b in zip(self.block_map, self.block_map[1:])):
            raise ValueError(f"block_map must be strictly increasing block indices below base_depth {base}")
        if [self.block_map[p] for p in lay.adapter_positions] != adapter_indices(base, lay):
            raise ValueError(f"block_map must keep the first {lay.bottom} and last {lay.top} blocks at the ends")
        if self.adapter_positions != lay.adapter_positions:
            raise ValueError(f"adapter_positions must be {lay.adapter_positions} for layout {self.layout}")
        return self

    @cached_property
    def layout_spec(self) -> Layout:
        """The layout as a Layout, checked against base_depth (LayoutError if it cannot be one)."""
        return Layout.parse(self.layout, self.base_depth)

    @cached_property
    def family_spec(self) -> Family:
        return family_by_name(self.family)

    @property
    def adapter_blocks(self) -> list[int]:
        """Original indices of the adapter blocks."""
        return [self.block_map[p] for p in self.adapter_positions]


class BundleManifest(ModelFacts):
    format: Literal["offsite-ds.emulator-bundle"]
    compression: Compression
    fingerprint: Hex32
    share_map: Annotated[list[Index], Field(max_length=MAX_DEPTH)] | None = None
    quality: Quality | None = None
    dtype: Literal[WEIGHT_DTYPE_NAMES] | None = None  # of the weights (the checkpoint's own by default)
    advice: LrAdvice | None = None  # the owner's probe; outside the fingerprint, which covers the files

    @model_validator(mode="after")
    def _bundle_consistent(self):
        lay = self.layout_spec
        if self.compression.kept != lay.kept or self.compression.middle != self.base_depth - lay.bottom - lay.top:
            raise ValueError("compression.kept/middle disagree with layout and base_depth")
        if self.share_map is not None:
            s, n = self.share_map, len(self.block_map)
            ok = (len(s) <= self.base_depth and all(x < n for x in s) and set(s) == set(range(n))
                  and all(a <= b for a, b in zip(s, s[1:])) and s[:lay.bottom] == list(range(lay.bottom))
                  and s[len(s) - lay.top:] == list(range(n - lay.top, n)))
            if not ok:
                raise ValueError("share_map must list every stored block, non-decreasing, adapter positions as "
                                 "themselves, at most base_depth entries")
        return self

    @property
    def aligned(self) -> bool:
        """Its adapter blocks were trained with the emulator (emulate --fit-align): they are not the model's own,
        so the plug-in adds the data owner's change to the model's blocks, not the shipped ones."""
        return self.compression.fit is not None and self.compression.fit.align

    def advised_lr(self, mode: str) -> float | None:
        """The owner's probed lr for tuning in `mode` (offsite_ds.lr_probe), if it probed that mode."""
        return self.advice.lr if self.advice is not None and self.advice.mode == mode else None

    @property
    def executed_depth(self) -> int:
        return len(self.share_map) if self.share_map is not None else len(self.block_map)


class AdapterManifest(ModelFacts):
    format: Literal["offsite-ds.adapter-package"]
    bundle_fingerprint: Hex32
    mode: Literal[MODES]
    mode_settings: ModeSettings
    tensors: Annotated[dict[str, TensorEntry], Field(min_length=1, max_length=1 << 16)]
    training: dict[str, JsonValue] = {}
    aligned: bool = False  # tuned from an aligned bundle's adapter blocks (emulate --fit-align): see plugin

    @field_validator("mode_settings", mode="wrap")
    @classmethod
    def _by_mode(cls, value, handler, info):
        return _settings_of(SETTINGS, info.data.get("mode"), value)

    @field_validator("tensors")
    @classmethod
    def _tensor_names(cls, tensors):
        bad = [n for n in tensors if not _TENSOR_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"tensor name {bad[0][:80]!r} is not a parameter name")
        return tensors


class PlugCheck(Strict):
    """The plug-in scored against the full model's zero-shot on the owner's public text (`plugin --check-data`)."""
    corpus_fingerprint: ShortText
    tokens: Annotated[int, Field(ge=1)]
    full_ppl: Positive
    plugged_ppl: Positive
    ratio: Positive


class PluggedManifest(Strict):
    format: Literal["offsite-ds.plugged-model"]
    version: Literal[1]
    mode: Literal[MODES]
    mode_settings: ModeSettings
    adapter_blocks: Annotated[list[Index], Field(max_length=MAX_DEPTH)]
    base_fingerprint: Hex32
    bundle_fingerprint: Hex32
    training: dict[str, JsonValue] = {}
    check: PlugCheck | None = None

    @field_validator("mode_settings", mode="wrap")
    @classmethod
    def _by_mode(cls, value, handler, info):
        return _settings_of(SETTINGS, info.data.get("mode"), value)


class FinetunedManifest(Strict):
    format: Literal["offsite-ds.finetuned-model"]
    version: Literal[1]
    mode: Literal[FINETUNE_MODES]
    mode_settings: LoraSettings | NoSettings
    family: str
    base_model: str
    data_fingerprint: str | None = None
    world_size: Annotated[int, Field(ge=1)]
    seq_len: Annotated[int, Field(ge=1)]
    training: dict[str, JsonValue] = {}

    @field_validator("mode_settings", mode="wrap")
    @classmethod
    def _by_mode(cls, value, handler, info):
        return _settings_of(FINETUNE_SETTINGS, info.data.get("mode"), value)


MANIFEST_TYPES: dict[str, type[Strict]] = {BUNDLE_FORMAT: BundleManifest, ADAPTER_FORMAT: AdapterManifest,
                                          PLUGGED_FORMAT: PluggedManifest, FINETUNED_FORMAT: FinetunedManifest}


def describe_error(exc: ValidationError) -> str:
    """The first problem of a ValidationError as one line: field path, what is wrong, what was given."""
    err = exc.errors(include_url=False)[0]
    loc = ".".join(p[:60] if isinstance(p, str) and p.isprintable() else repr(p)[:60] for p in err["loc"])
    loc = loc or "(top level)"
    msg = err["msg"].removeprefix("Value error, ")
    given = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {repr(err.get('input'))[:60]})"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"field '{loc}': {msg}{given}{more}".replace("\n", " ")


def parse_manifest(raw: Any, expected_format: str, where: str):
    """Parse a decoded offsite.json into its typed class; any problem is one ArtifactError line."""
    if not isinstance(raw, dict):
        raise ArtifactError(f"{where}: {MANIFEST} is not a JSON object; re-export the artifact")
    fmt = raw.get("format")
    if fmt != expected_format:
        raise ArtifactError(f"{where}: format {str(fmt)[:60]!r} is not '{expected_format}'; pass the right artifact")
    version = raw.get("version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ArtifactError(f"{where}: format version {str(version)[:20]} is not supported (this offsite-ds reads "
                            f"version {FORMAT_VERSION}); export it again with a matching offsite-ds")
    try:
        return MANIFEST_TYPES[expected_format].model_validate(raw)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: {MANIFEST} {describe_error(exc)}; re-export the artifact")
    except RecursionError:
        raise ArtifactError(f"{where}: {MANIFEST} is nested too deeply; re-export the artifact")


def decode_json(data: bytes, where: str) -> Any:
    """json.loads with every way it can fail (bad UTF-8, huge ints, deep nesting) as one ArtifactError line."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
        raise ArtifactError(f"{where} is not valid JSON ({reason}); re-export it")


def dump(manifest: Strict) -> dict:
    """The manifest as plain JSON data (what is written to offsite.json)."""
    return manifest.model_dump(mode="json", exclude_none=True)
