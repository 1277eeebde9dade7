"""Hostile artifacts end in one line and exit 2, or a correct result: the issue's ten hand-made cases and
a few hundred fuzzed ones, each run through the real CLI in a forked child under RLIMIT_AS with an audit
hook that fails the case if a file outside the artifact (a 'secret' beside it) is opened."""
import importlib.util
import json
import sys
import shutil
from pathlib import Path

import pytest

from offsite_ds.fingerprints import files_fingerprint

_spec = importlib.util.spec_from_file_location("fuzz_artifacts",
                                               Path(__file__).parents[1] / "scripts" / "fuzz_artifacts.py")
fuzz = sys.modules.setdefault("fuzz_artifacts", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fuzz)

CI_CASES = 200


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    seeds = fuzz.build_seeds(root)
    fuzz.warm_up(seeds, root, root / "data.txt")  # imports everything before the first fork
    return root, {s.name: s for s in seeds}


def _run(seed, tmp_path, edit, command="plugin"):
    """Copy the seed, apply `edit(artifact_dir, secret_dir)`, run the receiver's command; (code, stderr)."""
    secret = tmp_path / fuzz.SECRET
    secret.mkdir(parents=True)
    (secret / "hostname").write_text("owner-box-7\n")
    art = tmp_path / "artifact"
    shutil.copytree(seed.path, art)
    edit(art, secret)
    out = tmp_path / "out"
    argv = (["plugin", str(seed.model), str(art), "--out", str(out)] if command == "plugin" else
            ["eval", str(art), "--data", str(seed.model.parent / "data.txt"), "--seq-len", "16"])
    code, stderr, _ = fuzz.run_cli(argv, tmp_path, secret)
    assert fuzz.judge(code, stderr, command) is None, stderr
    return code, stderr.strip().splitlines()[-1] if stderr.strip() else ""


def _settings(key, value):
    def edit(art, secret):
        manifest = fuzz.load(art)
        manifest["mode_settings"][key] = value
        fuzz.save(art, manifest)
    return edit


def _field(key, value):
    def edit(art, secret):
        manifest = fuzz.load(art)
        manifest[key] = value
        fuzz.save(art, manifest)
    return edit


def _absolute_path(art, secret):
    """A listed file with an absolute name and the true size and SHA-256 of the file it names."""
    manifest = fuzz.load(art)
    target = secret / "hostname"
    manifest["files"][str(target)] = {"bytes": target.stat().st_size, "sha256": fuzz.sha(target)}
    fuzz.save(art, manifest)


HAND_MADE = {  # the ten edits of offsite.json (files re-listed, checksums correct)
    "r=2**31": ("opt-lora", _settings("r", 2 ** 31), "mode_settings.r"),
    "r='abc'": ("opt-lora", _settings("r", "abc"), "mode_settings.r"),
    "alpha=[1]": ("opt-lora", _settings("alpha", [1]), "mode_settings.alpha"),
    "absolute path with true sha": ("opt-full", _absolute_path, "not a plain relative path"),
    "adapter_positions=[true]": ("opt-full", _field("adapter_positions", [True]), "adapter_positions.0"),
    "alpha=NaN": ("opt-lora", _settings("alpha", float("nan")), "finite"),
    "r=True": ("opt-lora", _settings("r", True), "mode_settings.r"),
    "r wider than the target": ("opt-lora", _settings("r", 33), "exceeds min(in, out)=32"),
    "dropout=1.0": ("opt-lora", _settings("dropout", 1.0), "mode_settings.dropout"),
    "bottleneck wider than hidden": ("llama-adapter", _settings("bottleneck", 33), "exceeds the hidden size 32"),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_case_is_one_line(seeds, tmp_path, name):
    seed, edit, expected = HAND_MADE[name]
    code, last = _run(seeds[1][seed], tmp_path, edit)
    assert code == 2 and expected in last, last
    assert not (tmp_path / "out").exists()


def test_more_hand_made_cases(seeds, tmp_path):
    """Targets outside the block, block indices outside the model, a bundle's remote code and absurd sizes."""
    _, s = seeds
    cases = [
        ("opt-lora", _settings("targets", ["embed_tokens"]), "is not a linear layer of a opt block", "plugin"),
        ("opt-full", _field("block_map", [0, 1, 3, 4, 99]), "block_map", "plugin"),
        ("opt-full", _field("base_depth", True), "base_depth", "plugin"),
        ("opt-full", _field("surprise", 1), "Extra inputs are not permitted", "plugin"),
    ]
    for i, (seed, edit, expected, command) in enumerate(cases):
        code, last = _run(s[seed], tmp_path / str(i), edit, command)
        assert code == 2 and expected in last, last

    def config_edit(key, value):
        def edit(art, secret):
            config = json.loads((art / "config.json").read_text())
            config[key] = value
            (art / "config.json").write_text(json.dumps(config))
            fuzz.relist(art)
        return edit

    for i, (key, value, expected) in enumerate([("auto_map", {"AutoModelForCausalLM": "evil.Model"}, "auto_map"),
                                                ("vocab_size", 2 ** 40, "vocab_size"),
                                                ("num_hidden_layers", 10 ** 6, "num_hidden_layers"),
                                                ("hidden_size", 48, "config.json needs")]):
        code, last = _run(s["opt-bundle"], tmp_path / f"b{i}", config_edit(key, value), "eval")
        assert code == 2 and expected in last, last


def test_links_and_pickles_are_refused_without_reading_the_target(seeds, tmp_path):
    _, s = seeds

    def symlink(art, secret):
        (art / "adapter.safetensors").unlink()
        (art / "adapter.safetensors").symlink_to(secret / "hostname")

    def hardlink(art, secret):
        (art / "adapter.safetensors").unlink()
        (art / "adapter.safetensors").hardlink_to(secret / "hostname")
        fuzz.relist(art)

    def pickle_renamed(art, secret):
        import torch

        torch.save({"x": torch.zeros(2)}, art / "adapter.safetensors")
        fuzz.relist(art)

    for i, (edit, expected) in enumerate([(symlink, "symbolic link"), (hardlink, "hard links"),
                                          (pickle_renamed, "pickle")]):
        code, last = _run(s["opt-full"], tmp_path / str(i), edit)
        assert code == 2 and expected in last, last


def test_runner_enforces_memory_and_secret_limits(seeds, tmp_path):
    """The fuzzer's guards are live: an allocation past RLIMIT_AS fails, and opening the secret is caught."""
    root, s = seeds
    seed = s["opt-bundle"]
    secret = tmp_path / fuzz.SECRET
    secret.mkdir()
    (secret / "hostname").write_text("x")
    argv = ["eval", str(seed.path), "--data", str(root / "data.txt"), "--seq-len", "16", "--max-tokens", "32"]

    def allocate():
        import torch

        torch.empty(fuzz.MEMORY_BUDGET * 2, dtype=torch.uint8)

    code, stderr, _ = fuzz.run_cli(argv, tmp_path, secret, verify=allocate)
    assert code == 4 and ("can't allocate memory" in stderr or "MemoryError" in stderr), stderr
    code, stderr, _ = fuzz.run_cli(argv, tmp_path, secret, verify=lambda: open(secret / "hostname").read())
    assert code == 3 and "SECRET READ" in stderr


def test_fuzzed_artifacts_end_in_a_result_or_one_line(seeds, tmp_path):
    """A few hundred hypothesis-drawn mutations across every mutation kind; none may escape the contract."""
    root, s = seeds
    counts = fuzz.fuzz(list(s.values()), tmp_path, CI_CASES, seed=0)
    assert counts["failures"] == []
    assert counts["cases"] == CI_CASES and counts["accepted"] > 0 and counts["refused"] > 0
    assert set(counts["by_mutation"]) == {m.__name__ for m in fuzz.BUNDLE_MUTATIONS}


def test_bundle_fingerprint_still_guards_the_file_list(seeds, tmp_path):
    _, s = seeds

    def edit(art, secret):
        manifest = fuzz.load(art)
        manifest["fingerprint"] = files_fingerprint({})
        fuzz.save(art, manifest)

    code, last = _run(s["llama-bundle"], tmp_path, edit, "eval")
    assert code == 2 and "fingerprint does not match" in last


def test_sharded_bf16_bundle_is_accepted_and_its_index_checked(seeds, tmp_path):
    """The streamed writer's format: model-0000i-of-0000n.safetensors + index, in the checkpoint dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    _, s = seeds

    def reshard(art, secret):
        model = AutoModelForCausalLM.from_pretrained(art).to(torch.bfloat16)
        (art / "model.safetensors").unlink()
        model.save_pretrained(art, max_shard_size="40KB")
        assert len(list(art.glob("model-*-of-*.safetensors"))) > 1
        fuzz.relist(art)

    code, last = _run(s["opt-bundle"], tmp_path / "ok", reshard, "eval")
    assert code == 0, last

    def bad_index(art, secret):
        reshard(art, secret)
        index = json.loads((art / "model.safetensors.index.json").read_text())
        name = sorted(index["weight_map"])[0]
        index["weight_map"][name] = "model-00009-of-00009.safetensors"
        (art / "model.safetensors.index.json").write_text(json.dumps(index))
        fuzz.relist(art)

    code, last = _run(s["opt-bundle"], tmp_path / "bad", bad_index, "eval")
    assert code == 2 and "weight_map" in last, last


def test_plugin_refuses_before_loading_the_model(seeds, tmp_path, monkeypatch):
    """Bounds that need the model (r vs. the targets' width) are checked on its config.json alone."""
    import offsite_ds.runtime
    from offsite_ds.errors import ArtifactError
    from offsite_ds.plugin import plugin

    _, s = seeds
    art = tmp_path / "artifact"
    shutil.copytree(s["opt-lora"].path, art)
    _settings("r", 33)(art, None)

    def no_load(*args, **kwargs):
        raise AssertionError("the full model was loaded before the package was validated")

    monkeypatch.setattr(offsite_ds.runtime, "load_model", no_load)
    with pytest.raises(ArtifactError, match="exceeds min"):
        plugin(s["opt-lora"].model, art, tmp_path / "out")
