"""Evaluate an RSLLM parameter tree on a split with both protocols (spec §6).

Generation protocol (LLaRA): batched KV-cache greedy decoding of the hybrid prompt, first line,
substring matching against the 20 frozen candidates -> ValidRatio, HitRatio@1, accuracy.
Two-tower protocol (ours): v_U from the prompt's history span vs v_T of each item (the item alone,
computed once per item and cached on disk) -> HR@1 on the candidates, HR@10 / NDCG@10 on the catalogue.

Writes <out_dir>/predictions_<name>.jsonl and <out_dir>/metrics_<name>.json.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from tqdm.auto import tqdm

from rsllm_jax import losses, sharding
from rsllm_jax.data.prompt_pipeline import EvalExample, eval_batches
from rsllm_jax.data.prompts import PromptBuilder
from rsllm_jax.data.splits import eval_subset
from rsllm_jax.eval import generation_metrics, ranking
from rsllm_jax.models.generate import blank_token_ids, for_inference, generate, stop_token_ids
from rsllm_jax.models.llama import Llama
from rsllm_jax.models.rsllm import RSLLM
from rsllm_jax.train.run_log import is_writer, write_json_atomic


class Evaluator:
    """Holds the jitted pieces for one model; `run` evaluates a params tree on some records."""

    def __init__(self, model: RSLLM, tokenizer, builder: PromptBuilder, mesh, *, batch_size: int,
                 max_new_tokens: int, template: int, use_ids: bool, buckets: Sequence[int]):
        self.model, self.tok, self.builder, self.mesh = model, tokenizer, builder, mesh
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.template, self.use_ids, self.buckets = template, use_ids, tuple(buckets)
        self.llm = Llama(model.config.llm, dtype=model.dtype, param_dtype=model.param_dtype, lora=model.lora)
        self.stop_ids = np.asarray(stop_token_ids(tokenizer, ("\n",)), np.int32)
        # An answer may open with a newline; only a newline after some text ends it.
        self.leading_ids = np.asarray(blank_token_ids(tokenizer), np.int32)
        self._item_memo: dict[str, np.ndarray] = {}  # item vectors per cache path, this process
        self._embed = jax.jit(lambda p, ids, slots: model.apply({"params": p}, ids, slots, method=RSLLM.embed))
        # L2-normalised mean of the last hidden states over `pool_mask` (the towers' vectors).
        self._pooled = jax.jit(lambda p, ids, mask, slots, pool_mask: losses.l2_normalize(
            losses.masked_mean_pool(model.apply({"params": p}, ids, mask, slots)[1], pool_mask)))

    def _global(self, x) -> jax.Array:
        # Every process holds the whole evaluation batch; each places its rows on its own devices.
        return sharding.host_to_global(x, self.mesh)

    # -- two-tower item side
    def item_vectors(self, params, num_items: int, cache_path: str | None = None) -> np.ndarray:
        """v_T for every item [num_items, D], L2-normalised; computed once and cached."""
        if cache_path and cache_path in self._item_memo:
            return self._item_memo[cache_path]
        # Every process must take the same branch (computing runs collectives): read the disk cache
        # only when all processes see it, never when process 0 has just written it and another not yet.
        missing = int(not (cache_path and os.path.exists(cache_path)))
        if cache_path and sharding.max_across_processes(missing) == 0:
            self._item_memo[cache_path] = np.load(cache_path)
            return self._item_memo[cache_path]
        vecs = []
        bs = max(self.batch_size, 16)
        for start in tqdm(range(0, num_items, bs), desc="item vectors", disable=not is_writer(), leave=False):
            items = list(range(start, min(start + bs, num_items)))
            items += [items[0]] * (bs - len(items))  # static batch shape
            rows = [self.builder.render_target(i, self.use_ids) for i in items]
            ids, mask, slots = (self._global(np.stack([r[k] for r in rows])) for k in
                                ("target_input_ids", "target_attention_mask", "target_slot_items"))
            v = self._pooled(params, ids, mask, slots, mask)
            vecs.append(sharding.to_host(v)[: min(bs, num_items - start)])
        out = np.concatenate(vecs).astype(np.float32)
        if cache_path:
            self._item_memo[cache_path] = out
            if is_writer():
                tmp = f"{cache_path}.tmp{os.getpid()}.npy"
                np.save(tmp, out)
                os.replace(tmp, cache_path)
        return out

    def run(self, params, records: Sequence[dict], titles: Sequence[str], *, out_dir: str | None, name: str,
            two_tower: bool = True, item_cache: str | None = None, limit: int = 0) -> dict:
        t0 = time.time()
        records = eval_subset(records, limit)
        num_items = len(titles)
        item_vecs = self.item_vectors(params, num_items, item_cache) if two_tower else None
        ds = eval_batches(records, EvalExample(self.builder, template=self.template, use_ids=self.use_ids),
                          global_batch_size=self.batch_size, buckets=self.buckets)
        scored, preds, cand_hits, ranks = [], [], [], []
        n_batches = -(-len(records) // self.batch_size)
        llm, llm_params = for_inference(self.llm, params["llm"])
        for batch in tqdm(ds, total=n_batches, desc=f"eval {name}", disable=not is_writer(), leave=False):
            valid = batch["valid"].astype(bool)
            ids, mask, slots = (self._global(batch[k]) for k in ("input_ids", "attention_mask", "slot_items"))
            embeds = self._embed(params, ids, slots)
            tokens, lengths = generate(llm, llm_params, inputs_embeds=embeds, attention_mask=mask,
                                       max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                       leading_ids=self.leading_ids)
            tokens, lengths = sharding.to_host(tokens), sharding.to_host(lengths)
            if two_tower:
                v_user = sharding.to_host(self._pooled(params, ids, mask, slots, self._global(batch["history_mask"])))
            for j in np.flatnonzero(valid):
                rec = records[int(batch["row"][j])]
                text = self.tok.decode(tokens[j, : lengths[j]], skip_special_tokens=True)
                cand_titles = [titles[c] for c in rec["candidates"]]
                s = generation_metrics.score_answer(text, cand_titles, rec["candidates"].index(rec["target"]))
                scored.append(s)
                pred = dict(row=int(batch["row"][j]), user=rec.get("user"), output=text,
                            matched=[cand_titles[i] for i in s["named"]], target=titles[rec["target"]], hit=s["hit"],
                            # Positions in the prompt's candidate list and item ids: what eval.answer_bias reads.
                            named_positions=[int(i) for i in s["named"]],
                            target_position=int(rec["candidates"].index(rec["target"])),
                            named_items=[int(rec["candidates"][i]) for i in s["named"]], target_item=int(rec["target"]))
                if two_tower:
                    u = v_user[j]
                    cand_scores = item_vecs[rec["candidates"]] @ u
                    top = rec["candidates"][int(np.argmax(cand_scores))]
                    cand_hits.append(float(top == rec["target"]))
                    all_scores = item_vecs @ u
                    r = ranking.target_rank(all_scores[None], np.asarray([rec["target"]]),
                                            exclude=np.asarray([rec["history"]]))
                    ranks.append(int(r[0]))
                    pred["two_tower_top"] = titles[top]
                preds.append(pred)
        metrics = generation_metrics.aggregate(scored)
        if two_tower:
            hr10, ndcg10 = ranking.hr_ndcg_at_k(np.asarray(ranks), 10)
            metrics.update(two_tower_hr1=float(np.mean(cand_hits)), two_tower_hr10=float(np.mean(hr10)),
                           two_tower_ndcg10=float(np.mean(ndcg10)))
        metrics["wall_time_s"] = round(time.time() - t0, 1)
        if out_dir and is_writer():
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"predictions_{name}.jsonl"), "w") as f:
                for p in preds:
                    f.write(json.dumps(p) + "\n")
            write_json_atomic(os.path.join(out_dir, f"metrics_{name}.json"), metrics)
        logging.info("eval %s: %s", name, metrics)
        return metrics


def params_fingerprint(params) -> str:
    """Short hash of the trainable leaves' values: names the item-vector cache of one checkpoint."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.asarray(leaf)
        h.update(a.tobytes()[:4096])
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]
