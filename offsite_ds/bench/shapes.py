"""Models for the benchmark: the real configs of the paper's models (offsite_ds/paper_models.py), built
with random weights, so that benchmarking never downloads anything. A local config file or model directory works too. `--smoke` swaps each shape for a
tiny one of the same family and depth, so the same layouts apply on a CPU in seconds.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from offsite_ds.errors import OffsiteError
from offsite_ds.paper_models import PAPER_MODELS, paper_config, paper_layout, read_model_config
from offsite_ds.validation import DEPTH_KEYS

BUILTIN = PAPER_MODELS  # the paper's models, by name
TINY_LAYOUT = "2-4-2"  # for tiny-<family> shapes (default depth 12)


@dataclass
class BenchModel:
    """A model to benchmark: its config (random weights are built from it) and the paper's layout."""

    name: str
    config: PretrainedConfig
    default_layout: str | None
    tiny: bool = False

    @property
    def depth(self) -> int:
        return depth_of_config(self.config)

    @property
    def model_type(self) -> str:
        return self.config.model_type


def depth_of_config(config: PretrainedConfig) -> int:
    for key in DEPTH_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise OffsiteError(f"config of model type '{config.model_type}' names no depth ({' or '.join(DEPTH_KEYS)})")


def family_of_config(config: PretrainedConfig):
    """The family table's entry for a config, checked on a meta-device model (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from offsite_ds.families import family_of

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    return family_of(model)


def _finish(config: PretrainedConfig) -> PretrainedConfig:
    config.use_cache = False  # training: no KV cache
    return config


def resolve_shape(spec: str, smoke: bool = False) -> BenchModel:
    """A built-in name (opt-1.3b, opt-6.7b, gpt2-xl, bloom-7b1), `tiny-<family>[:depth]`, or a local config."""
    if spec in BUILTIN:
        shape = BenchModel(spec, _finish(paper_config(spec)), paper_layout(spec))
    elif spec.startswith("tiny-"):
        from offsite_ds.tiny import TINY_FAMILIES, tiny_config

        family, _, depth = spec[len("tiny-"):].partition(":")
        if family not in TINY_FAMILIES or (depth and not depth.isdigit()):
            raise OffsiteError(f"unknown tiny shape '{spec}'; use tiny-<family>[:depth] with family one of "
                               f"{', '.join(TINY_FAMILIES)}")
        return BenchModel(spec, _finish(tiny_config(family, n_layers=int(depth or 12))), TINY_LAYOUT, tiny=True)
    else:
        config = read_model_config(spec, [*BUILTIN, "tiny-<family>[:depth]"])
        shape = BenchModel(Path(spec).name.removesuffix(".json") or spec, _finish(config), None)
    return tiny_twin(shape) if smoke else shape


def tiny_twin(shape: BenchModel) -> BenchModel:
    """The same family and depth at toy width (hidden 32, vocab 258): for the CPU smoke mode."""
    if shape.tiny:
        return shape
    from offsite_ds.tiny import TINY_FAMILIES, tiny_config

    family = family_of_config(shape.config).name
    config = _finish(tiny_config(family if family in TINY_FAMILIES else "llama", n_layers=shape.depth))
    return BenchModel(f"{shape.name} (tiny)", config, shape.default_layout, tiny=True)
