"""The format module: quant-state packing round-trips and matches what transformers writes."""

from __future__ import annotations

import json

import pytest
import torch

from qconv import format as fmt
from qconv.errors import QconvError


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_pack_unpack_roundtrip(quant_type, double_quant):
    import bitsandbytes.functional as F

    w = torch.randn(37, 48, dtype=torch.bfloat16)  # 1776 elements, not a multiple of 64
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    tensors = fmt.pack_quant_state("m.l.weight", packed, qs)
    expected = {"m.l.weight", *fmt.state_tensor_names("m.l.weight", quant_type, double_quant)}
    assert set(tensors) == expected
    assert fmt.quantized_weight_names(tensors) == {"m.l.weight": quant_type}
    qs2 = fmt.unpack_quant_state("m.l.weight", tensors)
    a = F.dequantize_4bit(packed, qs)
    b = F.dequantize_4bit(tensors["m.l.weight"], qs2)
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    meta = fmt.read_packed_state_json(tensors[f"m.l.weight.{fmt.packed_state_suffix(quant_type)}"])
    assert meta["shape"] == [37, 48] and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"


def test_quantization_config_matches_transformers():
    from transformers import BitsAndBytesConfig

    qc = fmt.quantization_config(fmt.QuantSettings())
    ref = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ).to_dict()
    assert json.dumps(qc, sort_keys=True) == json.dumps(ref, sort_keys=True)
    back = fmt.settings_from_quantization_config(qc)
    assert (back.quant_type, back.double_quant, back.compute_dtype, back.quant_storage) == ("nf4", True, "bfloat16", "uint8")


@pytest.mark.parametrize(
    "kw, option",
    [({"blocksize": 48}, "--blocksize"), ({"quant_type": "int4"}, "--quant-type"),
     ({"compute_dtype": "float8"}, "--compute-dtype"), ({"quant_storage": "int8"}, "--quant-storage")],
)
def test_settings_validation_names_the_option(kw, option):
    with pytest.raises(QconvError, match=option):
        fmt.QuantSettings(**kw).validate()


def test_manifest_roundtrip_and_newer_schema_refused(tmp_path):
    m = fmt.Manifest(source={"id": "x", "revision": "abc"}, settings=fmt.QuantSettings().to_dict(), files={"a": "00"})
    fmt.write_manifest(tmp_path, m)
    back = fmt.read_manifest(tmp_path)
    assert back.to_dict() == m.to_dict() and back.qconv_version
    data = json.loads((tmp_path / fmt.MANIFEST_NAME).read_text())
    data["schema_version"] = fmt.MANIFEST_SCHEMA_VERSION + 1
    (tmp_path / fmt.MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(QconvError, match="newer"):
        fmt.read_manifest(tmp_path)


def test_safe_join_refuses_escapes(tmp_path):
    assert fmt.safe_join(tmp_path, "a/b.safetensors") == (tmp_path / "a/b.safetensors").resolve()
    for bad in ("../x.safetensors", "/etc/passwd", "a/../../x"):
        with pytest.raises(QconvError, match="outside"):
            fmt.safe_join(tmp_path, bad)


def test_check_manifest_files_reports_each_kind_of_problem(tmp_path):
    (tmp_path / "good.bin").write_bytes(b"good bytes")
    (tmp_path / "changed.bin").write_bytes(b"changed")
    files = {"good.bin": fmt.sha256_file(tmp_path / "good.bin"), "changed.bin": "0" * 64,
             "gone.bin": "1" * 64, "../outside.bin": "2" * 64}
    m = fmt.Manifest(source={"id": "x"}, settings=fmt.QuantSettings().to_dict(), files=files)
    checks = {c.rel: c for c in fmt.check_manifest_files(tmp_path, m)}
    assert list(checks) == sorted(files)
    assert checks["good.bin"].problem is None and checks["good.bin"].actual == files["good.bin"]
    assert checks["changed.bin"].problem == "sha256" and checks["changed.bin"].actual == fmt.sha256_file(tmp_path / "changed.bin")
    assert checks["gone.bin"].problem == "missing" and checks["gone.bin"].actual is None
    assert checks["../outside.bin"].path is None and "outside" in checks["../outside.bin"].problem
