"""Benchmarks: rsllm_jax against PyTorch references on the same jobs (`python -m benchmarks.run --out=DIR`)."""
