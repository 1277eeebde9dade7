"""Every refusal of DESIGN.md's list: untrusted artifacts fail validation with one clear line."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite_ds.adapter_package import load_adapter_package
from offsite_ds.bundle import load_bundle
from offsite_ds.cli import main
from offsite_ds.errors import ArtifactError
from offsite_ds.fingerprints import sha256_file
from offsite_ds.plugin import plug_in, plugin


@pytest.fixture
def artifacts(tiny_round_trip):
    """The shared tiny round trip's model, bundle and adapter; every test below edits a copy (_copy)."""
    return tiny_round_trip


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _manifest(path):
    return json.loads((path / "offsite.json").read_text())


def _write_manifest(path, manifest, refresh=None):
    if refresh:
        manifest["files"][refresh] = {"bytes": (path / refresh).stat().st_size, "sha256": sha256_file(path / refresh)}
    (path / "offsite.json").write_text(json.dumps(manifest))


def _rewrite_tensors(adapter, edit):
    """Change adapter.safetensors AND keep the manifest consistent, to reach the deeper checks."""
    tensors = load_file(str(adapter / "adapter.safetensors"))
    edit(tensors)
    save_file(tensors, str(adapter / "adapter.safetensors"))
    manifest = _manifest(adapter)
    manifest["tensors"] = {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                           for n, t in tensors.items()}
    _write_manifest(adapter, manifest, refresh="adapter.safetensors")


def test_flipped_byte_is_a_checksum_mismatch(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    data = bytearray((adapter / "adapter.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (adapter / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_adapter_package(adapter)


def test_bundle_with_flipped_byte_is_refused(artifacts, tmp_path):
    bundle = _copy(artifacts["bundle"], tmp_path)
    data = bytearray((bundle / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (bundle / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_bundle(bundle)


def test_file_larger_than_manifest_says(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    with open(adapter / "adapter.safetensors", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ArtifactError, match="bytes but offsite.json says"):
        load_adapter_package(adapter)


def test_dropped_tensor(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    tensors = load_file(str(adapter / "adapter.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(adapter / "adapter.safetensors"))
    _write_manifest(adapter, _manifest(adapter), refresh="adapter.safetensors")
    with pytest.raises(ArtifactError, match="missing tensor"):
        load_adapter_package(adapter)
    # and with a manifest that agrees with the file, plug-in still knows the tensor is needed
    _rewrite_tensors(adapter, lambda t: None)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(artifacts["model"])
    with pytest.raises(ArtifactError, match="missing tensor"):
        plug_in(model, load_adapter_package(adapter))


def test_changed_shape(artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _copy(artifacts["adapter"], tmp_path)
    name = next(n for n in sorted(load_file(str(adapter / "adapter.safetensors"))) if n.endswith("fc1.weight"))
    _rewrite_tensors(adapter, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    model = AutoModelForCausalLM.from_pretrained(artifacts["model"])
    with pytest.raises(ArtifactError, match="has shape"):
        plug_in(model, load_adapter_package(adapter))


def test_changed_dtype(artifacts, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = _copy(artifacts["adapter"], tmp_path)
    name = sorted(load_file(str(adapter / "adapter.safetensors")))[0]
    _rewrite_tensors(adapter, lambda t: t.__setitem__(name, t[name].to(torch.float16)))
    with pytest.raises(ArtifactError, match="needs torch.float32"):
        plug_in(AutoModelForCausalLM.from_pretrained(artifacts["model"]), load_adapter_package(adapter))


def test_nan_values(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    name = sorted(load_file(str(adapter / "adapter.safetensors")))[0]

    def poison(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = float("nan")
    _rewrite_tensors(adapter, poison)
    with pytest.raises(ArtifactError, match="NaN or Inf"):
        load_adapter_package(adapter)


def test_wrong_format_version(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    manifest = _manifest(adapter)
    manifest["version"] = 99
    _write_manifest(adapter, manifest)
    with pytest.raises(ArtifactError, match="version 99 is not supported"):
        load_adapter_package(adapter)


def test_unknown_format(artifacts, tmp_path):
    with pytest.raises(ArtifactError, match="is not 'offsite-ds.adapter-package'"):
        load_adapter_package(artifacts["bundle"])  # a bundle passed where a package belongs


def test_wrong_family(artifacts, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ArtifactError, match="tuned for family 'opt'"):
        plug_in(AutoModelForCausalLM.from_pretrained(tiny_model_dir("bloom")),
                load_adapter_package(artifacts["adapter"]), check_fingerprint=False)


def test_other_weights_fingerprint_mismatch(artifacts, tmp_path):
    from offsite_ds.tiny import save_tiny_model

    other = save_tiny_model("opt", tmp_path / "other_opt", n_layers=8, seed=123)
    with pytest.raises(ArtifactError, match="tuned against other weights"):
        plugin(other, artifacts["adapter"], tmp_path / "plugged")
    assert not (tmp_path / "plugged").exists(), "nothing half-written"


def test_pickle_file_is_refused(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    torch.save({"x": 1}, adapter / "pytorch_model.bin")
    with pytest.raises(ArtifactError, match="pickle-format"):
        load_adapter_package(adapter)


def test_unlisted_file_and_missing_manifest(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    (adapter / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="not listed"):
        load_adapter_package(adapter)
    (adapter / "offsite.json").unlink()
    with pytest.raises(ArtifactError, match="no offsite.json"):
        load_adapter_package(adapter)


def test_malformed_manifest(artifacts, tmp_path):
    adapter = _copy(artifacts["adapter"], tmp_path)
    (adapter / "offsite.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_adapter_package(adapter)


def test_cli_prints_one_line_and_exits_2(artifacts, tmp_path, capsys):
    adapter = _copy(artifacts["adapter"], tmp_path)
    data = bytearray((adapter / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (adapter / "adapter.safetensors").write_bytes(bytes(data))
    code = main(["plugin", str(artifacts["model"]), str(adapter), "--out", str(tmp_path / "plugged")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "checksum mismatch" in err and "Traceback" not in err
    assert not (tmp_path / "plugged").exists()
