"""Model configs and checkpoint loading (CPU), checked against transformers' own files."""

import json

import pytest
import torch

from cf_cute.models import BUILTIN_CONFIGS, ModelConfig, expected_shapes, load_checkpoint, model_config, random_weights

transformers = pytest.importorskip("transformers")


def _tiny_hf(tmp_path, *, kv_heads=2, scaling=None, shard="200KB", tie=False):
    kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=kv_heads, head_dim=64, vocab_size=320, max_position_embeddings=512,
              tie_word_embeddings=tie)
    if scaling:
        kw["rope_parameters"] = dict(scaling, rope_theta=500000.0)
    cfg = transformers.LlamaConfig(**kw)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size=shard)
    return model


@pytest.mark.parametrize("shard", ["200KB", "50MB"])          # sharded with an index / a single file
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_load_matches_transformers(tmp_path, shard, kv_heads):
    model = _tiny_hf(tmp_path, kv_heads=kv_heads, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").is_file() == (shard == "200KB")
    cfg, w = load_checkpoint(tmp_path, dtype=torch.float16)
    assert cfg.num_kv_heads == kv_heads and cfg.head_dim == 64 and cfg.num_layers == 2
    sd = model.state_dict()
    assert set(w) == set(expected_shapes(cfg))
    for name, t in w.items():
        assert t.dtype == torch.float16
        torch.testing.assert_close(t, sd[name].to(torch.float16), rtol=0, atol=0)


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    _tiny_hf(tmp_path, scaling=scaling, tie=True)
    cfg, w = load_checkpoint(tmp_path)
    assert cfg.rope_scaling_dict["factor"] == 32.0 and cfg.rope_theta == 500000.0
    assert cfg.tie_word_embeddings and "lm_head.weight" not in w


def test_bad_checkpoints_are_named(tmp_path):
    _tiny_hf(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).rename(tmp_path / "moved.bin")
    with pytest.raises(ValueError, match="missing: " + shard):
        load_checkpoint(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / shard)
    name = "model.layers.1.mlp.down_proj.weight"
    del index["weight_map"][name]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lacks " + name.replace(".", r"\.")):
        load_checkpoint(tmp_path)


def test_wrong_shapes_and_architectures(tmp_path):
    _tiny_hf(tmp_path, shard="50MB")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 768
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"has shape \[512, 256\], expected \[768, 256\]"):
        load_checkpoint(tmp_path)
    for change, msg in [({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "unsupported architecture"),
                        ({"hidden_act": "gelu"}, "hidden_act"),
                        ({"attention_bias": True}, "attention_bias"),
                        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type"),
                        ({"num_key_value_heads": 3}, "multiple of")]:
        bad = dict(cfg, **change)
        with pytest.raises(ValueError, match=msg):
            ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="neither a built-in"):
        model_config(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="dtype"):
        load_checkpoint(tmp_path, dtype=torch.float32)


def test_builtin_configs_and_random_weights():
    for name, cfg in BUILTIN_CONFIGS.items():
        cfg.validate()
        assert model_config(name) is cfg
    assert BUILTIN_CONFIGS["llama-3-8b"].num_kv_heads == 8
    tiny = ModelConfig(hidden=256, intermediate=512, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64, vocab=64)
    w = random_weights(tiny, seed=3)
    assert {k: tuple(v.shape) for k, v in w.items()} == expected_shapes(tiny)
    assert torch.equal(w["lm_head.weight"], random_weights(tiny, seed=3)["lm_head.weight"])
    assert 0.5 < w["model.layers.0.self_attn.q_proj.weight"].float().std().item() * 16 < 2
