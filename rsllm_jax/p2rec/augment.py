"""P2Rec information augmentation: LLM item embeddings from the reconstruction-tuned LLM, reduced to
SASRec's width, initialise (mode 'init') or are added to (mode 'add') the item table of a new SASRec
trained as usual; then SASRec vs SASRec + P2Rec on the same splits, overall and on cold items.

Reduction ('reduce'): 'pca' = numpy SVD to config.sasrec.hidden components, scaled to SASRec's init
scale; 'learned' = the (standardised) LLM embeddings as a frozen side table read through a trainable
Dense(hidden) inside SASRec. Modes: pca/init -> the item rows start at the PCA rows; pca/add -> a frozen
PCA table is added to freshly initialised item rows; learned/add -> Dense(LLM) is added to freshly
initialised rows; learned/init -> the learned rows start at zero, so every item vector starts as
Dense(LLM) and the ID rows learn a residual.

Outputs under the workdir: llm_item_embeddings.npy (+ .json: the fingerprint it was computed for;
reused when it matches), sasrec_p2rec/ (the augmented SASRec's run dir: checkpoints, results.json,
item_embeddings.npy usable as a stage-0 table), sasrec_base/ (only with base='retrain'),
results.json, comparison.md.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Sequence

import flax.linen as nn
import grain
import jax
import numpy as np
from absl import logging
from flax import traverse_util

from rsllm_jax import sharding
from rsllm_jax.checkpoint.run_dirs import has_checkpoint, sibling_dir
from rsllm_jax.data import pipeline
from rsllm_jax.data.sasrec_batches import SasrecEvalTransform
from rsllm_jax.data.splits import SplitData, item_train_counts, load_split_from_config
from rsllm_jax.eval import ranking
from rsllm_jax.models.sasrec import SASRec
from rsllm_jax.p2rec import compare
from rsllm_jax.checkpoint.run_dirs import restore_subtree
from rsllm_jax.p2rec.common import (
    LORA_REGEX, TitlePrompts, pooled_states, run_batched, sasrec_config_from_params,
)
from rsllm_jax.train.rsllm_setup import build_rsllm
from rsllm_jax.run_files import is_writer, write_json_atomic
from rsllm_jax.train.sasrec_step import eval_scores

REDUCE = ("pca", "learned")
MODES = ("init", "add")
BASES = ("sasrec_dir", "retrain")
CACHE_NAME = "llm_item_embeddings"
NO_RECONSTRUCTION = "none"  # config.p2rec.reconstruct_dir value: embed with the pretrained LLM (ablation)


# ---------------------------------------------------------------- pure pieces
def pca(x: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Project centred rows on the top `dim` principal axes -> (z [N, dim], explained variance ratios [dim]).
    Columns come in decreasing variance; signs are fixed (largest loading positive) for reproducibility."""
    x = np.asarray(x, np.float64)
    if not 1 <= dim <= min(x.shape):
        raise ValueError(f"PCA to {dim} dims needs at least {dim} items and an input width >= {dim}; got "
                         f"{x.shape}. Use config.p2rec.reduce='learned' or a smaller config.sasrec.hidden")
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    vt = vt[:dim] * np.sign(vt[np.arange(dim), np.abs(vt[:dim]).argmax(1)])[:, None]
    var = s**2
    return (xc @ vt.T).astype(np.float32), (var[:dim] / max(var.sum(), 1e-30)).astype(np.float32)


def match_scale(z: np.ndarray, std: float) -> np.ndarray:
    """One global factor so the entries have standard deviation `std` (keeps the columns' order)."""
    cur = float(np.std(z))
    return (z * (std / cur if cur > 0 else 0.0)).astype(np.float32)


def augmentation_tables(llm_emb: np.ndarray, hidden: int, reduce: str, mode: str, scale: float = 0.0) -> dict:
    """-> dict(item_init, side_table, side_proj, info) for `train_sasrec` (see the module docstring).
    `scale` = the reduced table's entry std; 0 = SASRec's own init std (hidden ** -0.5)."""
    if reduce not in REDUCE:
        raise ValueError(f"config.p2rec.reduce must be one of {REDUCE}, got {reduce!r}")
    if mode not in MODES:
        raise ValueError(f"config.p2rec.mode must be one of {MODES}, got {mode!r}")
    std = scale or hidden**-0.5
    if reduce == "pca":
        z, ratio = pca(llm_emb, hidden)
        z = match_scale(z, std)
        info = dict(explained_variance=float(ratio.sum()), explained_variance_first=ratio[:5].tolist())
        return dict(item_init=z if mode == "init" else None, side_table=z if mode == "add" else None,
                    side_proj=False, info=info)
    x = np.asarray(llm_emb, np.float32)
    x = match_scale(x - x.mean(0), 1.0)  # standardised input for the learned Dense
    item_init = np.zeros((len(x), hidden), np.float32) if mode == "init" else None
    return dict(item_init=item_init, side_table=x, side_proj=True, info=dict(llm_dim=int(x.shape[1])))


def summarize(hit1: np.ndarray, ranks: np.ndarray, mask: np.ndarray | None = None, k: int = 10) -> dict:
    """n, HR@1 on the candidates, catalogue HR@k / NDCG@k over the rows in `mask` (None if there are none)."""
    mask = np.ones(len(hit1), bool) if mask is None else np.asarray(mask, bool)
    n = int(mask.sum())
    if n == 0:
        return dict(n=0, hr1_cand=None, hr10=None, ndcg10=None)
    hr, ndcg = ranking.hr_ndcg_at_k(ranks, k)
    return dict(n=n, hr1_cand=ranking.mean_of(hit1, mask), hr10=ranking.mean_of(hr, mask),
                ndcg10=ranking.mean_of(ndcg, mask))


# ---------------------------------------------------------------- evaluation with a cold breakdown
@dataclasses.dataclass(frozen=True)
class _WithRow(grain.transforms.Map):
    inner: SasrecEvalTransform

    def map(self, record: dict) -> dict:
        return {**self.inner.map(record), "row": np.int32(record["_row"])}


def evaluate_sasrec(params, records: Sequence[dict], cold_items: np.ndarray, mesh, *, batch_size: int,
                    num_candidates: int) -> dict:
    """Per-row HR@1 (20 candidates) and catalogue rank of a SASRec parameter tree, aggregated overall and
    over the rows whose target is cold (`cold_items` [num_items] bool)."""
    model = SASRec(sasrec_config_from_params(params))
    mcfg = model.config
    rows = [dict(r, _row=i) for i, r in enumerate(records)]
    ds = pipeline.eval_dataset(rows, _WithRow(SasrecEvalTransform(mcfg.num_items, mcfg.max_len, num_candidates)),
                               global_batch_size=batch_size)
    eval_fn = jax.jit(functools.partial(eval_scores, model))
    params = jax.device_put(params, sharding.replicated(mesh))
    hit1, ranks = np.zeros(len(records)), np.zeros(len(records), np.int64)
    seen = np.zeros(len(records), bool)
    with jax.set_mesh(mesh):
        for batch in ds:
            # Row ids and validity travel with the batch so rows land in place on any process count.
            index = jax.tree.map(sharding.to_host,
                                 sharding.global_batch({"row": batch.pop("row"), "valid": batch.pop("valid")}, mesh))
            h, r = eval_fn(params, sharding.global_batch(batch, mesh))
            h, r = sharding.to_host(h), sharding.to_host(r)
            ok = index["valid"].astype(bool)
            hit1[index["row"][ok]], ranks[index["row"][ok]] = h[ok], r[ok]
            seen[index["row"][ok]] = True
    assert seen.all(), "evaluation missed rows"
    cold = np.asarray([cold_items[int(r["target"])] for r in records], bool)
    # per_row: what a paired test between two models on the same rows needs (p2rec.compare.sign_test).
    return dict(summarize(hit1, ranks), cold=summarize(hit1, ranks, cold),
                per_row=dict(hit1=hit1.astype(int).tolist(), rank=ranks.tolist(), cold=cold.astype(int).tolist()))


# ---------------------------------------------------------------- LLM item embeddings (cached)
def _lora_fingerprint(cfg, lora: dict, step: int, titles: Sequence[str]) -> str:
    h = hashlib.sha256()
    for path, leaf in sorted(traverse_util.flatten_dict(lora, sep="/").items()):
        h.update(path.encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    p = cfg.p2rec
    h.update(json.dumps(dict(llm=cfg.llm.model, dtype=cfg.llm.dtype, step=step, prompt=p.item_prompt, pool=p.pool,
                             max_title_tokens=p.max_title_tokens, lora=cfg.lora.to_dict()), sort_keys=True,
                        default=str).encode())
    h.update("\n".join(titles).encode())
    return h.hexdigest()[:20]


def embed_items_with_llm(cfg, titles: Sequence[str], lora: dict, *, llm=None) -> np.ndarray:
    """Every item's pooled hidden state [num_items, d_llm] under the tuned LoRA. The only place the LLM runs."""
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh.rules)
    built = build_rsllm(cfg, mesh, extra_params=lora or None, llm=llm, seed=cfg.seed)
    p = cfg.p2rec
    prompts = TitlePrompts(built.tokenizer, titles, p.item_prompt, "title", name="item_prompt",
                           max_title_tokens=p.max_title_tokens, pool=p.pool)
    arrays = prompts.batch([[i] for i in range(len(titles))])
    fn = jax.jit(functools.partial(pooled_states, built.model))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return run_batched(lambda **b: fn(built.params, b["input_ids"], b["attention_mask"], b["pool_mask"]),
                           arrays, p.embed_batch_size, mesh, desc="llm item embeddings")


def item_embeddings_cached(cfg, workdir: str, titles: Sequence[str], *, llm=None) -> tuple[np.ndarray, dict]:
    """<workdir>/llm_item_embeddings.npy, recomputed only when the reconstruction checkpoint, the LLM or the
    item prompt changed (the fingerprint in the .json sidecar)."""
    if cfg.p2rec.reconstruct_dir == NO_RECONSTRUCTION:  # the ablation: no preference-parsing SFT
        rdir, lora, step = NO_RECONSTRUCTION, {}, -1
    else:
        rdir = sibling_dir(cfg.p2rec.reconstruct_dir, workdir, f"p2rec_reconstruct-{cfg.data.dataset}")
        trained, step = restore_subtree(rdir, "trainable")
        flat = traverse_util.flatten_dict(trained, sep="/")
        lora = traverse_util.unflatten_dict({k: v for k, v in flat.items() if re.fullmatch(LORA_REGEX, k)}, sep="/")
    fp = _lora_fingerprint(cfg, lora, step, titles)
    path, meta_path = (os.path.join(workdir, CACHE_NAME + ext) for ext in (".npy", ".json"))
    if os.path.exists(path) and os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("fingerprint") == fp:
            logging.info("p2rec: reusing %s (fingerprint %s)", path, fp)
            return np.load(path), dict(meta, reused=True)
        logging.info("p2rec: %s is stale (fingerprint %s != %s); recomputing", path, meta.get("fingerprint"), fp)
    t0 = time.time()
    emb = embed_items_with_llm(cfg, titles, lora, llm=llm)
    meta = dict(fingerprint=fp, reconstruct_dir=rdir if rdir == NO_RECONSTRUCTION else os.path.abspath(rdir),
                reconstruct_step=step, shape=list(emb.shape),
                seconds=round(time.time() - t0, 1))
    if is_writer():
        os.makedirs(workdir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}.npy"
        np.save(tmp, emb)
        os.replace(tmp, path)
        write_json_atomic(meta_path, meta)
    return emb, dict(meta, reused=False)


# ---------------------------------------------------------------- the run
def _base_params(cfg, workdir: str, split: SplitData, reconstruct_dir: str) -> tuple[dict, dict]:
    """The SASRec to compare against: the stage-0 run the reconstruction read (default) or one retrained
    here with this config."""
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    if cfg.p2rec.base not in BASES:
        raise ValueError(f"config.p2rec.base must be one of {BASES}, got {cfg.p2rec.base!r}")
    if cfg.p2rec.base == "retrain":
        run_dir = os.path.join(workdir, "sasrec_base")
        train_sasrec(cfg, run_dir, split)
        return restore_subtree(run_dir, "params")[0], dict(source="retrain", run_dir=os.path.abspath(run_dir),
                                                            config_matches=True)
    run_dir = cfg.p2rec.sasrec_dir
    if not run_dir and reconstruct_dir != NO_RECONSTRUCTION:  # the SASRec the reconstruction read
        run_dir = _recorded(reconstruct_dir, "sasrec_dir") or ""
    run_dir = sibling_dir(run_dir, workdir, f"sasrec-{cfg.data.dataset}")
    params, _ = restore_subtree(run_dir, "params")
    # The comparison is only controlled if the stage-0 run used the same SASRec settings.
    matches = None
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            matches = json.load(f).get("sasrec") == json.loads(cfg.sasrec.to_json_best_effort())
        if not matches:
            logging.warning("p2rec: the base SASRec in %s was trained with other config.sasrec settings than the "
                            "augmented one; use config.p2rec.base='retrain' for a controlled comparison", run_dir)
    return params, dict(source="sasrec_dir", run_dir=os.path.abspath(run_dir), config_matches=matches)


def _recorded(run_dir: str, key: str):
    """`key` of a run's results.json (None when absent: no run, or one written before the field)."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get(key)


def run_augment(cfg, workdir: str, *, llm=None) -> dict:
    """Embed items with the tuned LLM, train the augmented SASRec, compare with the base on val and test."""
    from rsllm_jax.train.sasrec_trainer import train_sasrec

    t_start = time.time()
    p = cfg.p2rec
    os.makedirs(workdir, exist_ok=True)
    split = load_split_from_config(cfg.data)
    untuned = p.reconstruct_dir == NO_RECONSTRUCTION
    rdir = NO_RECONSTRUCTION if untuned else sibling_dir(p.reconstruct_dir, workdir,
                                                         f"p2rec_reconstruct-{cfg.data.dataset}")
    if not untuned and not has_checkpoint(rdir):
        raise FileNotFoundError(f"no reconstruction checkpoint in {rdir}: run configs/p2rec_reconstruct.py into it, "
                                "set config.p2rec.reconstruct_dir, or start through `python -m rsllm_jax.main` with "
                                "config.p2rec.build_missing=True, which runs it first")

    llm_emb, cache_info = item_embeddings_cached(cfg, workdir, split.titles, llm=llm)
    if llm_emb.shape[0] != split.num_items:
        raise ValueError(f"{workdir}/{CACHE_NAME}.npy has {llm_emb.shape[0]} rows, dataset {split.dataset} has "
                         f"{split.num_items} items: delete it or use another workdir")
    tables = augmentation_tables(llm_emb, cfg.sasrec.hidden, p.reduce, p.mode, p.embed_scale)

    mesh = sharding.make_mesh(cfg.mesh)
    cold_items = item_train_counts(split.train, split.num_items) < p.cold_threshold
    evaluate = functools.partial(evaluate_sasrec, cold_items=cold_items, mesh=mesh,
                                 batch_size=cfg.sasrec.eval_batch_size, num_candidates=cfg.data.num_candidates)

    base_params, base_info = _base_params(cfg, workdir, split, rdir)
    aug_dir = os.path.join(workdir, "sasrec_p2rec")
    aug_train = train_sasrec(cfg, aug_dir, split, item_init=tables["item_init"], side_table=tables["side_table"],
                             side_proj=tables["side_proj"])
    aug_params, _ = restore_subtree(aug_dir, "params")

    models = {}
    for name, params in (("base", base_params), ("p2rec", aug_params)):
        models[name] = {s: evaluate(params, getattr(split, s)) for s in ("val", "test")}
    models["base"]["info"] = base_info
    models["p2rec"]["info"] = dict(reduce=p.reduce, mode=p.mode, llm="pretrained" if untuned else "reconstruction-tuned",
                                   reconstruct_prior_temperature=_recorded(rdir, "prior_temperature"),
                                   run_dir=os.path.abspath(aug_dir),
                                   best_epoch=aug_train.get("best_epoch"), **tables["info"])
    results = dict(
        stage="p2rec_augment", dataset=split.dataset, base=models["base"], p2rec=models["p2rec"],
        cold_threshold=p.cold_threshold, cold_items=int(cold_items.sum()), num_items=split.num_items,
        llm_item_embeddings=cache_info, sasrec_loss=cfg.sasrec.loss, wall_time_s=round(time.time() - t_start, 1),
    )
    write_json_atomic(os.path.join(workdir, "results.json"), results)
    if is_writer():
        with open(os.path.join(workdir, "comparison.md"), "w") as f:
            f.write(compare.markdown_table([results], split="test") + "\n")
    logging.info("p2rec augment %s test: base %s / p2rec %s", split.dataset, models["base"]["test"],
                 models["p2rec"]["test"])
    return results
