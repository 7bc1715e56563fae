"""device_map and dtype parsing, and the whole-layer split over several GPUs (pure functions, no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from qconv.errors import QconvError
from qconv.runtime.device_map import DevicePlan, _split_plan, layer_block, resolve_device_map, resolve_dtype, split_layers

GiB = 1 << 30


def llama_sizes(n_layers=8, layer=GiB, embed=GiB // 2):
    sizes = {"model.embed_tokens.weight": embed, "model.norm.weight": 1000, "lm_head.weight": embed}
    for i in range(n_layers):
        sizes[f"model.layers.{i}.self_attn.q_proj.weight"] = layer // 2
        sizes[f"model.layers.{i}.self_attn.q_proj.weight.absmax"] = layer // 2
    return sizes


def test_layer_block():
    assert layer_block("model.layers.12.mlp.up_proj.weight.absmax") == "model.layers.12"
    assert layer_block("transformer.h.3.attn.c_attn.weight") == "transformer.h.3"
    assert layer_block("model.embed_tokens.weight") is None


@pytest.mark.parametrize(
    "sizes,caps,mode,expected",
    [
        ([1] * 8, [100, 100], "balanced", [0] * 4 + [1] * 4),
        ([1] * 9, [100, 100, 100], "auto", [0] * 3 + [1] * 3 + [2] * 3),
        ([1] * 8, [3, 100], "sequential", [0] * 3 + [1] * 5),
        ([1] * 8, [100, 100], "sequential", [0] * 8),
    ],
)
def test_split_layers(sizes, caps, mode, expected):
    assert split_layers(sizes, caps, mode) == expected


def test_split_layers_refuses_what_does_not_fit():
    with pytest.raises(QconvError, match="needs 0.00 GiB but the GPUs have"):
        split_layers([10, 10], [5, 5], "auto")
    with pytest.raises(QconvError, match="does not fit on GPU"):
        split_layers([1, 30], [20, 20], "sequential")


@pytest.mark.parametrize("tied", [False, True])
def test_split_plan_keeps_layers_whole_and_in_order(tied):
    sizes = llama_sizes()
    plan = _split_plan(sizes, [20 * GiB, 20 * GiB], "auto", tied)
    layer_devs = [plan.device_of(f"model.layers.{i}.self_attn.q_proj.weight.absmax").index for i in range(8)]
    assert layer_devs == sorted(layer_devs) and set(layer_devs) == {0, 1}
    for i in range(8):
        assert plan.device_of(f"model.layers.{i}.self_attn.q_proj.weight") == plan.device_of(f"model.layers.{i}.mlp.x")
    assert plan.device_of("model.embed_tokens.weight") == torch.device("cuda", 0)
    assert plan.device_of("model.norm.weight") == torch.device("cuda", 1)
    assert plan.device_of("lm_head.weight") == torch.device("cuda", 0 if tied else 1)
    assert plan.device_of("model.rotary_emb.inv_freq") == torch.device("cuda", 1)  # via ""
    assert plan.hf_device_map()["model.layers.0"] == 0


def test_device_plan_longest_prefix():
    plan = DevicePlan({"model": torch.device("cpu"), "model.layers.1": torch.device("cuda", 1)})
    assert plan.device_of("model.layers.1.mlp.w") == torch.device("cuda", 1)
    assert plan.device_of("model.layers.10.mlp.w") == torch.device("cpu")  # not a prefix of layers.10
    with pytest.raises(QconvError, match="no entry covers 'lm_head.weight'"):
        plan.device_of("lm_head.weight")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only expectations")
def test_cpu_defaults_and_bad_values():
    assert resolve_device_map(None, llama_sizes()).main_device == torch.device("cpu")
    assert resolve_device_map("auto", llama_sizes()).main_device == torch.device("cpu")
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("torch.float16", torch.device("cpu")) == torch.float16
    for bad in ("cuda", 0, "cuda:1"):
        with pytest.raises(QconvError, match="GPU that does not exist"):
            resolve_device_map(bad, llama_sizes())
    with pytest.raises(QconvError, match="not a device"):
        resolve_device_map("tpu-ish", llama_sizes())
    with pytest.raises(QconvError, match="not supported"):
        resolve_device_map("meta", llama_sizes())
    with pytest.raises(QconvError, match="floating-point"):
        resolve_dtype(torch.int8, torch.device("cpu"))


@pytest.mark.parametrize("tied", [False, True])
def test_covering_map_splits_only_where_devices_differ(tied):
    """The map handed to accelerate.dispatch_model: no "" entry once layers sit on different GPUs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from qconv.runtime.device_map import covering_map

    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if tied:
        model.tie_weights()
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    plan = _split_plan({n: 100 for n in names}, [10**6, 10**6], "auto", tied)
    cmap = covering_map(model, plan.device_of)
    assert "" not in cmap and cmap["model.layers.0"] == torch.device("cuda", 0)
    assert cmap["model.layers.3"] == torch.device("cuda", 1) and cmap["lm_head"] == torch.device("cuda", 0 if tied else 1)
    assert cmap["model.embed_tokens"] == torch.device("cuda", 0) and cmap["model.rotary_emb"] == torch.device("cuda", 1)
    every = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers())
    for n, _ in every:  # every tensor covered exactly once
        covering = [k for k in cmap if n == k or n.startswith(k + ".")]
        assert len(covering) == 1 and cmap[covering[0]] == plan.device_of(n), n
    single = covering_map(model, DevicePlan({"": torch.device("cpu")}).device_of)
    assert single == {"": torch.device("cpu")}
