"""Streaming: converting a model several times larger than the memory allowed must not raise peak RSS.

Two conversions run in fresh subprocesses with the same layer widths (so the same largest tensor): a
1-layer model (the baseline: interpreter, imports, skeleton, buffers) and a ~390 MB bf16 model with 14
layers. The big one may use at most HEADROOM more peak RSS than the baseline, although its source is
~3.7x HEADROOM. Each child reports its own peak RSS as ``VmHWM`` from ``/proc/self/status``: on Linux
``getrusage`` (``RUSAGE_SELF`` in the child as well as ``RUSAGE_CHILDREN`` in the parent) carries the
pytest parent's peak across fork+exec, so it would hide the child's own peak under the parent's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HEADROOM = 100 * 2**20
WIDTHS = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=16,
              vocab_size=4096, max_position_embeddings=256)

CHILD = r"""
import json, re, sys
from qconv.converter.conversion import convert
result = convert(sys.argv[1], sys.argv[2], device="cpu", progress=False, max_shard_size="8MB", fix_tokenizer=False)
status = open("/proc/self/status").read()
print(json.dumps({"maxrss_kib": int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)), "stats": result.stats}))
"""


def _random_checkpoint(directory: Path, layers: int) -> int:
    """Write a llama checkpoint of random bf16 weights in ~100 MB source shards; return its tensor bytes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", num_hidden_layers=layers, tie_word_embeddings=False, **WIDTHS)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    directory.mkdir()
    config.save_pretrained(directory)
    gen = torch.Generator().manual_seed(0)
    shard, shard_bytes, total, weight_map, n = {}, 0, 0, {}, 0
    names = list(skeleton.state_dict().items())
    for i, (name, meta) in enumerate(names):
        shard[name] = (torch.randn(meta.shape, generator=gen) * 0.05).to(torch.bfloat16)
        shard_bytes += shard[name].nbytes
        if shard_bytes > 100e6 or i == len(names) - 1:
            n += 1
            file = f"part-{n}.safetensors"
            save_file(shard, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            total += shard_bytes
            shard, shard_bytes = {}, 0
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def _convert_in_child(src: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_peak_rss_does_not_grow_with_model_size(tmp_path):
    small_bytes = _random_checkpoint(tmp_path / "small", layers=1)
    big_bytes = _random_checkpoint(tmp_path / "big", layers=14)
    assert big_bytes > 3.5 * HEADROOM and big_bytes > 10 * small_bytes / 2
    small = _convert_in_child(tmp_path / "small", tmp_path / "small-out")
    big = _convert_in_child(tmp_path / "big", tmp_path / "big-out")
    assert big["stats"]["quantized_tensors"] == 14 * 7 and big["stats"]["source_bytes"] == big_bytes
    grew = (big["maxrss_kib"] - small["maxrss_kib"]) * 1024
    print(f"peak RSS: baseline {small['maxrss_kib'] // 1024} MiB, big {big['maxrss_kib'] // 1024} MiB")
    assert grew < HEADROOM, (
        f"peak RSS grew by {grew / 2**20:.0f} MiB (baseline {small['maxrss_kib'] / 1024:.0f} MiB) for a "
        f"{big_bytes / 2**20:.0f} MiB source; allowed {HEADROOM / 2**20:.0f} MiB"
    )
