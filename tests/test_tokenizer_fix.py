"""Tokenizer analysis and repair (converter/tokenizer_fix.py) on tokenizers built in memory, plus SmolLM2's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qconv.converter import embedding_rows as er
from qconv.converter import tokenizer_checks as checks
from qconv.converter.tokenizer_fix import TOKENIZER_FILES, plan_tokenizer_fixes

WORDS = "hello world the capital of france is paris quantization stores weights in four bits".split()
HIDDEN = 16


def build_tokenizer(directory: Path, specials=("<unk>", "<s>", "</s>"), *, bos="<s>", eos="</s>", unk="<unk>",
                    pad=None, add_bos=False, chat_template=None, padding_side="right", extra_added=()) -> Path:
    """A word-level tokenizer with exactly ``specials + WORDS + extra_added`` (ids in that order), saved to a dir."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(list(specials) + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk or specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(specials) + list(extra_added))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk,
                                   pad_token=pad, padding_side=padding_side)
    if chat_template:
        fast.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def tensors_for(rows: int, tied: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": (torch.randn(rows, HIDDEN, generator=g) * 0.05).bfloat16()}
    if not tied:
        out["lm_head.weight"] = (torch.randn(rows, HIDDEN, generator=g) * 0.05).bfloat16()
    return out


def config_for(rows: int, tied: bool = False, **kw) -> dict:
    base = dict(model_type="llama", vocab_size=rows, hidden_size=HIDDEN, tie_word_embeddings=tied,
                bos_token_id=1, eos_token_id=2)
    return {**base, **kw}


def reader(tensors: dict[str, torch.Tensor]):
    return lambda name: tensors[name]  # KeyError for a missing name, as agreed with the converter


def kinds(plan) -> dict[str, object]:
    return {f.kind: f for f in plan.fixes}


def saved_tokenizer(plan, out: Path):
    from transformers import AutoTokenizer

    out.mkdir()
    plan.save(out)
    return AutoTokenizer.from_pretrained(out)


# ---------------------------------------------------------------------------------------------- pad token
def test_missing_pad_prefers_dedicated_pad_token_and_syncs_configs(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<unk>", "<s>", "</s>", "<|reserved_special_token_0|>", "<pad>"))
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 1}))
    rows = 32
    plan = plan_tokenizer_fixes(src, config_for(rows), reader(tensors_for(rows)))
    fix = kinds(plan)["pad_token"]
    assert fix.applied and fix.before == {"token": None, "id": None}
    assert fix.after == {"token": "<pad>", "id": 4, "added": False}
    assert plan.config_updates == {"pad_token_id": 4}
    assert plan.generation_config_updates == {"pad_token_id": 4}
    assert plan.tensor_transforms == {}  # an existing token: no tensor changes
    tok = saved_tokenizer(plan, tmp_path / "out")
    assert (tok.pad_token, tok.pad_token_id) == ("<pad>", 4)


def test_pad_equal_to_eos_moves_to_reserved_token(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<unk>", "<s>", "</s>", "<|reserved_special_token_3|>",
                                                      "<|reserved_special_token_1|>"), pad="</s>")
    plan = plan_tokenizer_fixes(src, config_for(32, pad_token_id=2), reader(tensors_for(32)))
    fix = kinds(plan)["pad_token"]
    assert "EOS" in fix.detail and fix.before == {"token": "</s>", "id": 2}
    assert fix.after["token"] == "<|reserved_special_token_3|>"  # lowest id among reserved tokens
    assert plan.config_updates["pad_token_id"] == 3


def test_pad_falls_back_to_unk_and_never_to_an_eos_listed_in_generation_config(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<unk>", "<s>", "</s>", "<|endoftext|>"))
    # <|endoftext|> (id 3) is an EOS of this model per generation_config: it must not become the pad token
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    plan = plan_tokenizer_fixes(src, config_for(32), reader(tensors_for(32)))
    assert kinds(plan)["pad_token"].after["token"] == "<unk>"
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    plan = plan_tokenizer_fixes(src, config_for(32), reader(tensors_for(32)))
    assert kinds(plan)["pad_token"].after["token"] == "<|endoftext|>"


def test_new_pad_token_grows_embeddings_by_one_mean_row(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<s>", "</s>"), unk=None)
    rows = 2 + len(WORDS)  # the vocabulary fills every row: a new token needs a new row
    tensors = tensors_for(rows)
    plan = plan_tokenizer_fixes(src, config_for(rows, bos_token_id=0, eos_token_id=1), reader(tensors))
    fix = kinds(plan)["pad_token"]
    assert fix.after == {"token": "<|pad|>", "id": rows, "added": True,
                         "tensors": ["lm_head.weight", "model.embed_tokens.weight"]}
    assert plan.config_updates == {"pad_token_id": rows, "vocab_size": rows + 1}
    assert set(plan.tensor_transforms) == {"model.embed_tokens.weight", "lm_head.weight"}
    for name, t in tensors.items():
        grown = plan.tensor_transforms[name](t)
        assert grown.shape == (rows + 1, HIDDEN) and grown.dtype == t.dtype
        assert torch.equal(grown[:rows], t)
        torch.testing.assert_close(grown[rows].float(), t.float().mean(0), atol=1e-3, rtol=0)
    tok = saved_tokenizer(plan, tmp_path / "out")
    assert (tok.pad_token, tok.pad_token_id, len(tok)) == ("<|pad|>", rows, rows + 1)


def test_new_pad_token_in_a_free_row_sets_that_row_to_the_mean(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<s>", "</s>"), unk=None)
    rows = 64  # more rows than tokens: the new token takes the first free row, nothing grows
    tensors = tensors_for(rows, tied=True)
    plan = plan_tokenizer_fixes(src, config_for(rows, tied=True, bos_token_id=0, eos_token_id=1), reader(tensors))
    new_id = 2 + len(WORDS)
    assert kinds(plan)["pad_token"].after["id"] == new_id
    assert "vocab_size" not in plan.config_updates and set(plan.tensor_transforms) == {"model.embed_tokens.weight"}
    out = plan.tensor_transforms["model.embed_tokens.weight"](tensors["model.embed_tokens.weight"])
    emb = tensors["model.embed_tokens.weight"]
    assert out.shape == emb.shape and torch.equal(out[:new_id], emb[:new_id]) and torch.equal(out[new_id + 1:], emb[new_id + 1:])
    torch.testing.assert_close(out[new_id].float(), emb[:new_id].float().mean(0), atol=1e-3, rtol=0)


def test_config_pad_ids_out_of_sync_are_synced(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<unk>", "<s>", "</s>", "<pad>"), pad="<pad>")
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 999}))
    plan = plan_tokenizer_fixes(src, config_for(32, pad_token_id=-1), reader(tensors_for(32)))
    fix = kinds(plan)["pad_token_id"]
    assert fix.applied and fix.before == {"config": -1, "generation_config": 999} and fix.after == 3
    assert plan.config_updates == {"pad_token_id": 3} and plan.generation_config_updates == {"pad_token_id": 3}
    assert "pad_token" not in kinds(plan)


def test_pad_id_and_added_tokens_beyond_embedding_rows(tmp_path):
    src = build_tokenizer(tmp_path / "src", specials=("<unk>", "<s>", "</s>"), extra_added=("<tool>", "<pad>"),
                          pad="<pad>")
    rows = 3 + len(WORDS)  # <tool> and <pad> have ids rows and rows+1: no embedding row
    tensors = tensors_for(rows)
    plan = plan_tokenizer_fixes(src, config_for(rows), reader(tensors))
    found = kinds(plan)
    assert found["added_tokens_out_of_range"].before == {"rows": rows, "ids": [rows, rows + 1], "tokens": ["<tool>", "<pad>"]}
    assert found["added_tokens_out_of_range"].after == {"rows": rows + 2, "tensors": ["lm_head.weight", "model.embed_tokens.weight"]}
    assert "outside" in found["pad_token"].detail and found["pad_token"].after["token"] == "<unk>"
    assert plan.config_updates["vocab_size"] == rows + 2
    assert plan.tensor_transforms["lm_head.weight"](tensors["lm_head.weight"]).shape == (rows + 2, HIDDEN)


def test_fix_false_records_everything_and_changes_nothing(tmp_path):
    src = build_tokenizer(tmp_path / "src", pad="</s>", padding_side="left")
    rows = 32
    tensors = tensors_for(rows)
    tensors["model.embed_tokens.weight"][5] = 0
    plan = plan_tokenizer_fixes(src, config_for(rows), reader(tensors), fix=False, fix_untrained=True)
    found = kinds(plan)
    assert {"pad_token", "padding_side", "untrained_rows", "chat_template"} <= set(found)
    assert not any(f.applied for f in plan.fixes)
    assert plan.config_updates == {} and plan.generation_config_updates == {} and plan.tensor_transforms == {}
    out = tmp_path / "out"
    out.mkdir()
    written = plan.save(out)
    assert written and all((out / n).read_bytes() == (src / n).read_bytes() for n in written)
    assert set(written) == {n for n in TOKENIZER_FILES if (src / n).is_file()}


def test_padding_side_left_becomes_right_and_is_recorded(tmp_path):
    src = build_tokenizer(tmp_path / "src", pad="<unk>", padding_side="left")
    plan = plan_tokenizer_fixes(src, config_for(32, pad_token_id=0), reader(tensors_for(32)))
    fix = kinds(plan)["padding_side"]
    assert fix.applied and (fix.before, fix.after) == ("left", "right")
    assert saved_tokenizer(plan, tmp_path / "out").padding_side == "right"
    # already right: recorded as the training default, nothing applied
    src2 = build_tokenizer(tmp_path / "src2", pad="<unk>")
    fix2 = kinds(plan_tokenizer_fixes(src2, config_for(32, pad_token_id=0), reader(tensors_for(32))))["padding_side"]
    assert not fix2.applied and fix2.after == "right"


# ---------------------------------------------------------------------------------------------- record-only checks
def test_chat_template_missing_or_without_generation_prompt(tmp_path):
    none = build_tokenizer(tmp_path / "a", pad="<unk>")
    assert "no chat template" in kinds(plan_tokenizer_fixes(none, config_for(32), reader(tensors_for(32))))["chat_template"].detail
    bare = build_tokenizer(tmp_path / "b", pad="<unk>", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    fix = kinds(plan_tokenizer_fixes(bare, config_for(32), reader(tensors_for(32))))["chat_template"]
    assert "add_generation_prompt" in fix.detail and not fix.applied
    good = build_tokenizer(tmp_path / "c", pad="<unk>", chat_template=(
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A:{% endif %}"))
    assert "chat_template" not in kinds(plan_tokenizer_fixes(good, config_for(32), reader(tensors_for(32))))


def test_double_bos_is_recorded_not_changed(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}A{% endif %}"
    src = build_tokenizer(tmp_path / "src", pad="<unk>", add_bos=True, chat_template=template)
    plan = plan_tokenizer_fixes(src, config_for(32, pad_token_id=0), reader(tensors_for(32)))
    fix = kinds(plan)["bos"]
    assert not fix.applied and "double BOS" in fix.detail
    # the same template without add_bos, or add_bos without the template's BOS: no finding
    no_add = build_tokenizer(tmp_path / "n", pad="<unk>", chat_template=template)
    assert "bos" not in kinds(plan_tokenizer_fixes(no_add, config_for(32), reader(tensors_for(32))))
    plain = build_tokenizer(tmp_path / "p", pad="<unk>", add_bos=True, chat_template=template.replace("{{ bos_token }}", ""))
    assert "bos" not in kinds(plan_tokenizer_fixes(plain, config_for(32), reader(tensors_for(32))))


def test_slow_fast_mismatch(tmp_path):
    from transformers import AutoTokenizer

    src = build_tokenizer(tmp_path / "src", pad="<unk>")
    tok = AutoTokenizer.from_pretrained(src)
    same = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert checks.check_slow_fast(src, tok, reference_encode=same) == []
    shifted = lambda text: [i + 1 for i in same(text)]  # noqa: E731
    [fix] = checks.check_slow_fast(src, tok, reference_encode=shifted)
    assert fix.kind == "slow_fast" and not fix.applied and len(fix.before) == len(checks.SAMPLE_TEXTS)
    # a tokenizer.model with no sentencepiece to read it is reported, not silently skipped
    (src / "tokenizer.model").write_bytes(b"not a model")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        [fix] = checks.check_slow_fast(src, tok)
        assert "sentencepiece" in fix.detail


# ---------------------------------------------------------------------------------------------- embedding rows
def test_untrained_rows_listed_and_fixed_with_norms(tmp_path):
    specials = ("<unk>", "<s>", "</s>", "<a>", "<b>", "<c>")
    src = build_tokenizer(tmp_path / "src", specials=specials, pad="<unk>")
    rows = 40
    tensors = tensors_for(rows)
    emb, head = tensors["model.embed_tokens.weight"], tensors["lm_head.weight"]
    emb[10] = 0  # a zero row (an ordinary token)
    emb[3] = emb[4] = emb[5] = 0.01  # three special tokens sharing one initial value
    head[7] = 1e-6  # near-zero
    head[30] = 0  # row beyond len(tokenizer): not a token, not reported
    plan = plan_tokenizer_fixes(src, config_for(rows, pad_token_id=0), reader(tensors))
    by_tensor = {f.before["tensor"]: f for f in plan.fixes if f.kind == "untrained_rows"}
    assert by_tensor["model.embed_tokens.weight"].before["ids"] == [3, 4, 5, 10]
    assert by_tensor["lm_head.weight"].before["ids"] == [7]
    assert not any(f.applied for f in by_tensor.values()) and plan.tensor_transforms == {}

    plan = plan_tokenizer_fixes(src, config_for(rows, pad_token_id=0), reader(tensors), fix_untrained=True)
    fix = next(f for f in plan.fixes if f.kind == "untrained_rows" and f.before["tensor"] == "model.embed_tokens.weight")
    assert fix.applied and fix.before["norms"][3] == 0.0 and fix.before["tokens"][:3] == ["<a>", "<b>", "<c>"]
    out = plan.tensor_transforms["model.embed_tokens.weight"](emb)
    trained = [i for i in range(len(specials) + len(WORDS)) if i not in (3, 4, 5, 10)]
    mean = emb[trained].float().mean(0)
    for i in (3, 4, 5, 10):
        torch.testing.assert_close(out[i].float(), mean, atol=1e-3, rtol=0)
    untouched = [i for i in range(rows) if i not in (3, 4, 5, 10)]
    assert torch.equal(out[untouched], emb[untouched])
    assert fix.after["norms"] == pytest.approx([float(mean.bfloat16().float().norm())] * 4, rel=1e-4)
    # the zero row is gone; repaired special rows share the mean, so they still read as copies of each other
    assert er.untrained_rows(out, len(specials) + len(WORDS), range(6)) == [3, 4, 5]


def test_find_embeddings_by_name_and_by_model_skeleton():
    emb, out = er.find_embeddings({"model_type": "gpt2"}, reader({"transformer.wte.weight": torch.ones(4, 2)}))
    assert (emb.name, out) == ("transformer.wte.weight", None)
    # an architecture whose names are not in the lists: found through a meta-device skeleton
    config = dict(model_type="rwkv", vocab_size=8, hidden_size=4, num_hidden_layers=1, attention_hidden_size=4,
                  intermediate_size=8, context_length=16)
    tensors = {"rwkv.embeddings.weight": torch.ones(8, 4), "head.weight": torch.ones(8, 4)}
    emb, out = er.find_embeddings(config, reader(tensors))
    assert (emb.name, out.name) == ("rwkv.embeddings.weight", "head.weight")


def test_no_tokenizer_or_no_embeddings_are_findings(tmp_path):
    (tmp_path / "empty").mkdir()
    plan = plan_tokenizer_fixes(tmp_path / "empty", config_for(32), reader({}))
    assert [f.kind for f in plan.fixes] == ["tokenizer"] and plan.save(tmp_path) == []
    src = build_tokenizer(tmp_path / "src", pad="<unk>")
    plan = plan_tokenizer_fixes(src, {"vocab_size": 32}, reader({}))
    assert any(f.kind == "untrained_rows" and "no embedding" in f.detail for f in plan.fixes)


# ---------------------------------------------------------------------------------------------- the real SmolLM2
def test_smollm2_tokenizer_and_embeddings(smollm2_gguf, tmp_path):
    """SmolLM2-135M-Instruct: pad == eos (<|im_end|>) -> <|endoftext|>; eleven untrained special-token rows."""
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).save_pretrained(src)
    reader_ = gguf.GGUFReader(smollm2_gguf)
    [embd] = [t for t in reader_.tensors if t.name == "token_embd.weight"]
    embed = torch.from_numpy(dequantize(embd.data, embd.tensor_type).copy())
    assert embed.shape == (49152, 576)
    config = dict(model_type="llama", vocab_size=49152, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2)
    plan = plan_tokenizer_fixes(src, config, reader({"model.embed_tokens.weight": embed}), fix_untrained=True)
    found = kinds(plan)
    assert found["pad_token"].before == {"token": "<|im_end|>", "id": 2}
    assert found["pad_token"].after == {"token": "<|endoftext|>", "id": 0, "added": False}
    assert plan.config_updates == {"pad_token_id": 0} and plan.generation_config_updates == {"pad_token_id": 0}
    assert {"chat_template", "bos", "added_tokens_out_of_range"}.isdisjoint(found)  # template has the branch
    untrained = found["untrained_rows"]
    # <file_sep>, <gh_stars> .. <empty_output>: rows within 0.3 % of each other; <|im_start|>, <|im_end|> trained
    assert untrained.before["ids"] == [5, *range(7, 17)] and untrained.applied
    out = plan.tensor_transforms["model.embed_tokens.weight"](embed)
    assert torch.equal(out[17:], embed[17:]) and torch.equal(out[:5], embed[:5])
    tok = saved_tokenizer(plan, tmp_path / "out")
    assert (tok.pad_token, tok.pad_token_id, tok.eos_token_id) == ("<|endoftext|>", 0, 2)


def test_pad_choice_order_and_reserved_spellings():
    from types import SimpleNamespace

    from qconv.converter.pad_choice import RESERVED_PATTERN, choose_pad_token

    class Tok:
        def __init__(self, tokens, unk=None):
            self.vocab = {t: i for i, t in enumerate(tokens)}
            self.added_tokens_decoder = {i: SimpleNamespace(content=t) for t, i in self.vocab.items() if t[0] in "<["}
            self.unk_token = unk

        def get_vocab(self):
            return dict(self.vocab)

        def __len__(self):
            return len(self.vocab)

    assert all(RESERVED_PATTERN.match(t) for t in ("<unused0>", "[unused12]", "<|reserved_special_token_250|>", "<|reserved_7|>"))
    assert not any(RESERVED_PATTERN.match(t) for t in ("unused", "reserved", "<|im_start|>", "<|fim_pad|>"))
    base = ["<s>", "</s>", "a", "b"]
    forbidden = {0, 1}
    pick = lambda toks, unk=None, rows=64: choose_pad_token(Tok(toks, unk), forbidden, rows)  # noqa: E731
    assert pick(base + ["<|fim_pad|>", "<|video_pad|>", "<unused3>"]).token == "<|video_pad|>"  # step 2, FIM skipped
    assert pick(base + ["<unused3>", "<unused1>", "<|endoftext|>"]).token == "<unused3>"  # step 3, lowest id
    assert pick(base + ["<|endoftext|>", "<unk>"], unk="<unk>").token == "<|endoftext|>"  # step 4 before unk
    assert pick(base + ["<unk>"], unk="<unk>").token == "<unk>"
    # candidates without an embedding row are skipped: <pad> has id 4 but only 4 rows exist
    choice = pick(base + ["<pad>"], rows=4)
    assert choice.new and choice.token == "<|pad|>" and choice.id == 5
    assert pick(base + ["<pad>", "<|finetune_right_pad_id|>"]).token == "<|finetune_right_pad_id|>"
