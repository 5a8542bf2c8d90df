"""Loading hub-style checkpoint directories through FMS's own entry points."""

import json
import shutil

import fms.models
import pytest
import torch
from safetensors.torch import load_file, save_file

from fms_speech import checkpoint
from fms_speech.models.granite_speech import build_granite_speech_params
from fms_speech.testing.reference import index_shards, prompt_ids, relative_error


def _logits(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(1, 30, 160, generator=generator)
    ids = torch.tensor([prompt_ids(int(model.audio_token_counts(features).item()))])
    with torch.no_grad():
        return model(ids, input_features=features)


def _all_weights(directory):
    weights = {}
    for shard in index_shards(directory):
        weights.update(load_file(directory / shard))
    return weights


def _copy_without_weights(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model*.safetensors*"))
    return target


@pytest.fixture(scope="module")
def saved(checkpoints):
    reference, model, directory = checkpoints["odd_layers_even_kernel"]
    return model, directory, _logits(model)


def test_checkpoint_uses_transformers_4_names_and_shards(saved):
    _, directory, _ = saved
    names = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(name.startswith("language_model.model.") for name in names)
    assert any(name.startswith("encoder.layers.0.conv.batch_norm.running_var") for name in names)
    assert len(index_shards(directory)) > 1


@pytest.fixture
def with_orphans(saved, tmp_path):
    _, directory, _ = saved
    target = tmp_path / "with_orphans"
    shutil.copytree(directory, target)
    # an older, incompatible shard set beside the indexed one, as on the hub
    orphan = {"encoder.out.weight": torch.zeros(42, 32), "encoder.out.bias": torch.zeros(42)}
    save_file(orphan, target / "model-00001-of-00003.safetensors")
    return target


def test_fms_alone_reads_the_orphaned_shard_set(with_orphans):
    # why index_aware_loading exists: FMS globs every *.safetensors (ibm-fms 1.13.1)
    with pytest.raises(ValueError, match="shape mismatch for encoder.out"):
        fms.models.get_model("hf_pretrained", model_path=str(with_orphans))


def test_index_aware_loading_ignores_the_orphaned_shard_set(saved, with_orphans):
    _, _, expected = saved
    with checkpoint.index_aware_loading():
        loaded = fms.models.get_model("hf_pretrained", model_path=str(with_orphans)).eval()
    assert relative_error(_logits(loaded), expected) == 0.0


def test_index_aware_loading_is_undone_on_exit(with_orphans):
    from fms.utils import serialization

    fms_loader = serialization.load_state_dict
    with pytest.raises(RuntimeError), checkpoint.index_aware_loading():
        assert serialization.load_state_dict is not fms_loader
        raise RuntimeError("leaves the block")
    assert serialization.load_state_dict is fms_loader


def test_transformers_5_names_single_file(saved, tmp_path):
    model, directory, expected = saved
    target = _copy_without_weights(directory, tmp_path / "v5")
    renamed = {}
    for name, tensor in _all_weights(directory).items():
        for old, new in (
            ("encoder.", "model.encoder."),
            ("projector.", "model.projector."),
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
        ):
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        renamed[name] = tensor
    save_file(renamed, target / "model.safetensors")
    loaded = fms.models.get_model("hf_pretrained", model_path=str(target)).eval()
    assert relative_error(_logits(loaded), expected) == 0.0


def test_adapter_with_transformers_4_key_names(saved, tmp_path):
    model, directory, expected = saved
    target = tmp_path / "adapter_v4"
    shutil.copytree(directory, target)
    adapter = load_file(directory / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.language_model.") for k in adapter)
    renamed = {
        k.replace(
            "base_model.model.model.language_model.", "base_model.model.language_model.model."
        ): v
        for k, v in adapter.items()
    }
    save_file(renamed, target / "adapter_model.safetensors")
    loaded = fms.models.get_model("hf_pretrained", model_path=str(target)).eval()
    assert relative_error(_logits(loaded), expected) == 0.0


def test_adapter_scaling_comes_from_its_config(saved, tmp_path):
    model, directory, expected = saved
    target = tmp_path / "alpha"
    shutil.copytree(directory, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["lora_alpha"] *= 2
    (target / "adapter_config.json").write_text(json.dumps(config))
    loaded = fms.models.get_model("hf_pretrained", model_path=str(target)).eval()
    first = next(m for m in loaded.modules() if hasattr(m, "lora_q_b"))
    original = next(m for m in model.modules() if hasattr(m, "lora_q_b"))
    torch.testing.assert_close(first.lora_v_b, 2 * original.lora_v_b)


def test_variant_path_with_source_hf(saved):
    model, directory, expected = saved
    from transformers import AutoConfig

    params = build_granite_speech_params(AutoConfig.from_pretrained(directory))
    loaded = fms.models.get_model(
        "granite_speech", "3.3-2b", model_path=str(directory), source="hf", **params
    ).eval()
    assert relative_error(_logits(loaded), expected) == 0.0


def test_wrong_variant_names_the_mismatched_shape(saved):
    _, directory, _ = saved
    # whichever tensor group FMS loads first (a set's order) names its key and shapes
    with pytest.raises(ValueError, match=r"shape mismatch for \S+: checkpoint (\(|tensors \()"):
        fms.models.get_model("granite_speech", "3.3-2b", model_path=str(directory), source="hf")


def test_missing_weight_is_named(saved, tmp_path):
    _, directory, _ = saved
    target = _copy_without_weights(directory, tmp_path / "missing")
    weights = _all_weights(directory)
    del weights["encoder.layers.1.conv.batch_norm.running_mean"]
    save_file(weights, target / "model.safetensors")
    with pytest.raises(
        ValueError, match="missing 1 weights: encoder.layers.1.conv.batch_norm.running_mean"
    ):
        fms.models.get_model("hf_pretrained", model_path=str(target))


def test_unexpected_key_is_named(saved, tmp_path):
    _, directory, _ = saved
    target = _copy_without_weights(directory, tmp_path / "unexpected")
    weights = _all_weights(directory)
    weights["encoder.layers.0.attn.bogus.weight"] = torch.zeros(3)
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected key.*encoder.layers.0.attn.bogus.weight"):
        fms.models.get_model("hf_pretrained", model_path=str(target))


def test_index_naming_an_absent_shard_fails_clearly(saved, tmp_path):
    _, directory, _ = saved
    target = tmp_path / "absent"
    shutil.copytree(directory, target)
    first = index_shards(directory)[0]
    (target / first).unlink()
    with pytest.raises(FileNotFoundError, match=first), checkpoint.index_aware_loading():
        fms.models.get_model("hf_pretrained", model_path=str(target))


def test_without_adapter_builds_no_lora(saved, tmp_path):
    model, directory, _ = saved
    target = tmp_path / "no_adapter"
    shutil.copytree(directory, target)
    (target / "adapter_model.safetensors").unlink()
    loaded = fms.models.get_model("hf_pretrained", model_path=str(target)).eval()
    assert loaded.config.lora_rank == 0
    assert not any("lora" in name for name, _ in loaded.named_parameters())


# ---- granite_speech5 (CTC) checkpoints


@pytest.fixture(scope="module")
def saved_ctc(ctc_checkpoints):
    _, model, directory = ctc_checkpoints["ctc_untied_late_subsampling"]
    features = torch.randn(1, 30, 320, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, directory, features, model(features)


def test_ctc_checkpoint_is_sharded_with_the_references_names(saved_ctc):
    _, directory, _, _ = saved_ctc
    names = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(index_shards(directory)) > 1
    assert "encoder.layers.0.self_attn.k_proj.weight" in names  # fused into to_kv on load
    assert "encoder.layers.0.conv.norm.running_var" in names  # the BatchNorm
    assert "ctc_head.weight" in names  # untied


def test_ctc_missing_weight_is_named(saved_ctc, tmp_path):
    _, directory, _, _ = saved_ctc
    target = _copy_without_weights(directory, tmp_path / "ctc_missing")
    weights = _all_weights(directory)
    del weights["encoder.layers.2.conv.norm.running_mean"]  # the BatchNorm: float32 and kept
    save_file(weights, target / "model.safetensors")
    with pytest.raises(
        ValueError, match="missing 1 weights: encoder.layers.2.conv.batch_norm.running_mean"
    ):
        fms.models.get_model("hf_pretrained", model_path=str(target))


def test_ctc_unexpected_key_and_lone_key_projection_are_named(saved_ctc, tmp_path):
    _, directory, _, _ = saved_ctc
    target = _copy_without_weights(directory, tmp_path / "ctc_unexpected")
    weights = _all_weights(directory)
    weights["decoder.weight"] = torch.zeros(3)
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys in the checkpoint: decoder.weight"):
        fms.models.get_model("hf_pretrained", model_path=str(target))
    del weights["decoder.weight"], weights["encoder.layers.1.self_attn.v_proj.weight"]
    save_file(weights, target / "model.safetensors")
    with pytest.raises(ValueError, match="self_attn.k_proj but not its pair"):
        fms.models.get_model("hf_pretrained", model_path=str(target))


def test_ctc_loads_in_bfloat16_with_a_float32_batch_norm(saved_ctc):
    model, directory, features, expected = saved_ctc
    loaded = fms.models.get_model(
        "hf_pretrained", model_path=str(directory), data_type=torch.bfloat16
    ).eval()
    norm = loaded.encoder.layers[0].conv.batch_norm
    assert norm.running_var.dtype == torch.float32
    # the checkpoint's float32 statistics arrive unrounded
    torch.testing.assert_close(
        norm.running_var, model.encoder.layers[0].conv.batch_norm.running_var, rtol=0, atol=0
    )
    with torch.no_grad():
        logits = loaded(features)
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, expected) < 0.05  # bf16 rounding, not a wrong mapping
