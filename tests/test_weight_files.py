"""Hostile and broken weight files: every size a header declares is bounded by the file before anything
is allocated, and every failure is one line naming the file and the tensor or field."""
import json
import struct

import gguf
import numpy as np
import pytest

from rsllm_jax.checkpoint import file_checks
from rsllm_jax.checkpoint.file_checks import WeightFileError
from rsllm_jax.checkpoint.gguf import load_gguf
from rsllm_jax.checkpoint.hf import load_hf, save_hf
from rsllm_jax.checkpoint.loader import load_llm
from tiny_llm import save_tiny_llm, tiny_llm


@pytest.fixture
def hf_dir(tmp_path):
    return save_tiny_llm(tmp_path / "hf")


def _rewrite_header(path, mutate):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def test_a_good_checkpoint_passes_the_checks(hf_dir):
    header = file_checks.check_safetensors(hf_dir / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    config, params, tok = load_llm(str(hf_dir))
    assert config.vocab_size >= len(tok)


@pytest.mark.parametrize("case,match", [
    ("header_length_2_60", "claims 1,152,921,504,606,846,976 bytes"),
    ("truncated_to_4_bytes", "too short"),
    ("truncated_data", "claims bytes"),
    ("bit_flipped_json", "not valid UTF-8 JSON"),
    ("shape_disagrees", "needs"),
    ("unknown_dtype", "dtype 'Q4'"),
    ("binary_garbage", "claims"),
])
def test_broken_safetensors_are_refused_naming_file_and_tensor(hf_dir, case, match):
    f = hf_dir / "model.safetensors"
    raw = f.read_bytes()
    if case == "header_length_2_60":
        f.write_bytes(struct.pack("<Q", 2**60) + raw[8:])
    elif case == "truncated_to_4_bytes":
        f.write_bytes(raw[:4])
    elif case == "truncated_data":
        f.write_bytes(raw[:len(raw) - 100])
    elif case == "bit_flipped_json":
        f.write_bytes(raw[:9] + bytes([raw[9] ^ 0xFF]) + raw[10:])
    elif case == "shape_disagrees":
        _rewrite_header(f, lambda h: h["model.embed_tokens.weight"].update(shape=[7, 7]))
    elif case == "unknown_dtype":
        _rewrite_header(f, lambda h: h["model.norm.weight"].update(dtype="Q4"))
    elif case == "binary_garbage":
        f.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(WeightFileError, match=match) as e:
        load_hf(hf_dir)
    assert str(f) in str(e.value)


def test_a_sharded_index_naming_a_missing_shard_is_refused(hf_dir):
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00002.safetensors"):
        load_hf(hf_dir)
    (hf_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(WeightFileError, match="not a safetensors index"):
        load_hf(hf_dir)


def test_a_tokenizer_from_another_model_is_refused(tmp_path):
    config, params, tok = tiny_llm(vocab_size=16)  # fewer embedding rows than the tokenizer has tokens
    save_hf(params, config, tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.raises(WeightFileError, match=f"tokenizer has {len(tok):,} tokens but the weights' embedding has 16"):
        load_llm(str(tmp_path / "m"))


def _write_gguf(path, *, arch="llama", tensors=(("t", np.ones((4, 8), np.float32)),), raw_dtype=None):
    w = gguf.GGUFWriter(str(path), arch)
    for name, t in tensors:
        w.add_tensor(name, t, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case,match", [
    ("not_gguf", "not a GGUF file"),
    ("version_99", "GGUF version 99"),
    ("tensor_count_2_60", "claims 1,152,921,504,606,846,976 tensors"),
    ("kv_count_2_40", "metadata entries, more than"),
    ("truncated_tensor_data", "truncated"),
    ("empty", "not a GGUF file"),
])
def test_broken_gguf_is_refused_before_allocation(tmp_path, case, match):
    f = tmp_path / "m.gguf"
    _write_gguf(f)
    raw = bytearray(f.read_bytes())
    if case == "not_gguf":
        raw[:4] = b"GGML"
    elif case == "version_99":
        raw[4:8] = struct.pack("<I", 99)
    elif case == "tensor_count_2_60":
        raw[8:16] = struct.pack("<Q", 2**60)
    elif case == "kv_count_2_40":
        raw[16:24] = struct.pack("<Q", 2**40)
    elif case == "truncated_tensor_data":
        raw = raw[:-16]
    elif case == "empty":
        raw = b""
    f.write_bytes(bytes(raw))
    with pytest.raises(WeightFileError, match=match) as e:
        load_gguf(f)
    assert str(f) in str(e.value)


def test_gguf_of_another_architecture_is_refused(tmp_path):
    f = tmp_path / "qwen.gguf"
    _write_gguf(f, arch="qwen2")
    with pytest.raises(WeightFileError, match="architecture 'qwen2': only 'llama'"):
        load_gguf(f)
    f = tmp_path / "bare.gguf"
    _write_gguf(f)
    with pytest.raises(WeightFileError, match="incomplete llama metadata"):
        load_gguf(f)


def test_a_quantisation_numpy_cannot_dequantize_names_the_tensor(tmp_path):
    from rsllm_jax.checkpoint.gguf import dequantized

    f = tmp_path / "q.gguf"
    q = gguf.GGMLQuantizationType
    unsupported = next(t for t in (q.IQ2_XXS, q.IQ1_S, q.IQ4_XS, q.Q4_0_4_4 if hasattr(q, "Q4_0_4_4") else q.IQ1_M)
                       if t in gguf.GGML_QUANT_SIZES)
    block, nbytes = gguf.GGML_QUANT_SIZES[unsupported]
    _write_gguf(f, tensors=(("blk.0.attn_q.weight", np.zeros((2, nbytes), np.uint8)),), raw_dtype=unsupported)
    (tensor,) = file_checks.open_gguf(f).tensors
    try:
        dequantized(tensor)
    except WeightFileError as e:
        assert "blk.0.attn_q.weight" in str(e) and unsupported.name in str(e)
    else:  # this gguf release dequantizes it: then the values must at least have the declared size
        assert dequantized(tensor).size == 2 * block
