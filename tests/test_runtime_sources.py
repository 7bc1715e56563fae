"""Where a load comes from and what it replays: Hub ids (loopback server, offline cache), tokenizer fixes."""

from __future__ import annotations

import shutil

import torch

from qconv import format as fmt
from qconv import runtime

REPO = "alice/tiny-bnb-4bit"


def test_hub_id_downloads_only_what_it_needs(hub_server, quantized_checkpoint_factory, tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from hub_server import READ_TOKEN, WRITE_TOKEN

    src = tmp_path / "upload"
    shutil.copytree(quantized_checkpoint_factory("qwen2", max_shard_size="30KB"), src)
    (src / "original").mkdir()
    (src / "original" / "consolidated.pth").write_bytes(b"\0" * 4096)  # not needed: never downloaded
    api = HfApi(token=WRITE_TOKEN)
    api.create_repo(REPO, private=True)
    first = api.upload_folder(repo_id=REPO, folder_path=src, commit_message="v1").oid
    gen = src / "generation_config.json"
    gen.write_text(gen.read_text().replace("{", '{\n  "max_length": 77,', 1))
    api.upload_file(path_or_fileobj=gen, path_in_repo="generation_config.json", repo_id=REPO, commit_message="v2")

    model, tokenizer = runtime.from_pretrained(REPO, token=READ_TOKEN)
    assert model.generation_config.max_length == 77 and tokenizer is not None
    folder = model._qconv["directory"]
    assert not (tmp_path / folder / "original").exists()
    assert len(list((tmp_path / folder).glob("model-*.safetensors"))) >= 2

    old, _ = runtime.from_pretrained(REPO, token=READ_TOKEN, revision=first)
    assert old._qconv["revision"] == first and old.generation_config.max_length != 77
    for (n, a), b in zip(model.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), n

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache now holds it: no network needed
    hub_server.close()
    cached, _ = runtime.from_pretrained(REPO)
    assert cached._qconv["directory"] == folder


def _with_fixes(src, tmp_path, fixes):
    out = tmp_path / "with-fixes"
    shutil.copytree(src, out)
    fmt.write_manifest(out, fmt.Manifest(source={"id": "tiny", "kind": "dir"}, settings={}, tokenizer_fixes=fixes))
    return out


FIXES = [
    fmt.TokenizerFix("pad_token", "no pad token: use eos", before={"token": None, "id": None},
                     after={"token": "</s>", "id": 2, "added": False}).to_dict(),
    fmt.TokenizerFix("padding_side", "pad on the left", before="right", after="left").to_dict(),
    fmt.TokenizerFix("chat_template", "template added", after="{{ x }}").to_dict(),
    fmt.TokenizerFix("untrained_rows", "found only", after=[3, 4], applied=False).to_dict(),
]


def test_tokenizer_fixes_replayed_and_pad_ids_synced(quantized_checkpoint_factory, tmp_path):
    directory = _with_fixes(quantized_checkpoint_factory("llama"), tmp_path, FIXES)
    model, tok = runtime.from_pretrained(directory)
    assert tok.pad_token == "</s>" and tok.padding_side == "left"
    assert model.config.pad_token_id == tok.pad_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model._qconv["tokenizer_fixes"] == ["pad_token='</s>'", "padding_side='left'"]
    batch = tok(["a", "The capital"], padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == tok.pad_token_id  # left padding at work

    model, tok = runtime.from_pretrained(directory, fix_tokenizer=False)
    assert tok.pad_token is None and tok.padding_side == "right"
    assert model.config.pad_token_id is None and model._qconv["tokenizer_fixes"] == []


def test_pad_token_outside_vocab_not_replayed(quantized_checkpoint_factory, tmp_path):
    fix = fmt.TokenizerFix("pad_token", "new token", after={"token": "<|pad|>", "id": 384}).to_dict()
    model, tok = runtime.from_pretrained(_with_fixes(quantized_checkpoint_factory("llama"), tmp_path, [fix]))
    assert tok.pad_token is None and "<|pad|>" not in tok.get_vocab() and model.config.pad_token_id is None


def test_checkpoint_without_tokenizer(quantized_checkpoint_factory, tmp_path):
    out = tmp_path / "no-tok"
    shutil.copytree(quantized_checkpoint_factory("llama"), out)
    for p in out.glob("tokenizer*"):
        p.unlink()
    model, tok = runtime.from_pretrained(out, max_seq_length=64)
    assert tok is None and model is not None


def test_pad_token_record_with_wrong_id_not_replayed(quantized_checkpoint_factory, tmp_path):
    fix = fmt.TokenizerFix("pad_token", "eos as pad", after={"token": "</s>", "id": 1, "added": False}).to_dict()
    _, tok = runtime.from_pretrained(_with_fixes(quantized_checkpoint_factory("llama"), tmp_path, [fix]))
    assert tok.convert_tokens_to_ids("</s>") == 2 and tok.pad_token is None
