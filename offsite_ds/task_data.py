"""Task-format fine-tuning data: the paper tunes on each task's training split, as prompt + answer.

The prompt is built by lm-eval's own Task object (`fewshot_context` + `construct_requests`), so it is
byte for byte the context the evaluation scores, and it is split into tokens by lm-eval's rule for
(context, continuation) pairs; only the answer tokens carry labels (the prompt is -100). Examples are
padded per batch (pads: attention 0, label -100) by a loader with the interface of data.BlockLoader,
so the one training loop takes either.
"""
from __future__ import annotations

import torch

from offsite_ds.data import BlockLoader, start_token_id
from offsite_ds.errors import DataError

IGNORE_INDEX = -100
SPLITS = ("train", "validation", "test")


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split exactly as lm-eval's HFLM does for a causal model.

    Trailing spaces of the context move to the continuation; the pair is tokenised whole and the
    continuation is what follows the context's own tokens. An empty context becomes the BOS (or EOS)
    token, as lm-eval conditions rolling log-likelihoods on it.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = start_token_id(tokenizer)
        if prefix is None:
            raise DataError("the tokenizer has neither a BOS nor an EOS token to condition an empty prompt on")
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


def _gold_text(task, doc) -> str:
    """The reference answer of a generation task as text (the first one when several are accepted)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0] if target else ""
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    return str(target)


def _gold_index(task, doc) -> int:
    if getattr(task, "multiple_input", 0):  # e.g. Winogrande: the prompt varies, doc_to_text is the gold index
        return int(task.doc_to_text(doc))
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, str):
        choices = task.doc_to_choice(doc)
        target = choices.index(target) if target in choices else int(target)
    return int(target)


def prompt_and_answer(task, doc, eos_token: str | None = None) -> tuple[str, str]:
    """(context, continuation) of one document: the evaluation's prompt and the gold answer after it."""
    output_type = task.config.output_type
    context = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
    requests = task.construct_requests(doc=doc, ctx=context, metadata=(task.config.task, 0, 1))
    if output_type == "multiple_choice":  # one request per choice, in choice order: take the gold one
        return tuple(requests[_gold_index(task, doc)].arguments[:2])
    if output_type in ("loglikelihood", "loglikelihood_rolling"):
        args = requests.arguments
        return ("", args[0]) if output_type == "loglikelihood_rolling" else (args[0], args[1])
    if output_type == "generate_until":
        ctx, gen_kwargs = requests.arguments[:2]
        until = (gen_kwargs or {}).get("until") or []
        stop = until[0] if isinstance(until, list) and until else until if isinstance(until, str) else eos_token
        # teach the stop too, so greedy generation ends where the evaluation cuts it
        return ctx, f"{task.config.target_delimiter}{_gold_text(task, doc)}{stop or ''}"
    raise DataError(f"task '{task.config.task}': output type '{output_type}' has no answer to train on")


def split_documents(task, split: str):
    """The documents of `split` ('train', 'validation' or 'test') as lm-eval processes them."""
    if split not in SPLITS:
        raise DataError(f"--task-split {split}: choose one of {', '.join(SPLITS)}")
    has = {"train": task.has_training_docs, "validation": task.has_validation_docs, "test": task.has_test_docs}
    if not has[split]():
        available = [s for s in SPLITS if has[s]()]
        raise DataError(f"task '{task.config.task}' has no {split} split; pass --task-split "
                        f"{' or '.join(available) or '(none available)'}")
    return {"train": task.training_docs, "validation": task.validation_docs, "test": task.test_docs}[split]()


def resolve_task(task_or_file, include_path=None):
    """One lm-eval Task from a Task object, a task name, a .yaml file or a question/choices/answer file."""
    if hasattr(task_or_file, "construct_requests"):
        return task_or_file
    from offsite_ds.lm_eval_bridge import load_tasks

    tasks = load_tasks([str(task_or_file)], include_path)
    if len(tasks) != 1:
        raise DataError(f"--task {task_or_file} names a group of {len(tasks)} tasks; tune on one task at a time")
    return next(iter(tasks.values()))


def task_examples(task_or_file, tokenizer, split: str = "train", include_path=None,
                  max_length: int | None = None, limit: int | None = None) -> list[dict[str, list[int]]]:
    """Prompt + answer examples: {'input_ids': [...], 'labels': [...]} with the prompt's labels -100.

    Longer than `max_length`, an example keeps its last tokens (the answer), as lm-eval truncates.
    """
    task = resolve_task(task_or_file, include_path)
    docs = split_documents(task, split)
    examples = []
    for i, doc in enumerate(docs):
        if limit is not None and i >= limit:
            break
        context, answer = prompt_and_answer(task, doc, tokenizer.eos_token)
        ctx, cont = encode_pair(tokenizer, context, answer)
        if not cont:
            continue
        ids, labels = ctx + cont, [IGNORE_INDEX] * len(ctx) + cont
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[-max_length:], labels[-max_length:]
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise DataError(f"task '{task.config.task}' gave no training examples from its {split} split")
    return examples


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch: pads get attention 0 and label -100."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class ExampleLoader(BlockLoader):
    """Batches of task examples, padded per batch; same order, resume and rank split as BlockLoader."""

    def __init__(self, examples: list[dict[str, list[int]]], batch_size: int, pad_id: int, shuffle: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if len(examples) // world_size < batch_size:
            raise DataError(f"only {len(examples)} task examples for {world_size} rank(s) x batch size "
                            f"{batch_size}; lower --batch-size or use a larger split")
        super().__init__(examples, batch_size, shuffle, seed, rank, world_size)
        self.pad_id = pad_id

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        return pad_batch([self.blocks[i] for i in self.batch_indices(epoch, index).tolist()], self.pad_id)


def task_loader(task_or_file, tokenizer, batch_size: int, split: str = "train", include_path=None,
                max_length: int | None = None, limit: int | None = None, shuffle: bool = True, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> ExampleLoader:
    """A training loader over a task's split (what `offsite-ds tune --task` trains on)."""
    examples = task_examples(task_or_file, tokenizer, split, include_path, max_length, limit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return ExampleLoader(examples, batch_size, pad_id if pad_id is not None else 0, shuffle, seed, rank, world_size)
