"""The stage-2 model both LLM sections run: the project's real config + build path on a 1-device mesh."""
from __future__ import annotations

import contextlib
import dataclasses

import flax.linen as nn
import jax

from benchmarks import torch_reference, workload
from configs import stage2
from rsllm_jax import sharding
from rsllm_jax.checkpoint.loader import load_llm
from rsllm_jax.train.rsllm_setup import Built, build_rsllm


def load(model: str, scan_layers: bool):
    """(config, params, tokenizer=None) for 'smollm2', a .gguf or an HF checkpoint dir. The synthetic
    batches need no tokenizer, so a tiny test checkpoint without one works too."""
    return load_llm(model, with_tokenizer=False, scan_layers=scan_layers)


def stage2_config(scan_layers: bool, target_len: int, remat_policy: str = "dots_no_batch", lora_dropout: float = 0.0,
                  dtype: str = "float32"):
    """configs/stage2.py with what a benchmark must pin: one device, one micro-batch, dropout off unless
    asked (off, the two frameworks' first-step losses are comparable). LoRA rank/alpha/targets, loss weights,
    temperature and the optimizer stay the spec's."""
    cfg = stage2.get_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 1, 1
    cfg.llm.scan_layers = scan_layers
    cfg.llm.remat_policy = remat_policy
    cfg.lora.dropout = lora_dropout
    cfg.llm.dtype = cfg.llm.param_dtype = dtype  # compute and frozen-weight storage; trained leaves stay fp32
    cfg.train.grad_accum_steps = 1
    cfg.prompts.target_len = target_len
    return cfg


@dataclasses.dataclass
class Setup:
    cfg: object
    mesh: jax.sharding.Mesh
    rules: tuple
    built: Built
    torch_model: torch_reference.TorchRSLLM | None

    @contextlib.contextmanager
    def context(self):
        """What every trainer wraps its steps in: the mesh and the logical-axis rules."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def build(llm, *, scan_layers: bool, target_len: int, remat_policy: str = "dots_no_batch",
          lora_dropout: float = 0.0, dtype: str = "float32", with_torch: bool = True) -> Setup:
    """A fresh RSLLM (loaded LLaMA + newly initialised LoRA/projector/added rows, synthetic SASRec
    table) and its PyTorch twin holding the same numbers. Fresh per section: the JAX train step
    donates its state, and training moves the torch weights."""
    cfg = stage2_config(scan_layers, target_len, remat_policy, lora_dropout, dtype)
    llm = (dataclasses.replace(llm[0], remat_policy=remat_policy), *llm[1:])  # an execution option of the config
    mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])  # one device: comparable with single-process torch
    rules = sharding.rules_from_config(cfg.mesh.rules)
    table = workload.rec_table()
    built = build_rsllm(cfg, mesh, num_items=table.shape[0], rec_table=table, llm=llm)
    torch_model = torch_reference.from_jax(built.params, llm[0], built.model.lora) if with_torch else None
    return Setup(cfg, mesh, rules, built, torch_model)
