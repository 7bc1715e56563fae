"""The model card (converter/card.py): Hub header, settings, fixes, usage, license; no local path, no token."""

from __future__ import annotations

import yaml

from qconv.converter.card import card_metadata, write_card
from qconv.format import Manifest, QuantSettings, TokenizerFix

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
SOURCE_CARD = "---\nlicense: apache-2.0\nlanguage: [en]\ntags: [chat]\n---\n# Upstream\nsecret: hf_abcdefghijklmnop\n"


def manifest(source: dict, fixes=(), settings=QuantSettings()) -> Manifest:
    return Manifest(source=source, settings=settings.to_dict(), files={"model.safetensors": "0" * 64},
                    tokenizer_fixes=[f.to_dict() for f in fixes],
                    stats={"params": 1_234_567, "output_bytes": 800_000, "bits_per_param": 5.18,
                           "quantized_tensors": 14, "kept_tensors": 7})


def header(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_hub_source_card(tmp_path):
    fix = TokenizerFix("pad_token", "the tokenizer has no pad token; pad token: <pad> (id 3)", None, {"pad_token": "<pad>"})
    note = TokenizerFix("chat_template", "no chat template | recorded", applied=False)
    m = manifest({"kind": "hub", "id": "acme/Tiny-7B", "revision": "a" * 40}, [fix, note])
    path = write_card(tmp_path, m, CONFIG, SOURCE_CARD)
    text = path.read_text()
    meta = header(text)
    assert meta["base_model"] == "acme/Tiny-7B" and meta["license"] == "apache-2.0"
    assert {"bnb-4bit", "4-bit", "bitsandbytes", "qconv"} <= set(meta["tags"])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "language" not in meta  # only the license is carried over
    assert "| quant type | NF4 |" in text and "| blocksize | 64 |" in text and "| double quantization | yes |" in text
    assert "| pad_token | fixed | the tokenizer has no pad token; pad token: &lt;pad&gt; (id 3) |" in text and "| chat_template | noted | no chat template \\| recorded |" in text
    assert 'runtime.from_pretrained("your-username/Tiny-7B-bnb-4bit")' in text
    assert 'AutoModelForCausalLM.from_pretrained("your-username/Tiny-7B-bnb-4bit"' in text
    assert "a" * 40 in text and "hf_" not in text  # the upstream card body (with a token-like string) is not copied
    named = write_card(tmp_path, m, CONFIG, None, repo_id="me/tiny-nf4").read_text()
    assert 'runtime.from_pretrained("me/tiny-nf4")' in named and "license" not in header(named)
    assert "declared none" in named


def test_local_sources_name_only_the_folder_or_file(tmp_path):
    for source, name in (({"kind": "dir", "id": "/home/alice/secret-project/my-model"}, "my-model"),
                         ({"kind": "gguf", "id": "/data/x/SmolLM2-135M.Q4_1.gguf"}, "SmolLM2-135M.Q4_1.gguf")):
        text = write_card(tmp_path, manifest(source), CONFIG, SOURCE_CARD).read_text()
        assert "/home/alice" not in text and "secret-project" not in text and "/data/x" not in text
        assert f"`{name}`" in text and "base_model" not in header(text)
        assert header(text)["license"] == "apache-2.0"
    text = write_card(tmp_path, manifest({"kind": "dir", "id": "/home/alice/m"}, settings=QuantSettings(
        quant_type="fp4", double_quant=False, skip_modules=("lm_head",))), CONFIG).read_text()
    assert "fp4" in header(text)["tags"] and "| double quantization | no |" in text and "| kept unquantized | lm_head |" in text
    assert "No tokenizer problems" in text


def test_card_metadata_tolerates_bad_headers():
    assert card_metadata(None) == {} and card_metadata("# no header") == {}
    assert card_metadata("---\n: [unclosed\n---\n") == {}
    assert card_metadata("---\nlicense: other\nlicense_name: llama3\n---\n") == {"license": "other", "license_name": "llama3"}
