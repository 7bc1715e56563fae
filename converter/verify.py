"""``qconv verify``: check that a converted checkpoint is intact and, given its source, accurate.

Checks, each failure one line in :attr:`VerifyReport.problems`:

- the manifest: present and readable; every listed file exists and has its recorded sha256; no weight file
  (``*.safetensors``, ``*.bin``, ...) sits in the folder without being listed;
- the tensors: valid safetensors headers; the index (if any) agrees with the shards; every quantized weight
  has all its quant-state tensors (:func:`qconv.format.state_tensor_names`) with shapes and dtypes that
  agree with the packed quant-state JSON; no state tensor is orphaned;
- ``config.json``: loadable with ``AutoConfig`` and carrying a bitsandbytes 4-bit ``quantization_config``
  whose quant type / double quant match the tensors;
- with a source: see :mod:`.verify_source` (dequantization error, kept tensors equal to the source).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from qconv import format as fmt
from qconv import safetensors_header as sth
from qconv.errors import QconvError

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_JSON_DTYPES = {"float32", "bfloat16", "float16"}


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` found; ``ok`` when there is no problem."""

    directory: Path
    problems: list[str] = field(default_factory=list)
    tensor_errors: dict[str, float] = field(default_factory=dict)  # rel. error of dequantized vs source
    thresholds: dict[str, float] = field(default_factory=dict)  # quant type -> max rel. error allowed
    counts: dict[str, int] = field(default_factory=dict)  # files hashed, quantized, kept, compared

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        """A few lines for people: verdict, counts, worst errors, then every problem."""
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        lines = [f"{self.directory.name}: {'OK' if self.ok else f'FAILED ({len(self.problems)} problem(s))'}"
                 + (f" [{counts}]" if counts else "")]
        if self.tensor_errors:
            worst = sorted(self.tensor_errors.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else -math.inf)
            limits = ", ".join(f"{k} {v:g}" for k, v in sorted(self.thresholds.items()))
            lines.append(f"relative error vs source (threshold {limits}), worst:")
            lines += [f"  {err:.4f}  {name}" for name, err in worst[:5]]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify_checkpoint(directory: str | Path, source: str | Path | None = None, *, progress: bool = False) -> VerifyReport:
    """Verify the checkpoint in ``directory`` (and compare it with ``source`` when given)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise QconvError(f"{directory}: not a directory")
    report = VerifyReport(directory=directory)
    manifest = _check_manifest(directory, report)
    config = _check_config(directory, report)
    try:
        headers = sth.read_all_headers(directory)
    except (QconvError, OSError) as exc:
        report.problems.append(str(exc))
        return report
    if not headers:
        report.problems.append("no safetensors weights found")
        return report
    _check_index(directory, headers, report)
    quantized = _check_quantized(headers, config, report)
    report.counts["quantized"] = len(quantized)
    report.counts["kept"] = sum(1 for n in headers if n not in quantized and not fmt.is_state_tensor(n))
    if source is not None:
        from qconv.converter.verify_source import compare_with_source

        compare_with_source(report, headers, quantized, config, manifest, source, progress=progress)
    return report


def _check_manifest(directory: Path, report: VerifyReport) -> fmt.Manifest | None:
    try:
        manifest = fmt.read_manifest(directory)
    except QconvError as exc:
        report.problems.append(str(exc))
        return None
    if manifest is None:
        report.problems.append(f"no {fmt.MANIFEST_NAME}: file hashes cannot be checked")
        return None
    listed = set()
    for check in fmt.check_manifest_files(directory, manifest):
        if check.path is None:
            report.problems.append(check.problem)
            continue
        listed.add(check.path)
        if check.problem == "missing":
            report.problems.append(f"{check.rel}: listed in the manifest but missing")
        elif check.problem == "sha256":
            report.problems.append(f"{check.rel}: sha256 differs from the manifest (the file changed after conversion)")
    report.counts["files hashed"] = len(listed)
    for path in sorted(directory.rglob("*")):
        if path.is_file() and (path.suffix in WEIGHT_SUFFIXES or path.name == fmt.INDEX_NAME) and path.resolve() not in listed:
            report.problems.append(f"{path.relative_to(directory)}: weight file not listed in the manifest")
    return manifest


def _check_config(directory: Path, report: VerifyReport) -> dict:
    path = directory / fmt.CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        report.problems.append(f"{fmt.CONFIG_NAME}: not readable JSON ({exc})")
        return {}
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # any failure means a user's from_pretrained fails too
        report.problems.append(f"{fmt.CONFIG_NAME}: AutoConfig cannot load it ({str(exc).splitlines()[0]})")
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        report.problems.append(f"{fmt.CONFIG_NAME}: no quantization_config")
        return config
    try:
        fmt.settings_from_quantization_config(qc)
    except QconvError as exc:
        report.problems.append(f"{fmt.CONFIG_NAME}: {exc}")
    return config


def _check_index(directory: Path, headers: dict[str, sth.TensorEntry], report: VerifyReport) -> None:
    if not (directory / fmt.INDEX_NAME).is_file():
        return
    weight_map = sth.read_index(directory)
    for name, shard in sorted(weight_map.items()):
        if name not in headers:
            report.problems.append(f"{fmt.INDEX_NAME}: lists {name} in {shard.name}, which does not store it")
        elif headers[name].file != shard:
            report.problems.append(f"{fmt.INDEX_NAME}: lists {name} in {shard.name}, but it is in {headers[name].file.name}")
    for name in sorted(set(headers) - set(weight_map)):
        report.problems.append(f"{fmt.INDEX_NAME}: does not list {name} ({headers[name].file.name})")


def _check_quantized(headers: dict[str, sth.TensorEntry], config: dict, report: VerifyReport) -> dict[str, dict]:
    """Check each quantized weight's state tensors; return weight name -> its packed quant-state JSON."""
    qc = config.get("quantization_config") or {}
    expect_type = qc.get("bnb_4bit_quant_type")
    expect_double = qc.get("bnb_4bit_use_double_quant")
    storage = sth.SAFETENSORS_DTYPE_OF_TORCH.get(str(qc.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch."), "U8")
    states: dict[str, dict] = {}
    for weight, quant_type in sorted(fmt.quantized_weight_names(headers).items()):
        problems = report.problems
        try:
            state = json.loads(headers[f"{weight}.{fmt.packed_state_suffix(quant_type)}"].read_bytes().decode("utf-8"))
            shape = [int(d) for d in state["shape"]]
            blocksize = int(state["blocksize"])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{weight}: unreadable packed quant state ({exc})")
            continue
        states[weight] = state
        double = "nested_blocksize" in state
        if state.get("quant_type") != quant_type:
            problems.append(f"{weight}: quant state says {state.get('quant_type')!r}, its tensor name says {quant_type!r}")
        if expect_type and quant_type != expect_type:
            problems.append(f"{weight}: quantized as {quant_type}, config.json says {expect_type}")
        if expect_double is not None and double != bool(expect_double):
            problems.append(f"{weight}: double quant is {double}, config.json says {bool(expect_double)}")
        if blocksize not in fmt.BLOCKSIZES or state.get("dtype") not in _JSON_DTYPES or len(shape) != 2:
            problems.append(f"{weight}: implausible quant state (blocksize {blocksize}, dtype "
                            f"{state.get('dtype')!r}, shape {shape})")
            continue
        missing = [n for n in [weight] + fmt.state_tensor_names(weight, quant_type, double) if n not in headers]
        if missing:
            problems.append(f"{weight}: missing tensor(s) {', '.join(n[len(weight) + 1:] or n for n in missing)}")
            continue
        _check_shapes(weight, state, headers, storage, problems)
    quantized = fmt.quantized_weight_names(headers)
    for name in sorted(headers):
        if fmt.is_state_tensor(name) and _state_owner(name) not in quantized:
            report.problems.append(f"{name}: state tensor without a quantized weight")
    return states


def _state_owner(name: str) -> str:
    """The weight a state tensor belongs to (``L.weight.absmax`` -> ``L.weight``)."""
    head, sep, _ = name.rpartition("." + fmt.PACKED_STATE_PREFIX)
    return head if sep else name.rsplit(".", 1)[0]


def _expect(problems: list[str], t: sth.TensorEntry, dtype: str, numel: int, what: str) -> None:
    if t.dtype != dtype or t.numel != numel:
        problems.append(f"{t.name}: {t.dtype} {list(t.shape)}, expected {dtype} with {numel} element(s) ({what})")


def _check_shapes(weight: str, state: dict, headers: dict[str, sth.TensorEntry], storage: str, problems: list[str]) -> None:
    """Packed size, absmax count, nested sizes and map lengths, as bitsandbytes lays them out."""
    n = math.prod(int(d) for d in state["shape"])
    blocks = math.ceil(n / int(state["blocksize"]))
    packed = headers[weight]
    itemsize = sth.itemsize(packed.dtype)
    if packed.dtype != storage or packed.nbytes != (n + 1) // 2 or len(packed.shape) != 2 or packed.shape[1] != 1:
        problems.append(f"{weight}: packed {packed.dtype} {list(packed.shape)}, expected {storage} "
                        f"[{(n + 1) // 2 // itemsize}, 1] for shape {state['shape']}")
    double = "nested_blocksize" in state
    _expect(problems, headers[f"{weight}.{fmt.ABSMAX}"], "U8" if double else "F32", blocks, f"ceil({n}/{state['blocksize']})")
    _expect(problems, headers[f"{weight}.{fmt.QUANT_MAP}"], "F32", 16, "4-bit code")
    if double:
        nested = math.ceil(blocks / int(state["nested_blocksize"]))
        _expect(problems, headers[f"{weight}.{fmt.NESTED_ABSMAX}"], "F32", nested, f"ceil({blocks}/{state['nested_blocksize']})")
        _expect(problems, headers[f"{weight}.{fmt.NESTED_QUANT_MAP}"], "F32", 256, "8-bit code")
