import json

import pytest

from blueberry.configs import (PRESETS, AdaptiveMoEModelConfig, get_config, get_development_config,
                               get_rtx5090_config, load_config_file)
from blueberry.errors import ConfigError


def test_default_config_is_resolved_from_hardware():
    c = AdaptiveMoEModelConfig(device="cpu").validate()
    assert c.d_model and c.batch_size and c.max_steps and c.lr
    assert "batch_size" in c.auto_fields
    assert c.use_fp8 is False  # CPU has no FP8


def test_the_device_picks_the_model_type_unless_the_user_does():
    """A CPU trains the dense recipe (the measured winner there, docs/LOG.md); a CUDA device the MoE."""
    from blueberry.configs.adaptive_moe_config import _hardware_defaults
    from blueberry.system import capabilities_for_device

    cpu = AdaptiveMoEModelConfig(device="cpu").validate()
    assert cpu.model_type == "standard" and "model_type" in cpu.auto_fields and cpu.model.architecture == "standard"
    assert AdaptiveMoEModelConfig(device="cpu", model_type="moe").model_type == "moe"
    assert AdaptiveMoEModelConfig(device="cpu", layers="attn:moe").model.layer_pattern[0].ffn == "moe"
    gpu = capabilities_for_device("cuda", device_name="NVIDIA H100", compute_capability=(9, 0), memory_gb=80.0)
    assert _hardware_defaults(gpu, AdaptiveMoEModelConfig(device="cpu"))["model_type"] == "moe"
    assert get_config("h100", device="cpu", use_fp8=False).model_type == "moe"  # a GPU preset names its MoE


def test_user_values_are_never_changed():
    c = AdaptiveMoEModelConfig(batch_size=3, d_model=96, n_heads=3, lr=0.123, device="cpu").validate()
    assert (c.batch_size, c.d_model, c.lr) == (3, 96, 0.123)
    assert "batch_size" not in c.auto_fields


def test_presets_exist_and_validate():
    for name in ("dev", "default", "cpu", "rtx4090", "rtx5090", "h100", "production"):
        assert name in PRESETS
        cfg = get_config(name, device="cpu", use_fp8=False)
        cfg.validate()
    assert get_development_config().d_model == PRESETS["dev"]["d_model"]
    assert get_rtx5090_config(use_fp8=False).d_model == 768


@pytest.mark.parametrize("kw,field", [
    (dict(d_model=-1), "d_model"),
    (dict(batch_size=0), "batch_size"),
    (dict(d_model=100, n_heads=3), "d_model"),
    (dict(expert_top_k=9, num_experts=8), "expert_top_k"),
    (dict(lr=-0.1), "lr"),
    (dict(model_type="rnn"), "model_type"),
    (dict(n_kv_heads=3, n_heads=4), "n_kv_heads"),
    (dict(val_fraction=0.9), "val_fraction"),
])
def test_invalid_values_name_the_field(kw, field):
    with pytest.raises(ConfigError) as e:
        AdaptiveMoEModelConfig(device="cpu", **kw).validate()
    assert e.value.field == field


def test_fp8_request_on_cpu_is_an_error():
    with pytest.raises(ConfigError, match="FP8"):
        AdaptiveMoEModelConfig(device="cpu", use_fp8=True).validate()


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset"):
        get_config("huge")


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("preset: dev\nd_model: 64\nnum-experts: 2\n")
    fields = load_config_file(y)
    assert fields["d_model"] == 64 and fields["num_experts"] == 2 and fields["n_layers"] == PRESETS["dev"]["n_layers"]
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"d_model": 48, "n_heads": 4}))
    assert load_config_file(j)["d_model"] == 48


def test_unknown_keys_are_errors(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("d_model: 64\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config_file(y)


def test_round_trip_dict():
    c = AdaptiveMoEModelConfig(device="cpu").validate()
    d = AdaptiveMoEModelConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert d.d_model == c.d_model and d.adamw_betas == c.adamw_betas
