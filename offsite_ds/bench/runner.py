"""The measurement: each (model, sequence length, batch size, setting) trains for real through the toolkit's
one loop (`offsite_ds.train.train`) and reports steady-state tokens/s, peak memory and MFU.

Timing needs no hook inside the loop: the bench's Role is called by the loop at the start of every step
(`compute_loss`) and once after the last optimizer step (`evaluate`). Both calls synchronise CUDA and
take a timestamp, so step k lasts from its own `compute_loss` to the next one (or to `evaluate`), and
covers everything the loop does: host-to-device copy, forward, backward, clipping, optimizer and LR
step. The first `warmup` steps (allocator growth, cuBLAS/Triton autotuning, optimizer state creation)
are excluded. Peak memory is reset after the model is on the device and read after the loop, so it
holds weights, gradients, optimizer state and activations of that setting alone.

On CUDA every case runs in its own process by default: an OOM, a kernel patch or a DeepSpeed engine
cannot leak into the next setting, and each peak starts from an empty device.
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from offsite_ds.atomic import utc_stamp
from offsite_ds.bench.settings import SETTINGS, SettingSkipped, count_params, meta_model, parse_settings, prepare
from offsite_ds.bench.shapes import BenchModel, resolve_shape
from offsite_ds.ds_config import CONFIG_DIR
from offsite_ds.errors import DataError, LayoutError, OffsiteError
from offsite_ds.formats import DTYPE_ALIASES
from offsite_ds.manifests import LoraSettings
from offsite_ds.peft_modes import settings_for
from offsite_ds.roles.base import Role
from offsite_ds.runtime import Runtime

DEFAULT_SETTINGS = tuple(SETTINGS)
DS_OFFLOAD_CONFIG = CONFIG_DIR / "zero3_offload.json"
# bytes per parameter of full fine-tuning on one GPU: fp32 weights 4 + grads 4 + AdamW m, v 8 + the bf16
# autocast weight copies 2; bf16 weights: 2 + 2 + 4 (AdamW state in the parameters' dtype).
FT_BYTES_PER_PARAM = {"fp32": 18, "bf16": 8}
FIT_FRACTION = 0.85  # leave room for activations and the allocator when deciding to offload
WEIGHT_DTYPES = {name: DTYPE_ALIASES[name] for name in ("fp32", "bf16")}  # the settings' weights


@dataclass
class BenchSpec:
    """What to run. Lists multiply: every model x seq_len x batch size x setting."""

    models: list[str] = field(default_factory=lambda: ["opt-1.3b"])
    settings: list[str] = field(default_factory=lambda: list(DEFAULT_SETTINGS))
    layout: str | None = None  # "L-K-R" for all, or "model=L-K-R,..."; default: the paper's per model
    batch_sizes: list[int | str] = field(default_factory=lambda: [1])  # ints, or "max": largest that fits
    seq_lens: list[int] = field(default_factory=lambda: [512])
    steps: int = 20  # measured optimizer steps
    warmup: int = 5  # steps run first and not measured
    device: str = "auto"  # auto | cuda | cpu
    smoke: bool = False  # tiny shapes of the same family and depth (the CPU smoke test)
    weights: str = "fp32"  # master weights; compute is bf16 autocast on CUDA either way
    lora_r: int = LoraSettings().r
    lora_alpha: float = LoraSettings().alpha
    ft_offload: str = "auto"  # auto: ZeRO-3 CPU offload when FT does not fit the GPU; on; off
    ds_config: str | None = None  # defaults to ds_configs/zero3_offload.json
    max_batch: int = 64  # upper bound of the "max" batch search
    peak_tflops: float | None = None  # overrides the device table
    isolate: bool | None = None  # one process per case; default: on CUDA yes, on CPU no
    seed: int = 0
    lr: float = 1e-5

    def validate(self) -> None:
        if self.steps < 1 or self.warmup < 0:
            raise OffsiteError("--steps must be >= 1 and --warmup >= 0")
        if self.weights not in WEIGHT_DTYPES:
            raise OffsiteError(f"--weights {self.weights}: choose fp32 or bf16")
        if self.ft_offload not in ("auto", "on", "off"):
            raise OffsiteError(f"--ft-offload {self.ft_offload}: choose auto, on or off")
        if self.device not in ("auto", "cuda", "cpu"):
            raise OffsiteError(f"--device {self.device}: choose auto, cuda or cpu")
        if self.max_batch < 1:
            raise OffsiteError("--max-batch must be >= 1")
        for b in self.batch_sizes:
            if not (b == "max" or (isinstance(b, int) and b >= 1)):
                raise OffsiteError(f"--batch-size {b}: give positive integers or 'max'")
        for s in self.seq_lens:
            if not isinstance(s, int) or s < 2:
                raise OffsiteError(f"--seq-len {s}: give integers >= 2")
        parse_settings(self.settings)


def parse_layouts(spec: str | None, shapes: list[BenchModel]) -> dict[str, str | None]:
    """`--layout 2-8-2` for every model, or `opt-1.3b=2-8-2,gpt2-xl=2-16-2`; unnamed models get the paper's."""
    chosen = {s.name: s.default_layout for s in shapes}
    if not spec:
        return chosen
    if "=" not in spec:
        return {name: spec for name in chosen}
    by_base = {s.name.removesuffix(" (tiny)"): s.name for s in shapes}
    for item in spec.split(","):
        name, _, layout = item.partition("=")
        name = name.strip()
        key = name if name in chosen else by_base.get(name)
        if key is None or not layout.strip():
            raise OffsiteError(f"--layout item '{item}': expected MODEL=L-K-R with MODEL one of "
                               f"{', '.join(by_base)}")
        chosen[key] = layout.strip()
    return chosen


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise OffsiteError("--device cuda: no CUDA device is visible; use --device cpu --smoke")
        return torch.device("cuda", 0)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------- one measurement

class BenchRole(Role):
    """Plain causal-LM training that timestamps every step; a benchmark exports nothing."""

    name = "bench"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        super().__init__(model)
        self.device = device
        self.marks: list[float] = []
        self.end: float | None = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def compute_loss(self, model, batch: dict):
        self.marks.append(self._now())
        return super().compute_loss(model, batch)

    def evaluate(self, model: torch.nn.Module) -> None:
        self.end = self._now()  # the loop calls this right after the last optimizer step
        return None

    def export(self, model: torch.nn.Module, summary: dict) -> None:
        return None

    def step_seconds(self) -> list[float]:
        if self.end is None:
            raise RuntimeError("the training loop did not finish; no end timestamp")
        edges = self.marks + [self.end]
        return [b - a for a, b in zip(edges, edges[1:])]


def random_loader(vocab_size: int, batch_size: int, seq_len: int, seed: int):
    """Token blocks of random ids through the toolkit's BlockLoader (content does not change the cost)."""
    from offsite_ds.data import BlockLoader

    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, vocab_size, (2 * batch_size, seq_len), generator=g)
    return BlockLoader(blocks, batch_size, shuffle=False, seed=seed)


def _cuda_reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def measure(case: dict) -> dict:
    """Build, train and time one case; raises on OOM (the caller records it)."""
    from offsite_ds.bench.devices import describe_device
    from offsite_ds.bench.flops import flops_per_token
    from offsite_ds.data import check_seq_len
    from offsite_ds.families import family_of
    from offsite_ds.train import TrainConfig, train

    setting = SETTINGS[case["setting"]]
    shape = resolve_shape(case["model"], smoke=case["smoke"])
    device = torch.device(case["device"])
    b, s = case["batch_size"], case["seq_len"]
    check_seq_len(s, shape.config)
    offload = bool(case.get("offload"))
    cfg = TrainConfig(steps=case["warmup"] + case["steps"], lr=case["lr"], warmup_steps=0, batch_size=b,
                      grad_accum=1, max_grad_norm=1.0, seed=case["seed"], progress=False, log_every=0,
                      eval_every=0, save_every=0, device=str(device), precision="auto",
                      deepspeed=case["ds_config"] if offload else None,
                      # torch's AdamW: no JIT op build on a CPU try-out, or where the case asks (GPU acceptance)
                      torch_adam=bool(case.get("torch_adam")) or device.type != "cuda")
    dtype = WEIGHT_DTYPES[case["weights"]]
    build_on = device
    # the owner's ZeRO-3 path (as `offsite-ds finetune` takes it): a one-rank process group, the ds config
    # filled from the run, the model built sharded while the Runtime is open
    with Runtime.from_config(cfg) as runtime:
        if offload:
            runtime.configure(cfg, shape.config)
            build_on, dtype = None, runtime.weight_dtype  # zero.Init places the shards itself
        _cuda_reset(device)
        prepared = prepare(setting, shape.config, case.get("layout"), build_on, dtype,
                           settings_for("lora", r=case["lora_r"], alpha=case["lora_alpha"]), seed=case["seed"])
        model = prepared.model
        flops = flops_per_token(prepared.flop_plan, s)
        role = BenchRole(model, device)
        loader = random_loader(int(shape.config.vocab_size), b, s, case["seed"])
        _cuda_reset(device)
        summary = train(role, loader, cfg, runtime)
    peak_alloc = peak_reserved = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak_alloc = torch.cuda.max_memory_allocated(device) / 2**20
        peak_reserved = torch.cuda.max_memory_reserved(device) / 2**20
    measured = role.step_seconds()[case["warmup"]:]
    tokens_per_step = b * s
    tokens_per_s = tokens_per_step * len(measured) / sum(measured)
    info = describe_device(device, case.get("peak_tflops"))
    achieved = flops["total"] * tokens_per_s
    ordered = sorted(measured)
    return {
        "status": "ok",
        "engine": "deepspeed-zero3-offload" if offload else "torch",
        "family": family_of(model).name,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "block_map": prepared.block_map,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_s, 2),
        "step_time_ms": {"mean": round(1e3 * sum(measured) / len(measured), 3),
                         "median": round(1e3 * ordered[len(ordered) // 2], 3),
                         "min": round(1e3 * ordered[0], 3), "max": round(1e3 * ordered[-1], 3)},
        "peak_allocated_mb": None if peak_alloc is None else round(peak_alloc, 1),
        "peak_reserved_mb": None if peak_reserved is None else round(peak_reserved, 1),
        "trainable_params": prepared.trainable_params,
        "resident_params": prepared.resident_params,
        "params_on": "cpu (ZeRO-3 offload, streamed to the GPU)" if offload else device.type,
        "base_params": prepared.base_params,
        "flops_per_token": flops["total"],
        "flops_breakdown": flops,
        "achieved_tflops": round(achieved / 1e12, 4),
        "mfu": None if info.peak_tflops is None else round(achieved / (info.peak_tflops * 1e12), 4),
        "final_loss": summary.get("final_loss"),
        "kernels": prepared.kernels,
    }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def run_case_inline(case: dict) -> dict:
    """One case in this process; OOM, a skip or a failure becomes a status, never a crash of the suite."""
    device = torch.device(case["device"])
    outcome: dict
    try:
        outcome = measure(case)
    except (SettingSkipped, DataError, LayoutError) as exc:  # cannot run as asked: say why, go on
        outcome = {"status": "skipped", "reason": str(exc)}
    except OffsiteError as exc:  # e.g. a non-finite loss: a real failure of the setting
        outcome = {"status": "error", "reason": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded, and the suite goes on
        if _is_oom(exc):
            outcome = {"status": "oom", "reason": str(exc).splitlines()[0][:300]}
        else:
            traceback.print_exc()
            outcome = {"status": "error", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    # the exception (and the frames holding the model) is gone here, so the memory can really be freed
    try:
        _cuda_reset(device)
    except RuntimeError as exc:  # a sticky CUDA error: this process's device is unusable from here on
        outcome.setdefault("after", f"device reset failed: {str(exc).splitlines()[0][:200]}")
    return outcome


def run_case_isolated(case: dict) -> dict:
    """One case in a fresh Python process (`python -m offsite_ds.bench.worker`)."""
    with tempfile.TemporaryDirectory(prefix="offsite-bench-") as tmp:
        case_path, result_path = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case_path.write_text(json.dumps(case))
        proc = subprocess.run([sys.executable, "-m", "offsite_ds.bench.worker", str(case_path), str(result_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result_path.is_file():
            return json.loads(result_path.read_text())
        tail = [line for line in proc.stdout.splitlines() if line.strip()][-3:]
        reason = " | ".join(tail)[-400:] or f"exit status {proc.returncode}"
        status = "oom" if "out of memory" in proc.stdout else "error"
        return {"status": status, "reason": f"worker process died (exit {proc.returncode}): {reason}"}


# ----------------------------------------------------------------------------------------- the suite

def offload_unavailable(ds_config: str | None) -> str | None:
    """Why the ZeRO-3 offload path cannot run here, or None when it can."""
    import importlib.util

    path = Path(ds_config) if ds_config else DS_OFFLOAD_CONFIG
    if not path.is_file():
        return f"no DeepSpeed config at {path}"
    for module in ("deepspeed", "offsite_ds.ds_config", "offsite_ds.zero3"):
        try:
            if importlib.util.find_spec(module) is None:
                return f"module {module} is not available"
        except ImportError as exc:
            return f"module {module} is not available ({exc})"
    return None


def ft_fits(params: int, weights: str, gpu_bytes: int) -> tuple[bool, str]:
    """Static estimate: do full fine-tuning's weights, gradients and AdamW state fit in one GPU?"""
    need = params * FT_BYTES_PER_PARAM[weights]
    if need <= FIT_FRACTION * gpu_bytes:
        return True, ""
    return False, (f"FT needs ~{need / 2**30:.0f} GiB for weights, gradients and AdamW state ({params / 1e9:.2f}B "
                   f"params x {FT_BYTES_PER_PARAM[weights]} B); the GPU has {gpu_bytes / 2**30:.0f} GiB")


def ft_needs_offload(shape: BenchModel, spec: BenchSpec, device: torch.device) -> tuple[bool, str]:
    """Whether full fine-tuning of `shape` should run with ZeRO-3 CPU offload, and why."""
    if device.type != "cuda" or spec.ft_offload == "off":
        return False, ""
    if spec.ft_offload == "on":
        return True, "--ft-offload on"
    fits, why = ft_fits(count_params(meta_model(shape.config)), spec.weights,
                        torch.cuda.get_device_properties(device).total_memory)
    return not fits, why


def _base_case(spec: BenchSpec, model_arg: str, layout: str | None, device: torch.device, setting: str,
               seq_len: int, batch: int) -> dict:
    return {"model": model_arg, "smoke": spec.smoke, "setting": setting,
            "layout": layout if SETTINGS[setting].emulator else None,
            "batch_size": batch, "seq_len": seq_len, "steps": spec.steps, "warmup": spec.warmup,
            "device": str(device), "weights": spec.weights, "lora_r": spec.lora_r, "lora_alpha": spec.lora_alpha,
            "seed": spec.seed, "lr": spec.lr, "peak_tflops": spec.peak_tflops,
            "ds_config": str(Path(spec.ds_config) if spec.ds_config else DS_OFFLOAD_CONFIG), "offload": False}


class Suite:
    """Runs the cases of a BenchSpec one after another, recording each as it finishes."""

    def __init__(self, spec: BenchSpec, on_record=None, log=None):
        spec.validate()
        self.spec = spec
        self.device = pick_device(spec.device)
        if self.device.type == "cpu" and not spec.smoke and spec.device != "cpu":
            raise OffsiteError("no CUDA device: real shapes need a GPU; pass --smoke for tiny shapes on CPU "
                               "(or --device cpu to insist)")
        self.isolate = spec.isolate if spec.isolate is not None else self.device.type == "cuda"
        self.shapes = [resolve_shape(m, smoke=spec.smoke) for m in spec.models]
        self.model_args = {shape.name: arg for shape, arg in zip(self.shapes, spec.models)}
        self.layouts = parse_layouts(spec.layout, self.shapes)
        self._check_layouts()
        self.settings = [s.name for s in parse_settings(spec.settings)]
        self.on_record = on_record or (lambda record: None)
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.records: list[dict] = []

    def _check_layouts(self) -> None:
        from offsite_ds.sandwich import Layout

        needs_layout = any(s.emulator for s in parse_settings(self.spec.settings))
        for shape in self.shapes:
            layout = self.layouts[shape.name]
            if layout is None and needs_layout:
                raise OffsiteError(f"model {shape.name} has no default layout: pass --layout L-K-R")
            if layout is not None:
                Layout.parse(layout, shape.depth)  # a bad layout fails now, not after an hour of FT

    def run_case(self, case: dict) -> dict:
        runner = run_case_isolated if self.isolate else run_case_inline
        return runner(case)

    def _measure_one(self, shape: BenchModel, case: dict, retry_offloaded: bool = True) -> dict:
        """One case; FT goes to ZeRO-3 offload when it cannot fit (by estimate, or by running out of memory)."""
        outcome: dict
        if case["setting"] == "ft":
            needed, why = ft_needs_offload(shape, self.spec, self.device)
            if needed:
                missing = offload_unavailable(self.spec.ds_config)
                if missing:
                    return {"status": "skipped", "reason": f"{why}; ZeRO-3 CPU offload is unavailable: {missing}"}
                case = {**case, "offload": True}
                outcome = self.run_case(case)
                outcome.setdefault("offload_reason", why)
                return outcome
        outcome = self.run_case(case)
        if (retry_offloaded and case["setting"] == "ft" and outcome["status"] == "oom"
                and self.spec.ft_offload == "auto"
                and self.device.type == "cuda" and not offload_unavailable(self.spec.ds_config)):
            self.log(f"  FT ran out of memory at batch {case['batch_size']}; retrying with ZeRO-3 CPU offload")
            retry = self.run_case({**case, "offload": True})
            retry["offload_reason"] = "plain FT ran out of GPU memory"
            return retry
        return outcome

    def _search_max(self, shape: BenchModel, case: dict) -> dict:
        """Double the batch from 1 until it runs out of memory (or reaches --max-batch); keep the largest."""
        best, tried, first_oom = None, [], None
        batch = 1
        while batch <= self.spec.max_batch:
            # FT that runs out of memory at a larger batch has found its largest batch; only when not
            # even batch 1 fits does it fall back to offload
            outcome = self._measure_one(shape, {**case, "batch_size": batch}, retry_offloaded=batch == 1)
            tried.append(batch)
            if outcome["status"] != "ok":
                if outcome["status"] == "oom":
                    first_oom = batch
                if best is None:
                    best = {**outcome, "batch_size": batch}
                break
            best = {**outcome, "batch_size": batch}
            if outcome.get("engine") != "torch":
                break  # offloaded FT: one batch size is enough for a baseline
            batch *= 2
        best["batch_search"] = {"tried": tried, "first_oom": first_oom, "limit": self.spec.max_batch}
        return best

    def run(self) -> list[dict]:
        total = len(self.shapes) * len(self.spec.seq_lens) * len(self.spec.batch_sizes) * len(self.settings)
        n = 0
        for shape in self.shapes:
            layout = self.layouts[shape.name]
            for seq_len in self.spec.seq_lens:
                for batch in self.spec.batch_sizes:
                    for setting in self.settings:
                        n += 1
                        case = _base_case(self.spec, self.model_args[shape.name], layout, self.device, setting, seq_len,
                                          1 if batch == "max" else batch)
                        started = time.time()
                        outcome = self._search_max(shape, case) if batch == "max" else self._measure_one(shape, case)
                        record = {"model": shape.name, "setting": setting, "label": _label(setting, outcome),
                                  "layout": case["layout"], "seq_len": seq_len, "batch": batch,
                                  "batch_size": outcome.pop("batch_size", case["batch_size"]),
                                  "steps": self.spec.steps, "warmup": self.spec.warmup, "weights": self.spec.weights,
                                  **outcome, "wall_seconds": round(time.time() - started, 1)}
                        self.records.append(record)
                        self.log(f"[{n}/{total}] {_one_line(record)}")
                        self.on_record(record)
        return self.records


def _label(setting: str, outcome: dict) -> str:
    label = SETTINGS[setting].label
    if outcome.get("engine") == "deepspeed-zero3-offload":
        label += " (ZeRO-3 offload)"
    return label


def _one_line(r: dict) -> str:
    head = f"{r['model']} {r['setting']} seq {r['seq_len']} batch {r['batch_size']}"
    if r["status"] != "ok":
        return f"{head}: {r['status'].upper()} {r.get('reason', '')}"
    mem = f", peak {r['peak_allocated_mb']:.0f} MB" if r.get("peak_allocated_mb") is not None else ""
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return f"{head}: {r['tokens_per_s']:.0f} tok/s{mem}{mfu}"


def run_suite(spec: BenchSpec, out_dir: str | Path | None = None, command: str | None = None, log=None) -> dict:
    """Run every case of `spec`; write results.json after each case, and the table and plot at the end."""
    from offsite_ds.bench.report import default_out_dir, new_results, write_json_atomic, write_report

    suite = Suite(spec, log=log)
    results = new_results(spec, suite.device, command, isolate=suite.isolate)
    out = Path(out_dir) if out_dir else default_out_dir(results)
    out.mkdir(parents=True, exist_ok=True)

    def keep(record: dict) -> None:
        results["runs"].append(record)
        write_json_atomic(out / "results.json", results)

    suite.on_record = keep
    suite.run()
    results["status"] = "complete"
    results["finished"] = utc_stamp()
    write_report(results, out)
    results["out_dir"] = str(out)
    return results
