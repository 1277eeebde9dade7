"""The owner's commands streamed from the shards: equal to the in-memory path, bounded, dtype-preserving."""
import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import FAMILIES
from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.bundle import load_bundle
from offsite_ds.emulator import build_emulator, make_bundle
from offsite_ds.errors import ArtifactError, OffsiteError
from offsite_ds.fingerprints import fingerprint_model
from offsite_ds.plugin import load_model_dir, plug_in, plugin
from offsite_ds.roles.tune_adapter import tune
from offsite_ds.runtime import load_model
from offsite_ds.sandwich import Layout
from offsite_ds.formats import WEIGHTS_INDEX as INDEX
from offsite_ds.shards import CheckpointReader, ModelCheckpoint, ShardWriter
from offsite_ds.train import TrainConfig


def _assert_same(got: dict, ref: dict):
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))[:3]
    for name in ref:
        assert got[name].dtype == ref[name].dtype and torch.equal(got[name], ref[name]), name


def test_shard_writer_round_trip_and_hostile_header(tmp_path):
    tensors = {f"t{i}": torch.randn(10, 7).to(dt) for i, dt in enumerate([torch.float32, torch.bfloat16] * 3)}
    tensors["flag"] = torch.tensor([True, False])
    writer = ShardWriter(tmp_path, [(n, list(t.shape), t.dtype) for n, t in tensors.items()], max_shard_bytes=300)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert INDEX in files and len(files) > 3  # several bounded shards + the index
    index = json.loads((tmp_path / INDEX).read_text())
    assert set(index["weight_map"]) == set(tensors)
    reader = CheckpointReader(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(reader.get(name), t) and reader.get(name).dtype == t.dtype
        assert torch.equal(reader.read_flat(name, 3, 9), t.reshape(-1)[3:9])
    with safe_open(str(tmp_path / index["weight_map"]["t1"]), framework="pt") as f:  # readable by safetensors
        assert torch.equal(f.get_tensor("t1"), tensors["t1"])
    other = ShardWriter(tmp_path / "x", [("a", [2], torch.float32), ("b", [2], torch.float32)])
    (tmp_path / "x").mkdir()
    with pytest.raises(OffsiteError, match="not the planned"):
        other.add("b", torch.zeros(2))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((10 ** 9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ArtifactError, match="corrupt safetensors header"):
        CheckpointReader(bad)


@pytest.mark.parametrize("family,method", [(f, "drop") for f in FAMILIES] + [("opt", "prune"), ("llama", "quantize")])
def test_streamed_bundle_equals_in_memory_emulator(family, method, tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir(family)
    bundle = make_bundle(model_dir, "2-2-2", tmp_path / "b", method=method, max_shard_bytes=20_000, select="uniform",
                         calib_data=None).path
    manifest = json.loads((bundle / "offsite.json").read_text())
    full = load_model(model_dir)
    assert manifest["base_fingerprint"] == fingerprint_model(full)  # from the shards == from the model
    assert manifest["dtype"] == "float32" and INDEX in manifest["files"]  # sharded, every file listed
    emulator, block_map = build_emulator(full, Layout(2, 2, 2), method)
    assert manifest["block_map"] == block_map
    _assert_same(load_bundle(bundle).model.state_dict(), emulator.state_dict())


def _cfg():
    return TrainConfig(steps=2, lr=5e-3, batch_size=2, progress=False)


@pytest.mark.parametrize("family,mode", [("llama", "full"), ("opt", "lora"), ("opt", "adapter"), ("bloom", "bitfit")])
def test_streamed_plugin_equals_in_memory_plug_in(family, mode, tiny_model_dir, tiny_bundle, corpus_file, tmp_path):
    model_dir = tiny_model_dir(family)
    bundle = tiny_bundle(family)
    tune(bundle, corpus_file, tmp_path / "adapter", mode=mode, cfg=_cfg(), seq_len=32)
    package = load_adapter_package(tmp_path / "adapter")
    plugged = plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged", max_shard_bytes=20_000)
    assert (plugged / INDEX).is_file()
    model, _ = load_model_dir(plugged)
    _assert_same(model.state_dict(), plug_in(load_model(model_dir), package).state_dict())


def test_bf16_checkpoint_stays_bf16_through_the_round_trip(corpus_file, tmp_path):
    from offsite_ds.tiny import byte_tokenizer, tiny_model

    model_dir = tmp_path / "bf16"
    tiny_model("llama", n_layers=6).to(torch.bfloat16).save_pretrained(model_dir, max_shard_size="20KB")
    byte_tokenizer().save_pretrained(model_dir)
    assert (model_dir / INDEX).is_file()
    bundle = make_bundle(model_dir, "1-2-1", tmp_path / "bundle", select="uniform", calib_data=None).path
    manifest = json.loads((bundle / "offsite.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    reader = CheckpointReader(bundle)
    assert {reader.dtype(n) for n in reader.names()} == {torch.bfloat16}
    assert manifest["base_fingerprint"] == fingerprint_model(load_model(model_dir))
    assert json.loads((bundle / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = make_bundle(model_dir, "1-2-1", tmp_path / "fp32", dtype="float32", select="uniform", calib_data=None).path
    assert json.loads((fp32 / "offsite.json").read_text())["dtype"] == "float32"

    tune(bundle, corpus_file, tmp_path / "adapter", mode="full", cfg=_cfg(), seq_len=32)
    plugged = plugin(model_dir, tmp_path / "adapter", tmp_path / "plugged")
    out = CheckpointReader(plugged)
    assert {out.dtype(n) for n in out.names()} == {torch.bfloat16}
    base = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    new = AutoModelForCausalLM.from_pretrained(plugged).state_dict()
    changed = {n for n in base if not torch.equal(base[n], new[n])}
    assert changed and all(n.startswith(("model.layers.0.", "model.layers.5.")) for n in changed)


def test_plugin_refuses_other_weights_before_writing(tiny_bundle, corpus_file, tmp_path):
    from offsite_ds.tiny import save_tiny_model

    bundle = tiny_bundle("opt")
    tune(bundle, corpus_file, tmp_path / "adapter", mode="bitfit", cfg=_cfg(), seq_len=32)
    other = save_tiny_model("opt", tmp_path / "other", n_layers=8, seed=1)
    with pytest.raises(ArtifactError, match="base fingerprint"):
        plugin(other, tmp_path / "adapter", tmp_path / "plugged")
    assert not (tmp_path / "plugged").exists()
    with pytest.raises(OffsiteError, match="no config.json"):
        make_bundle(tmp_path / "adapter", "2-2-2", tmp_path / "b2", select="uniform", calib_data=None)


def test_checkpoint_names_as_older_checkpoints_store_them(tiny_model_dir, tiny_bundle, tmp_path, monkeypatch):
    """No base-model prefix (as GPT-2/OPT/BLOOM hub checkpoints) and stale buffers: read as from_pretrained does."""
    import shutil

    source = tiny_model_dir("gpt2")
    reader = CheckpointReader(source)
    tensors = {name.removeprefix("transformer."): reader.get(name) for name in reader.names()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)  # the causal-mask buffer old checkpoints carry
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, legacy / file.name)
    writer = ShardWriter(legacy, [(n, list(t.shape), t.dtype) for n, t in tensors.items()])
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    a_dir = tiny_bundle("gpt2")  # the bundle of the checkpoint as transformers writes it
    a = load_bundle(a_dir).model.state_dict()
    b_dir = make_bundle(legacy, "2-2-2", tmp_path / "b", select="uniform", calib_data=None).path
    _assert_same(load_bundle(b_dir).model.state_dict(), a)
    assert json.loads((b_dir / "offsite.json").read_text())["base_fingerprint"] == \
        json.loads((a_dir / "offsite.json").read_text())["base_fingerprint"]
    reader.entries.pop("transformer.h.3.mlp.c_fc.weight")  # a missing tensor is refused, not left random
    monkeypatch.setattr("offsite_ds.shards.CheckpointReader", lambda _dir: reader)
    with pytest.raises(OffsiteError, match="lacks tensor 'transformer.h.3.mlp.c_fc.weight'"):
        ModelCheckpoint(source)
