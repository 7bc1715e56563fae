"""``from_pretrained``: load a bitsandbytes 4-bit checkpoint straight onto its device, ready for LoRA.

Order of work: resolve files and parse shard headers (stdlib only) -> import torch, plan devices; in a
background thread create the CUDA context and device buffers, then read every tensor into its final device
memory -> meanwhile import transformers and bitsandbytes, build the skeleton on the meta device and swap in
``Linear4bit`` (mostly while the CUDA context is being created, before the readers compete for the GIL) ->
fill parameters from the read tensors, initialise buffers, tie -> tokenizer and its fixes -> kernel patches.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconv import format as fmt
from qconv.errors import QconvError
from qconv.runtime import checkpoint as ckpt_mod
from qconv.runtime.gc_pause import gc_paused
from qconv.runtime.memory import host_rss_mib
from qconv.runtime.shard_reader import RingUploader, as_typed, read_direct
from qconv.safetensors_header import ShardHeader, TensorEntry, merge_tensors, read_header

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)


class _Staging:
    """Every checkpoint tensor being read into its final device memory (flat uint8, viewed when done)."""

    def __init__(self, headers: list[ShardHeader], device_of) -> None:
        import torch

        self.entries: dict[str, TensorEntry] = {}
        self.raw: dict[str, torch.Tensor] = {}
        host: dict[Path, list] = {}
        dev: dict[Path, list] = {}
        totals: dict[torch.device, int] = {}
        placed = []
        for header in headers:
            for name, entry in header.tensors.items():
                device = torch.device("cpu") if fmt.PACKED_STATE_PREFIX in name else device_of(name)
                placed.append((header.path, name, entry, device))
                totals[device] = totals.get(device, 0) + entry.nbytes
        for device, total in totals.items():
            if device.type == "cuda":  # one large block the per-tensor allocations are carved from
                del_me = torch.empty(total + (64 << 20), dtype=torch.uint8, device=device)
                del del_me
        for path, name, entry, device in placed:
            dest = torch.empty(entry.nbytes, dtype=torch.uint8, device=device)
            self.entries[name], self.raw[name] = entry, dest
            (dev if device.type == "cuda" else host).setdefault(path, []).append((entry, dest))
        self.bytes = sum(totals.values())
        self._errors: list[BaseException] = []
        self._host_done_at = 0.0
        self._host_thread = threading.Thread(target=self._read_host, args=(host,), name="qconv-read-host", daemon=True)
        self._host_thread.start()
        threads = int(os.environ.get("QCONV_LOAD_THREADS", "8"))
        # 8 x 16 MiB pinned: 128 MiB of host RSS while reading. 8 MiB chunks save 64 MiB of peak RSS but read
        # slower (H100, A/B in one session: read phase 0.29-0.38 s vs 0.21-0.24 s; docs/benchmarks.md "Load")
        chunk = int(os.environ.get("QCONV_LOAD_CHUNK_MB", "16")) << 20
        ring = os.environ.get("QCONV_LOAD_RING", "mmap")  # "torch": torch's pinned allocator (an A/B switch)
        self._uploader = RingUploader(dev, threads=threads, buffers=threads, chunk_bytes=chunk, own_ring=ring != "torch") if dev else None

    def _read_host(self, jobs: dict[Path, list]) -> None:
        try:
            for path, items in jobs.items():
                read_direct(path, items)
        except BaseException as exc:  # re-raised by wait()
            self._errors.append(exc)
        finally:
            self._host_done_at = time.perf_counter()

    def wait(self) -> dict[str, "torch.Tensor"]:
        """Block until everything is read; the tensors, typed and shaped, by name."""
        self._host_thread.join()
        if self._uploader is not None:
            self._uploader.wait()
        if self._errors:
            raise self._errors[0]
        self.finished_at = max(self._host_done_at, self._uploader.finished_at if self._uploader else 0.0)
        return {name: as_typed(self.entries[name], raw) for name, raw in self.raw.items()}

    def cancel(self) -> None:
        self._host_thread.join()
        if self._uploader is not None:
            self._uploader.cancel()
        self.raw.clear()


class _StagingStarter:
    """Create :class:`_Staging` (CUDA context, device buffers, reader threads) in a thread of its own.

    Creating the CUDA context takes ~0.2 s, mostly outside the GIL, so the skeleton is built meanwhile
    and is mostly done before the reader threads start competing with it for the GIL.
    """

    def __init__(self, headers: list[ShardHeader], device_of, on_started) -> None:
        self._result: list = []
        self._thread = threading.Thread(target=self._run, args=(headers, device_of, on_started), name="qconv-start-read", daemon=True)
        self._thread.start()

    def _run(self, headers, device_of, on_started) -> None:
        try:
            self._result.append(_Staging(headers, device_of))
            on_started()
        except BaseException as exc:  # re-raised by get()
            self._result.append(exc)

    def get(self) -> _Staging:
        self._thread.join()
        if isinstance(self._result[0], BaseException):
            raise self._result[0]
        return self._result[0]

    def cancel(self) -> None:
        self._thread.join()
        if isinstance(self._result[0], _Staging):
            self._result[0].cancel()


def _parse_headers(shards: list[Path]) -> tuple[list[ShardHeader], dict[str, TensorEntry]]:
    headers = [read_header(p) for p in shards]
    return headers, merge_tensors(headers)


def _compute_dtype(settings: fmt.QuantSettings, device: "torch.device") -> "torch.dtype":
    import torch

    compute = getattr(torch, settings.compute_dtype)
    if compute == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16: Linear4bit computes in float16")
        return torch.float16
    return compute


def _mark_quantized(model: Any, quantization_config: dict[str, Any], compute_dtype: "torch.dtype") -> None:
    """The attributes transformers' bnb quantizer leaves on a loaded model (peft and Trainer read them)."""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.utils.quantization_config import BitsAndBytesConfig

    qc = BitsAndBytesConfig.from_dict(dict(quantization_config))
    qc.bnb_4bit_compute_dtype = compute_dtype
    quantizer = Bnb4BitHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = qc.quant_method
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)  # config.quantization_config, is_loaded_in_4bit, config._is_quantized


def _guard_cpu_fast_path(model: Any) -> None:
    """bitsandbytes' CPU AVX512-BF16 repacking needs out_features % 32 == 0 and in_features % blocksize == 0.

    It fails on other shapes (bitsandbytes 0.50), so those modules keep the generic path.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            blocksize = getattr(module.weight, "blocksize", None) or 64
            if module.out_features % 32 or module.in_features % blocksize:
                module.support_avx512bf16_for_cpu = False


def _load_generation_config(model: Any, directory: Path) -> None:
    if (directory / fmt.GENERATION_CONFIG_NAME).is_file() and model.can_generate():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(directory)


def _fallback(directory: Path, config, dtype, plan, trust_remote_code: bool, reason: str):
    """Names that need transformers' renaming rules: let transformers load the checkpoint itself."""
    from transformers import AutoModelForCausalLM

    logger.warning("%s: %s; loading through transformers.from_pretrained instead (slower)", directory, reason)
    return AutoModelForCausalLM.from_pretrained(
        directory, config=config, dtype=dtype, device_map=plan.hf_device_map(), trust_remote_code=trust_remote_code
    )


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    max_seq_length: int | None = None,
    dtype: Any = None,
    device_map: Any = None,
    patch: bool = True,
    fix_tokenizer: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    token: str | None = None,
    verify: bool = False,
):
    """Load a pre-quantized (bitsandbytes 4-bit) causal LM and its tokenizer; returns ``(model, tokenizer)``.

    ``name_or_path`` is a local directory or a Hub id. ``dtype`` (None: bfloat16 on GPUs that have it,
    else float16; float32 on the CPU) is used for the non-quantized tensors; ``Linear4bit`` computes in
    the checkpoint's ``bnb_4bit_compute_dtype``. ``device_map``: None (``cuda`` if present, else
    ``cpu``), a device, ``"auto"``/``"sequential"`` or a ``{module: device}`` dict. ``patch`` swaps in
    qconv kernels where available; ``patch=False`` is stock transformers. ``verify`` checks the
    manifest's sha256 of every file first. The model is returned in eval mode, like transformers does.

    Patches (CUDA, or CPU under ``TRITON_INTERPRET=1``) swap RMSNorm, the gated MLP's activation, RoPE and
    the causal-LM loss for qconv kernels; the cross-entropy kernel may reuse the logits' memory for their
    gradient, so read ``outputs.logits`` before ``loss.backward()``.
    ``model._qconv`` records what happened (directory, revision, patched ops, replayed tokenizer fixes,
    whether transformers had to load a checkpoint whose names need its renaming rules, phase timings in
    ``timings`` and, on Linux, host memory at each phase in ``rss_mib``: ``[VmRSS, VmHWM]`` in MiB).
    Python's cyclic garbage collector is paused during the call and restored afterwards
    (:mod:`qconv.runtime.gc_pause`); ``timings["gc_collect_s"]`` is the one collection that replaces
    the ones the imports would have triggered.
    """
    gc_stats: dict[str, float] = {}
    with gc_paused(gc_stats):
        model, tokenizer = _load(
            name_or_path, max_seq_length=max_seq_length, dtype=dtype, device_map=device_map, patch=patch,
            fix_tokenizer=fix_tokenizer, trust_remote_code=trust_remote_code, revision=revision, token=token,
            verify=verify)
    info = getattr(model, "_qconv", None)
    if isinstance(info, dict):
        info.setdefault("timings", {}).update(gc_stats)
    return model, tokenizer


def _load(name_or_path: str | os.PathLike, *, max_seq_length: int | None, dtype: Any, device_map: Any, patch: bool,
          fix_tokenizer: bool, trust_remote_code: bool, revision: str | None, token: str | None, verify: bool):
    """The body of :func:`from_pretrained` (run with the garbage collector paused)."""
    start = time.perf_counter()
    marks: dict[str, float] = {}
    rss: dict[str, tuple[float, float]] = {}  # phase -> (VmRSS, VmHWM) MiB, Linux only

    def mark(name: str) -> None:
        marks[name] = round(time.perf_counter() - start, 3)
        reading = host_rss_mib()
        if reading is not None:
            rss[name] = reading

    mark("start")

    ckpt = ckpt_mod.open_checkpoint(name_or_path, revision=revision, token=token, trust_remote_code=trust_remote_code)
    if verify:
        ckpt_mod.verify_files(ckpt)
    headers, entries = _parse_headers(ckpt.shards)
    quantized = fmt.quantized_weight_names(entries)
    if not quantized:
        raise QconvError(
            f"{ckpt.directory}: the shards hold no bitsandbytes 4-bit weights; convert the model first: "
            f"qconv convert <source> <out_dir>"
        )
    settings = fmt.settings_from_quantization_config(ckpt.config["quantization_config"])
    mark("headers")

    from qconv.runtime.device_map import resolve_device_map, resolve_dtype

    sizes = {name: e.nbytes for name, e in entries.items()}
    plan = resolve_device_map(device_map, sizes, tied_embeddings=bool(ckpt.config.get("tie_word_embeddings", False)))
    main = plan.main_device
    dtype = resolve_dtype(dtype, main)
    compute_dtype = _compute_dtype(settings, main)
    mark("torch")
    starter = _StagingStarter(headers, plan.device_of, lambda: mark("reading_started"))
    config = None
    try:
        from qconv.runtime import skeleton

        config = skeleton.load_config(ckpt.directory, trust_remote_code=trust_remote_code)
        mark("config")
        if max_seq_length is not None:
            skeleton.apply_max_seq_length(config, max_seq_length)
        cls = skeleton.model_class(config, ckpt.directory, trust_remote_code=trust_remote_code)
        mark("model_class")
        model = skeleton.build_skeleton(cls, config, dtype)
        skeleton.replace_quantized_linears(model, quantized, settings, compute_dtype)
        expected = set(model.state_dict(keep_vars=True))
        stored = {n for n in entries if not fmt.is_state_tensor(n)}
        tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
        if stored - expected and expected - stored - tied:
            raise skeleton.LayoutMismatch(f"checkpoint names differ from the model's (e.g. {sorted(stored - expected)[0]})")
    except skeleton.LayoutMismatch as exc:
        starter.cancel()
        model = _fallback(ckpt.directory, config, dtype, plan, trust_remote_code, str(exc))
        fallback = True
    except BaseException:
        starter.cancel()
        raise
    else:
        fallback = False
        mark("skeleton")
        staging = starter.get()
        tensors = staging.wait()
        mark("read_done")
        marks["bytes_landed"] = round(staging.finished_at - start, 3)  # when the readers really finished
        from qconv.runtime.materialize import fill_model

        report = fill_model(model, tensors, quantized, plan.device_of, skeleton.dtype_plan(model, dtype))
        del tensors, staging, starter
        if report.unexpected:
            logger.warning("%d checkpoint tensors unused by %s (e.g. %s)", len(report.unexpected), cls.__name__, sorted(report.unexpected)[0])
        if report.missing:
            logger.warning("%d parameters not in the checkpoint were initialised (e.g. %s)", len(report.missing), sorted(report.missing)[0])
        model.config.name_or_path = str(name_or_path)
        _guard_cpu_fast_path(model)
        _load_generation_config(model, ckpt.directory)
        _mark_quantized(model, ckpt.config["quantization_config"], compute_dtype)
        model.eval()
        if len(plan.devices) > 1:
            from accelerate import dispatch_model

            from qconv.runtime.device_map import covering_map

            hf_map = {k: (d.index if d.type == "cuda" else d.type) for k, d in covering_map(model, plan.device_of).items()}
            dispatch_model(model, device_map=hf_map)  # hooks move activations between the devices
            model.hf_device_map = hf_map
        else:
            model.hf_device_map = plan.hf_device_map()
        mark("filled")
        logger.info("read %.2f GiB by %.2f s, %d quantized Linear", sum(sizes.values()) / 2**30, marks["read_done"], report.quantized)

    from qconv.runtime.tokenizer_replay import load_tokenizer, replay_fixes, sync_pad_ids

    tokenizer = load_tokenizer(ckpt.directory, trust_remote_code=trust_remote_code, max_seq_length=max_seq_length)
    replayed: list[str] = []
    if tokenizer is not None and fix_tokenizer:
        replayed = replay_fixes(tokenizer, ckpt.manifest.tokenizer_fixes if ckpt.manifest else [])
        sync_pad_ids(model, tokenizer)
    mark("tokenizer")
    patched: list[str] = []
    if patch and (main.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        from qconv.runtime.patches import apply_patches

        patched = apply_patches(model)
    mark("patched")
    model._qconv = {
        "source": str(name_or_path), "directory": str(ckpt.directory), "revision": ckpt.revision, "fallback": fallback,
        "patched": patched, "tokenizer_fixes": replayed, "seconds": round(time.perf_counter() - start, 3), "timings": marks,
        "rss_mib": rss,
    }
    logger.info("loaded %s in %.2f s (patched: %s)", name_or_path, model._qconv["seconds"], ", ".join(patched) or "none")
    return model, tokenizer
