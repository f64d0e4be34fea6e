"""Weight files a user hands in, checked before the libraries parse them.

safetensors and gguf read their headers lazily and, on a truncated, bit-flipped or hostile file, fail
deep inside themselves (a Rust `HeaderTooLarge`, a numpy `IndexError` at some offset) or, for a header
that claims 2^60 entries, loop or try to size a huge structure. These checks bound every size the
header declares by the file's real size first, then let the library read the file, and turn any
failure into one line naming the file and the tensor or field.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own reference limit (safetensors' MAX_HEADER_SIZE)
SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                      "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
# The smallest possible entries: a tensor info is name length (8) + >= 1 name byte + n_dims (4) + type (4)
# + offset (8); a metadata pair is key length (8) + >= 1 key byte + value type (4) + >= 1 value byte.
_MIN_TENSOR_INFO, _MIN_KV = 25, 14


class WeightFileError(ValueError):
    """A weight file that cannot be what it claims; the message names the file and what is wrong."""


def check_safetensors(path: str | os.PathLike) -> dict:
    """Validate a .safetensors header against the file's size; return the parsed header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path}: {size} bytes, too short for a safetensors file (an 8-byte header length "
                                  "comes first): the file is truncated or not safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise WeightFileError(f"{path}: the header claims {n:,} bytes but the file has {size - 8:,} after the "
                                  f"length field (limit {MAX_SAFETENSORS_HEADER:,}): truncated, corrupt or not "
                                  "safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightFileError(f"{path}: the header is not valid UTF-8 JSON ({e}): the file is corrupt") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensors")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightFileError(f"{path}: tensor {name!r} lacks dtype / shape / data_offsets [begin, end]") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightFileError(f"{path}: tensor {name!r} has dtype {dtype!r}; known: {sorted(SAFETENSORS_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WeightFileError(f"{path}: tensor {name!r} has shape {shape!r}, not a list of non-negative ints")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len):
            raise WeightFileError(f"{path}: tensor {name!r} claims bytes [{begin}, {end}) of a {data_len:,}-byte data "
                                  "section: the file is truncated or its header corrupt")
        want = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if end - begin != want:
            raise WeightFileError(f"{path}: tensor {name!r} ({dtype} {shape}) needs {want:,} bytes but its offsets "
                                  f"span {end - begin:,}: the header is corrupt")
    return header


def check_gguf(path: str | os.PathLike) -> None:
    """Validate a .gguf preamble (magic, version, counts bounded by the file's size)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise WeightFileError(f"{path}: not a GGUF file (it must start with the bytes 'GGUF' and a 24-byte preamble; "
                              f"it starts with {head[:4]!r})")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in GGUF_VERSIONS:
        raise WeightFileError(f"{path}: GGUF version {version}; this reader handles versions {GGUF_VERSIONS}")
    if n_tensors * _MIN_TENSOR_INFO + n_kv * _MIN_KV > size - 24:
        raise WeightFileError(f"{path}: the header claims {n_tensors:,} tensors and {n_kv:,} metadata entries, "
                              f"more than its {size:,} bytes can hold: truncated or corrupt")


def open_gguf(path: str | os.PathLike):
    """gguf.GGUFReader over a checked file; a failure while parsing names the file, and every tensor's
    data must lie inside the file."""
    import gguf

    check_gguf(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader's errors (IndexError, ValueError, ...) say nothing of the file
        raise WeightFileError(f"{path}: a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    for t in reader.tensors:
        if int(t.data.nbytes) != int(t.n_bytes):
            raise WeightFileError(f"{path}: tensor {t.name!r} needs {int(t.n_bytes):,} bytes but the file holds "
                                  f"{int(t.data.nbytes):,} of them: the file is truncated")
    return reader


def check_tokenizer_fits(tokenizer, vocab_size: int, where: str) -> None:
    """A tokenizer whose ids reach past the embedding table would index garbage (or crash on device)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise WeightFileError(f"{where}: the tokenizer has {n:,} tokens but the weights' embedding has {vocab_size:,} "
                              "rows: the tokenizer belongs to another model (pass the tokenizer files that came "
                              "with these weights)")
