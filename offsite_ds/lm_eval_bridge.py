"""lm-eval 0.4 behind one call: score a model object on lm-eval tasks, local YAML tasks or a JSON file.

The model is wrapped in `HFLM(pretrained=model, tokenizer=...)`, so what is evaluated is exactly the object
in memory (the shipped emulator, the plugged-in model), with no save/load in between. Tasks resolve in
this order: a .json/.jsonl file of question/choices/answer records, a .yaml task file, a task under
`--include-path` or shipped in offsite_ds/tasks/, then lm-eval's own catalogue (whose datasets need the
Hub, so offline that ends in one line saying how to use a local task instead).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
from functools import partial
from pathlib import Path

import torch

from offsite_ds.data import read_json_records
from offsite_ds.errors import DataError, OffsiteError
from offsite_ds.formats import DTYPE_ALIASES

SHIPPED_TASKS = Path(__file__).parent / "tasks"
# The prompt of every question/choices/answer task; tasks/mmlu_demo.yaml uses the same one (a test checks).
CHOICE_PROMPT = "Question: {{question}}\nAnswer:"
JSON_SUFFIXES = (".json", ".jsonl")
YAML_SUFFIXES = (".yaml", ".yml")
LOCAL_TASK_HINT = ("evaluate a local task instead: --include-path DIR holding a YAML task (dataset_path: json, "
                   "dataset_kwargs.data_files relative to the YAML), a .yaml task file, or a .jsonl of "
                   f"question/choices/answer records (examples in {SHIPPED_TASKS})")


# ------------------------------------------------------------------------ question/choices/answer files

def _answer_index(answer, choices: list[str], where: str) -> int:
    """The gold choice as an index: an int, a letter A.., or the text of one choice."""
    if isinstance(answer, bool):
        raise DataError(f"{where}: 'answer' must be an index, a letter or one of the choices, not {answer}")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().isalpha():
        index = ord(answer.strip().upper()) - ord("A")
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    else:
        raise DataError(f"{where}: 'answer' {answer!r} is neither an index, a letter nor one of the choices")
    if not 0 <= index < len(choices):
        raise DataError(f"{where}: 'answer' {answer!r} points outside the {len(choices)} choices")
    return index


def read_choice_records(path: str | Path) -> list[dict]:
    """Validated question/choices/answer records (answer normalised to an index) from .json or .jsonl."""
    rows = read_json_records(path)
    records = []
    for where, row in rows:
        if not isinstance(row, dict) or not {"question", "choices", "answer"} <= set(row):
            raise DataError(f"{where}: each record needs 'question', 'choices' (a list) and 'answer'")
        question, choices = row["question"], row["choices"]
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: 'question' must be text and 'choices' a list of at least two strings")
        records.append({"question": question, "choices": choices,
                        "answer": _answer_index(row["answer"], choices, where)})
    if not records:
        raise DataError(f"{path}: no records; give at least one {{question, choices, answer}}")
    return records


def _choice_dataset(path: str, **_ignored):
    """lm-eval `custom_dataset` hook: the same records serve as train split (tuning) and test split."""
    import datasets

    data = datasets.Dataset.from_list(read_choice_records(path))
    return datasets.DatasetDict({"train": data, "test": data})


def json_task_config(path: str | Path) -> dict:
    """An lm-eval multiple_choice task over a question/choices/answer file (the shipped MMLU task's prompt)."""
    path = Path(path).resolve()
    read_choice_records(path)  # refuse a bad file now, with its line number, not inside lm-eval
    return {
        "task": path.stem,
        "custom_dataset": partial(_choice_dataset, str(path)),
        "output_type": "multiple_choice",
        "training_split": "train",
        "test_split": "test",
        "doc_to_text": CHOICE_PROMPT,
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source": str(path)},
    }


# ---------------------------------------------------------------------------------------- YAML tasks

def _resolve_data_files(data_files, base: Path):
    """Relative data_files in a YAML task are taken relative to the YAML (lm-eval would use the cwd)."""
    if isinstance(data_files, str):
        candidate = base / data_files
        return str(candidate) if "://" not in data_files and not Path(data_files).is_absolute() \
            and candidate.exists() else data_files
    if isinstance(data_files, list):
        return [_resolve_data_files(f, base) for f in data_files]
    if isinstance(data_files, dict):
        return {k: _resolve_data_files(v, base) for k, v in data_files.items()}
    return data_files


def yaml_task_config(path: str | Path) -> dict | None:
    """A single-task YAML as a config dict with its data files resolved; None for a group file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = Path(path).resolve()
    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except Exception as exc:  # YAML syntax, a missing !function module, ...
        raise DataError(f"{path}: not a usable lm-eval task file ({_first_line(exc)})")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str) or "group" in cfg or "class" in cfg:
        return None
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _resolve_data_files(kwargs["data_files"], path.parent)}
    return cfg


# ----------------------------------------------------------------------------------------- loading

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def parse_task_list(tasks: str | list[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (order kept, duplicates dropped)."""
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not names:
        raise OffsiteError("no tasks given: pass --tasks NAME[,NAME...] (an lm-eval task, a local YAML or a .jsonl)")
    return list(dict.fromkeys(names))


def _include_dirs(include_path) -> list[Path]:
    dirs = [SHIPPED_TASKS]
    for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or []):
        path = Path(p)
        if not path.is_dir():
            raise DataError(f"--include-path {path}: no such directory; give a folder holding YAML task files")
        dirs.append(path)
    return dirs


class TaskLoader:
    """Builds lm-eval Task objects from names or files; lm-eval's 15k-task catalogue is indexed only when a
    name is not found locally (indexing it takes seconds)."""

    def __init__(self, include_path: str | Path | list | None = None):
        from lm_eval.tasks import TaskManager

        self.dirs = _include_dirs(include_path)
        self.local = TaskManager(include_path=[str(d) for d in self.dirs], include_defaults=False)
        self._catalogue = None

    @property
    def catalogue(self):
        if self._catalogue is None:
            from lm_eval.tasks import TaskManager

            self._catalogue = TaskManager(include_path=[str(d) for d in self.dirs])
        return self._catalogue

    def _build(self, manager, spec, label: str, local: bool) -> dict:
        try:
            with quiet_lm_eval():
                return manager.load([spec])["tasks"]
        except OffsiteError:
            raise
        except Exception as exc:
            if local:
                raise DataError(f"task '{label}' could not be built ({_first_line(exc)}); check its YAML and data files")
            raise DataError(f"task '{label}' could not load its dataset ({_first_line(exc)}); when offline, "
                            f"{LOCAL_TASK_HINT}")

    def load(self, spec: str) -> dict:
        """{task_name: Task} for one spec (a group expands to its tasks)."""
        path = Path(spec)
        if path.suffix.lower() in JSON_SUFFIXES + YAML_SUFFIXES:
            if not path.is_file():
                raise DataError(f"task file {path}: no such file")
            if path.suffix.lower() in JSON_SUFFIXES:
                return self._build(self.local, json_task_config(path), spec, local=True)
            cfg = yaml_task_config(path)
            return self._build(self.local, cfg if cfg is not None else str(path.resolve()), spec, local=True)
        entry = self.local.task_index.get(spec)
        if entry is not None:
            cfg = yaml_task_config(entry.yaml_path) if entry.yaml_path is not None else None
            return self._build(self.local, cfg if cfg is not None else spec, spec, local=True)
        with quiet_lm_eval():
            known = spec in self.catalogue.task_index
        if not known:
            raise DataError(f"unknown task '{spec}': not an lm-eval task name, not under "
                            f"{', '.join(str(d) for d in self.dirs)}, and not a .yaml/.json/.jsonl file")
        return self._build(self.catalogue, spec, spec, local=False)

    def load_all(self, specs: str | list[str]) -> dict:
        tasks: dict = {}
        for spec in parse_task_list(specs):
            tasks.update(self.load(spec))
        return tasks


def load_tasks(specs: str | list[str], include_path: str | Path | list | None = None) -> dict:
    """{task_name: lm-eval Task} for task names, .yaml task files or question/choices/answer files."""
    return TaskLoader(include_path).load_all(specs)


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs a warning for every model object it wraps and every task it indexes; keep the CLI readable."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    logger.setLevel(max(level, old))
    try:
        yield
    finally:
        logger.setLevel(old)


# -------------------------------------------------------------------------------------- evaluation

def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarise_results(raw: dict) -> dict:
    """lm-eval's result dict -> {task: {metrics, stderr, higher_is_better, n_samples, output_type, headline}}."""
    out = {}
    for task, values in raw["results"].items():
        entries = [(*key.partition(",")[::2], value) for key, value in values.items()
                   if "," in key and _clean(value) is not None]
        filters: dict[str, int] = {}
        for name, _, _ in entries:
            filters[name] = filters.get(name, 0) + 1
        metrics, stderr = {}, {}
        for name, filt, value in entries:  # 'acc,none' -> 'acc'; a filter is named only when several ran
            label = name if filt == "none" or filters[name] == 1 else f"{name},{filt}"
            if label.split(",")[0].endswith("_stderr"):
                stderr[label.replace("_stderr", "", 1)] = value
            else:
                metrics[label] = value
        config = raw.get("configs", {}).get(task, {})
        listed = [m.get("metric") for m in config.get("metric_list", []) if isinstance(m, dict)]
        headline = next((m for m in listed if m in metrics), next(iter(metrics), None))
        n = raw.get("n-samples", {}).get(task, {})
        out[task] = {
            "metric": headline,
            "value": metrics.get(headline),
            "higher_is_better": raw.get("higher_is_better", {}).get(task, {}).get(headline),
            "metrics": metrics,
            "stderr": stderr,
            "n_samples": n.get("effective"),
            "n_docs": n.get("original"),
            "output_type": config.get("output_type"),
        }
    return out


HFLM_LOGITS_BUDGET = 4 << 30  # bytes of fp32 logits (+ their log-softmax) one HFLM batch may hold


def fitting_batch_size(model: torch.nn.Module, requested: int, max_length: int | None,
                       budget: int = HFLM_LOGITS_BUDGET) -> int:
    """The largest batch <= `requested` whose HFLM logits fit `budget`.

    lm-eval's HFLM is its own code: it materialises [batch, length, vocabulary] fp32 logits and their
    log-softmax (8 bytes per entry), e.g. 4.3 GB per 2048-token sequence at a 262,144-token vocabulary,
    so the batch is capped instead.
    """
    from offsite_ds.data import max_positions

    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    length = max_length or min(max_positions(model.config) or 2048, 2048)  # typical task lengths, unless given
    per_sequence = 8 * vocab * length
    return max(1, min(requested, budget // per_sequence)) if per_sequence else requested


def run_tasks(model: torch.nn.Module, tokenizer, tasks: str | list[str] | dict,
              include_path: str | Path | list | None = None, limit: int | float | None = None,
              batch_size: int = 1, num_fewshot: int | None = None, bootstrap_iters: int = 1000,
              max_length: int | None = None) -> dict:
    """Evaluate `model` (already on its device) on `tasks` through lm-eval's HFLM; returns
    {task: {metric, value, higher_is_better, metrics, stderr, n_samples, n_docs, output_type}}.

    `tasks` is a list/comma string of specs, or the {name: Task} dict of `load_tasks` (reused across
    models, so datasets are read once).
    """
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if limit is not None and limit <= 0:
        raise OffsiteError(f"--limit {limit} must be > 0")
    if batch_size < 1:
        raise OffsiteError(f"--batch-size {batch_size} must be >= 1")
    task_objects = tasks if isinstance(tasks, dict) else load_tasks(tasks, include_path)
    was_training = model.training
    model.eval()
    fitting = fitting_batch_size(model, batch_size, max_length)
    if fitting < batch_size:
        print(f"lm-eval batch size {batch_size} -> {fitting}: its logits of a {model.config.vocab_size}-token "
              f"vocabulary would exceed {HFLM_LOGITS_BUDGET >> 30} GiB", file=sys.stderr)
    with quiet_lm_eval():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=fitting, max_length=max_length)
        raw = simple_evaluate(model=lm, tasks=list(task_objects.values()), limit=limit, num_fewshot=num_fewshot,
                              bootstrap_iters=bootstrap_iters, log_samples=False,
                              task_manager=TaskManager(include_defaults=False))
    if was_training:
        model.train()
    return summarise_results(raw)


# ----------------------------------------------------------------------------------- placement

def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """'auto' -> bf16 on CUDA (the paper's 7B models fit one GPU so), fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPE_ALIASES:
        raise OffsiteError(f"--dtype {dtype}: choose auto, fp32, bf16 or fp16")
    return DTYPE_ALIASES[dtype]


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OffsiteError(f"--device {device}: CUDA is not available here; use --device cpu")
    return device


def place_model(model: torch.nn.Module, device: str = "auto", dtype: str = "auto",
                device_map: str | None = None) -> torch.nn.Module:
    """Cast and move a model for evaluation; `device_map='auto'` shards it over the visible GPUs (and CPU
    memory when they are full) through accelerate, for a model that does not fit one device."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    model = model.to(dtype=torch_dtype)  # cast on the host first: a 7B model in bf16 is half the transfer
    if device_map is None:
        return model.to(device)
    if device_map != "auto":
        raise OffsiteError(f"--device-map {device_map}: only 'auto' is supported")
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    max_memory = get_balanced_memory(model, dtype=torch_dtype, no_split_module_classes=no_split)
    placement = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                      dtype=torch_dtype)
    return dispatch_model(model, device_map=placement)
