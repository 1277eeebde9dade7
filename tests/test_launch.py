"""launch/: every recipe's dry run prints a command that both the deepspeed launcher and offsite-ds accept."""
import os
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
STAGES = ("plan", "emulate", "distill", "tune", "plugin", "ft", "ft-lora", "eval")
LAYOUTS = {"opt-6.7b": "2-18-2", "bloom-7b1": "2-12-2"}


def dry_run(script: str, *args: str, tmp_path: Path, **env) -> list[list[str]]:
    """The commands a launch script would run (comment lines dropped), split as the shell would."""
    full_env = {**os.environ, "MODELS": "/m", "WORK": str(tmp_path / "work"), "DISTILL_DATA": "/d/pile.jsonl",
                "TUNE_DATA": "/d/task.jsonl", "RUN_DIR": str(tmp_path / "slurm"), **env}
    proc = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], capture_output=True, text=True,
                          env=full_env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "slurm").exists(), "a dry run wrote files"
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")]


def check_offsite_args(argv: list[str]) -> object:
    """Parse with offsite-ds's own parser: a dry run is valid only if the real command would start."""
    from offsite_ds.cli import build_parser

    try:
        return build_parser(only=argv[0]).parse_args(argv)
    except SystemExit as exc:  # argparse's way to reject
        raise AssertionError(f"offsite-ds rejects {argv}") from exc


def check_command(cmd: list[str]) -> tuple[object, object | None]:
    """(offsite-ds args, launcher args or None) of one printed command."""
    if cmd[0] == "deepspeed":
        from deepspeed.launcher.runner import parse_args

        launcher = parse_args(cmd[1:])
        assert launcher.module and launcher.user_script == "offsite_ds"
        return check_offsite_args(launcher.user_args), launcher
    assert cmd[1:3] == ["-m", "offsite_ds"], cmd
    return check_offsite_args(cmd[3:]), None


@pytest.mark.parametrize("model", sorted(LAYOUTS))
def test_every_stage_prints_a_valid_command(model, tmp_path):
    hostfile = LAUNCH / "hostfile.example"
    for stage in STAGES:
        commands = dry_run(f"{model}.sh", stage, tmp_path=tmp_path, HOSTFILE=str(hostfile))
        assert commands, stage
        for cmd in commands:
            args, launcher = check_command(cmd)
            if launcher is not None:
                assert launcher.hostfile == str(hostfile)
                if args.command in ("distill", "finetune"):
                    assert Path(args.deepspeed).is_file() and args.deepspeed.endswith("zero3.json")
            if args.command in ("emulate", "plan"):
                assert args.layout == LAYOUTS[model]
            if args.command == "plan":
                assert (args.gpus, args.nodes) == (8, 2)  # from the hostfile's slots and lines
            if args.command == "distill":
                assert (args.kd_weight, args.lm_weight, args.lr, args.warmup) == (30.0, 1.0, 1e-4, 2000)
                assert args.bundle.endswith(f"bundle-{LAYOUTS[model]}") and args.data == "/d/pile.jsonl"
            if args.command == "finetune":
                assert args.lr == (1e-4 if args.lora else 2e-5) and args.model == f"/m/{model}"


def test_wrapper_equals_recipe_and_extra_flags_are_appended(tmp_path):
    wrapped = dry_run("opt-6.7b.sh", "ft-lora", "--", "--lora-r", "8", tmp_path=tmp_path, NUM_GPUS="4")
    direct = dry_run("recipe.sh", "opt-6.7b", "ft-lora", "--", "--lora-r", "8", tmp_path=tmp_path, NUM_GPUS="4")
    assert wrapped == direct
    args, launcher = check_command(wrapped[0])
    assert args.lora_r == 8 and launcher.num_gpus == 4 and launcher.hostfile.endswith("hostfile")  # default path


def test_bad_model_or_stage_is_refused(tmp_path):
    for argv in (["recipe.sh", "opt-175b", "distill"], ["recipe.sh", "opt-6.7b", "pretrain"], ["recipe.sh"]):
        proc = subprocess.run(["bash", str(LAUNCH / argv[0]), *argv[1:], "--dry-run"], capture_output=True,
                              text=True, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr


def test_slurm_builds_the_hostfile_and_one_launcher_per_node(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu01\\ngpu02\\ngpu03\\n"\n')
    (fake_bin / "scontrol").chmod(0o755)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_JOB_ID": "77", "SLURM_NODEID": "2", "REPO": str(REPO)}
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "opt-6.7b", "distill", "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, **env, "RUN_DIR": str(tmp_path / "r")},
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "#   gpu01 slots=4\n#   gpu02 slots=4\n#   gpu03 slots=4" in proc.stdout
    assert "PYTHONPATH" in proc.stdout  # .deepspeed_env contents (names only on a dry run)
    [cmd] = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("deepspeed")]
    args, launcher = check_command(cmd)
    assert launcher.no_ssh and launcher.node_rank == 2 and launcher.master_addr == "gpu01"
    assert launcher.num_nodes == 3 and launcher.num_gpus == 4 and args.command == "distill"
    assert not (tmp_path / "r").exists()
    pdsh = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "bloom-7b1", "ft", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, **env, "LAUNCH_MODE": "pdsh", "RUN_DIR": str(tmp_path / "r")})
    [cmd] = [shlex.split(line) for line in pdsh.stdout.splitlines() if line.startswith("deepspeed")]
    assert not check_command(cmd)[1].no_ssh


def test_dry_run_after_the_separator_still_only_prints(tmp_path):
    proc = subprocess.run(["bash", str(LAUNCH / "recipe.sh"), "opt-6.7b", "ft", "--", "--seed", "1", "--dry-run"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "WORK": str(tmp_path / "work")})
    assert proc.returncode == 0 and proc.stdout.startswith("deepspeed ") and proc.stdout.rstrip().endswith("1")
