"""Where and how this process runs: the one home of rank, world size, device, precision, the filled
DeepSpeed config and the model loader.

Every role receives a `Runtime` instead of re-deriving these facts. It joins the process group a
launcher set up, fills the DeepSpeed config once (`ds_config.build_ds_config` is the filler) and,
under ZeRO-3, keeps the `HfDeepSpeedConfig` alive that makes transformers build models sharded:
transformers holds that object only through a weak reference, so it must live exactly as long as the
Runtime (`with Runtime(...) as runtime:` or `close()`).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from offsite_ds.errors import OffsiteError

PRECISIONS = ("auto", "fp32", "bf16")


def init_distributed() -> None:
    """Join the process group the launcher set up (a one-rank group for a plain process without one)."""
    import warnings

    # torch 2.13 deprecates the collective names DeepSpeed calls on every step; one warning per call is noise
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        # one process, no launcher: give it a one-rank group so DeepSpeed's collectives still work
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    deepspeed.init_distributed(verbose=False)
    _unlink_shm_buffer_at_exit()


def _unlink_shm_buffer_at_exit() -> None:
    """DeepSpeed's CPU allreduce (0.19) maps a 69 MB /dev/shm segment per rank and never unlinks it: every
    multi-rank CPU run left RAM behind (tmpfs) until the machine ran out. The peers map it at start-up,
    so each rank removes its own name at exit; a missing file (GPU runs, one rank) is fine."""
    import atexit

    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank_and_world()[0]}")
    atexit.register(lambda: Path("/dev/shm", name).unlink(missing_ok=True))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MMAP_THRESHOLD = 1 << 20  # bytes: freed buffers this large go back to the OS at once


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mapping, returned to the OS when freed.

    Why: glibc does this only until the first large buffer is freed; then it raises its threshold (up to
    32 MiB) and serves later buffers from the heap, where a freed one below a live one is never given back.
    The owner's streamed passes allocate and free block-sized buffers all the time, so the process kept
    memory it no longer used: `emulate --fit --fit-kl-rank 8` on a 2.2 GB checkpoint peaked at 4.31 GB,
    3.19 GB with a fixed threshold. Setting it once turns glibc's adjustment off. A threshold the user set
    (MALLOC_MMAP_THRESHOLD_) is kept. Returns whether the setting took (False off glibc).

    It costs time: each large buffer is mapped afresh. Full-model training steps of SmolLM2-135M on the CPU ran
    8.5% slower with it (peak RSS 12% lower). So only the owner's memory-bound commands set it (`emulate`,
    `plugin`); training commands keep glibc's default.
    """
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl without the symbol)
        return False
    m_mmap_threshold = -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(threshold)))


def rank_and_world() -> tuple[int, int]:
    """(rank, world size): from the process group when one is up, else from the launcher's variables."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def bf16_wanted(precision: str, device_type: str) -> bool:
    """bf16 on CUDA unless fp32 was asked; on CPU only when asked. On a CPU with native bf16 (`native_bf16`) it is
    faster - the demo's tuning 1.35x on this project's AMD EPYC at the same plug-in - and the jobs measured so
    (the owner's fit, the demo's and compare-emulators' round trip) ask for it through `resolved_precision`; the
    other roles (tune, distill, finetune, with or without DeepSpeed) keep fp32 on a CPU until they are measured."""
    check_precision(precision)
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def native_bf16(device_type: str) -> bool:
    """Whether this device multiplies bf16 matrices natively, so bf16 autocast is faster than fp32: a CUDA GPU
    with bf16, or a CPU with AVX512-BF16 or AMX. Measured on the project's 2-core AMD EPYC (AVX512-BF16): a
    2,048 x 576 x 49,152 product 2.1x faster in bf16, a SmolLM2-135M training step under autocast 1.5x."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return device_type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_precision(precision: str, flag: str = "--precision") -> None:
    """The one check of a precision setting: one line naming the flag and the choices."""
    if precision not in PRECISIONS:
        raise OffsiteError(f"{flag} {precision} must be one of {', '.join(PRECISIONS)}")


def resolved_precision(precision: str, device_type: str, flag: str = "--precision") -> str:
    """"fp32" or "bf16" for `precision` on this device, "auto" meaning bf16 where it is native (`native_bf16`): the
    rule of the jobs measured equal in both (the demo's and compare-emulators' round trip; the owner's fit on a GPU,
    fp32 on a CPU for the owner's memory: fitting.FitSettings), so their records say what ran."""
    check_precision(precision, flag)
    return ("bf16" if native_bf16(device_type) else "fp32") if precision == "auto" else precision


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_model_dir(model_dir: str | Path) -> Path:
    """The one check that a path is a local Hugging Face model directory (before anything large loads)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise OffsiteError(f"{path} is not a Hugging Face model directory (no config.json); pass a local model dir")
    return path


def load_model_config(model_dir: str | Path):
    """The model's `config.json` as a transformers config (no weights, never the hub)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(require_model_dir(model_dir), local_files_only=True, trust_remote_code=False)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Load a local HF causal LM (safetensors only, never the hub, never pickle) in eval mode.

    Built sharded when a Runtime holds a ZeRO-3 config; refuses architectures outside the family table.
    """
    from transformers import AutoModelForCausalLM

    from offsite_ds.families import supported_build

    path = require_model_dir(model_dir)
    try:  # unsupported architectures are refused here, with the family table's message
        model, _ = supported_build(lambda: AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=False))
    except OSError as exc:
        raise OffsiteError(f"cannot load {path}: {str(exc).splitlines()[0]} (safetensors weights are required)")
    return model.eval()


class Runtime:
    """One process's execution context: distributed set-up, device, precision and the DeepSpeed config.

    `deepspeed` is a ds config (path, stock name or dict) or None for the plain torch engine. The
    config is filled once, by `configure`, from the run's TrainConfig and the model's config; the
    engine and the model builder read the same filled dict.
    """

    def __init__(self, deepspeed: str | Path | dict | None = None, precision: str = "auto",
                 device: str | None = None):
        self.deepspeed = deepspeed or None
        if self.deepspeed is not None:
            init_distributed()
        self.rank, self.world = rank_and_world()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device:
            self.device = torch.device(device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
        else:
            self.device = torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # Triton and NCCL launch on the current device, not the tensors'
        self.precision = precision
        self.bf16 = bf16_wanted(precision, self.device.type)
        self.ds_config: dict | None = None
        self._hf_ds_config = None  # HfDeepSpeedConfig under ZeRO-3; transformers keeps only a weak reference

    @classmethod
    def from_config(cls, cfg) -> Runtime:
        """The Runtime a TrainConfig asks for (its deepspeed, precision and device settings)."""
        return cls(cfg.deepspeed, cfg.precision, cfg.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def configure(self, cfg, model_config=None) -> dict | None:
        """Fill the ds config (once; later calls return the same dict) and activate ZeRO-3 model building.

        Call it before building a model that must be built sharded; `train` calls it otherwise.
        """
        if self.deepspeed is None:
            return None
        if self.ds_config is None:
            from offsite_ds.ds_config import build_ds_config, is_zero3

            self.ds_config = build_ds_config(self.deepspeed, cfg, model_config=model_config, world=self.world,
                                             bf16=self.bf16, announce=self.is_main)
            if is_zero3(self.ds_config):
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return self.ds_config

    def prepare_model(self, cfg, model_dir: str | Path, seq_len: int):
        """Check the model dir and the sequence length, then fill the ds config from the model's config;
        returns that config. Call before building the model, so ZeRO-3 builds it sharded."""
        from offsite_ds.data import check_seq_len

        model_config = load_model_config(model_dir)
        check_seq_len(seq_len, model_config)
        self.configure(cfg, model_config)
        return model_config

    def block_loader(self, blocks: torch.Tensor, cfg):
        """The packed corpus as this rank's shuffled share of micro-batches (the same order on resume)."""
        from offsite_ds.data import BlockLoader

        return BlockLoader(blocks, cfg.batch_size, shuffle=True, seed=cfg.seed, rank=self.rank, world_size=self.world)

    @property
    def zero_stage(self) -> int | None:
        from offsite_ds.ds_config import zero_stage

        return zero_stage(self.ds_config) if self.ds_config is not None else None

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype models are built in: bf16 when the DeepSpeed engine trains in bf16, fp32 otherwise
        (the torch engine keeps fp32 weights and autocasts)."""
        if self.ds_config is not None and self.ds_config.get("bf16", {}).get("enabled") is True:
            return torch.bfloat16
        return torch.float32

    @property
    def autocast_bf16(self) -> bool:
        """Whether the torch engine runs forward under bf16 autocast (DeepSpeed casts the model itself)."""
        return self.bf16 and self.deepspeed is None

    def load_model(self, model_dir: str | Path, dtype: torch.dtype | None = None):
        """The model at `model_dir` in this run's weight dtype; sharded when ZeRO-3 is configured."""
        return load_model(model_dir, dtype or self.weight_dtype)

    def close(self) -> None:
        """Release the ZeRO-3 model-building config (after the last model is built, trained and saved)."""
        self._hf_ds_config = None

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
