"""Evaluate an RSLLM parameter tree on a split with both protocols (spec §6).

Generation protocol (LLaRA): batched KV-cache greedy decoding of the hybrid prompt, first line,
substring matching against the 20 frozen candidates -> ValidRatio, HitRatio@1, accuracy.
Two-tower protocol (ours): v_U from the prompt's history span vs v_T of each item (the item alone,
computed once per item and cached on disk) -> HR@1 on the candidates, HR@10 / NDCG@10 on the catalogue.
Candidate likelihood (optional, `score_candidates`): the 20 candidates ranked by the LM's log-likelihood
of each as the answer (mean per token, and summed) -> likelihood HR@1 and the target's mean rank. It
never fails to answer, so it tells preference apart from answer format.

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
from rsllm_jax.data.prompt_pipeline import EvalExample, SasrecOrder, eval_batches
from rsllm_jax.data.prompts import PromptBuilder
from rsllm_jax.data.splits import eval_subset
from rsllm_jax.eval import generation_metrics, ranking
from rsllm_jax.models.generate import blank_token_ids, for_inference, generate, stop_token_ids
from rsllm_jax.models.llama import Llama
from rsllm_jax.models.rsllm import RSLLM
from rsllm_jax.models.score import continuation_logprobs, packed_length
from rsllm_jax.run_files import is_writer, write_json_atomic


class Evaluator:
    """Holds the jitted pieces for one model; `run` evaluates a params tree on some records."""

    def __init__(self, model: RSLLM, tokenizer, builder: PromptBuilder, mesh, *, batch_size: int,
                 max_new_tokens: int, template: int, use_ids: bool, buckets: Sequence[int],
                 generate: bool = True, score_candidates: bool = False, max_answer_tokens: int = 64,
                 candidate_order: SasrecOrder | None = None, grounded: bool = False):
        if not (generate or score_candidates or grounded):
            raise ValueError("config.eval: generate and score_candidates are both off; nothing to evaluate")
        self.model, self.tok, self.builder, self.mesh = model, tokenizer, builder, mesh
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.do_generate, self.score_candidates, self.max_answer_tokens = generate, score_candidates, max_answer_tokens
        self._answers: dict[int, list[int]] = {}  # item -> answer token ids (likelihood readout)
        self.template, self.use_ids, self.buckets = template, use_ids, tuple(buckets)
        self.candidate_order = candidate_order  # the order candidates are shown in (None: the split's)
        self.grounded = grounded  # also decode within the candidates' answers (a trie; models/generate.py)
        self.llm = Llama(model.config.llm, dtype=model.dtype, param_dtype=model.param_dtype, lora=model.lora)
        self.stop_ids = np.asarray(stop_token_ids(tokenizer, ("\n",)), np.int32)
        # An answer may open with a newline; only a newline after some text ends it.
        self.leading_ids = np.asarray(blank_token_ids(tokenizer), np.int32)
        self._item_memo: dict[str, np.ndarray] = {}  # item vectors per cache path, this process
        self._embed = jax.jit(lambda p, ids, slots, user_slot, user_state: model.apply(
            {"params": p}, ids, slots, user_slot, user_state, method=RSLLM.embed))
        # L2-normalised mean of the last hidden states over `pool_mask` (the towers' vectors).
        self._pooled = jax.jit(lambda p, ids, mask, slots, pool_mask, user_slot=None, user_state=None: losses.l2_normalize(
            losses.masked_mean_pool(model.apply({"params": p}, ids, mask, slots, user_slot=user_slot,
                                                user_state=user_state)[1], pool_mask)))

    def _global(self, x) -> jax.Array:
        # Every process holds the whole evaluation batch; each places its rows on its own devices.
        return sharding.host_to_global(x, self.mesh)

    # -- candidate likelihood
    def _candidate_answers(self, rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
        """Each row's candidates as answer token ids [B, K, L] and mask, right-padded; L is rounded up to a
        multiple of 8 (few compiled shapes) and capped at max_answer_tokens (longer answers are scored
        on that prefix, which the cap should make rare)."""
        answers = [[self._answer(c) for c in rec["candidates"]] for rec in rows]
        longest = max(len(a) for row in answers for a in row)
        length = min(-(-longest // 8) * 8, self.max_answer_tokens)
        ids = np.zeros((len(rows), len(answers[0]), length), np.int32)
        mask = np.zeros_like(ids)
        for b, row in enumerate(answers):
            for k, a in enumerate(row):
                a = a[:length]
                ids[b, k, : len(a)] = a
                mask[b, k, : len(a)] = 1
        return ids, mask

    def _answer(self, item: int) -> list[int]:
        if item not in self._answers:
            self._answers[item] = self.builder.answer_ids(item)
        return self._answers[item]

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
            two_tower: bool = True, item_cache: str | None = None, limit: int = 0, with_predictions: bool = False):
        """Metrics over `records` (and, `with_predictions`, also the per-row predictions: (metrics, preds))."""
        t0 = time.time()
        records = eval_subset(records, limit)
        num_items = len(titles)
        item_vecs = self.item_vectors(params, num_items, item_cache) if two_tower else None
        ds = eval_batches(records, EvalExample(self.builder, template=self.template, use_ids=self.use_ids,
                                                      order=self.candidate_order),
                          global_batch_size=self.batch_size, buckets=self.buckets)
        scored, preds, cand_hits, ranks, ll_ranks, ll_sum_ranks, grounded_hits = [], [], [], [], [], [], []
        ll_split = []  # per row: (copy nats, choice nats, first-token nats of the target) -- see below
        n_batches = -(-len(records) // self.batch_size)
        llm, llm_params = for_inference(self.llm, params["llm"])
        for batch in tqdm(ds, total=n_batches, desc=f"eval {name}", disable=not is_writer(), leave=False):
            valid = batch["valid"].astype(bool)
            # Filler rows at the end (valid = 0) copy row 0; their index is past the end.
            rows = [records[int(r) if int(r) < len(records) else 0] for r in batch["row"]]
            ids, mask, slots = (self._global(batch[k]) for k in ("input_ids", "attention_mask", "slot_items"))
            user_slot, user_state = (self._global(batch[k]) if k in batch else None for k in ("user_slot", "user_state"))
            embeds = self._embed(params, ids, slots, user_slot, user_state)
            if self.do_generate:
                tokens, lengths = generate(llm, llm_params, inputs_embeds=embeds, attention_mask=mask,
                                           max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                           leading_ids=self.leading_ids)
                tokens, lengths = sharding.to_host(tokens), sharding.to_host(lengths)
            if self.score_candidates or self.grounded:
                cont_ids, cont_mask = self._candidate_answers(rows)
            if self.grounded:
                g_tokens, g_lengths = generate(llm, llm_params, inputs_embeds=embeds, attention_mask=mask,
                                               max_new_tokens=cont_ids.shape[2], grounded_ids=self._global(cont_ids),
                                               grounded_mask=self._global(cont_mask))
                g_tokens, g_lengths = sharding.to_host(g_tokens), sharding.to_host(g_lengths)
            if self.score_candidates:
                logp = sharding.to_host(continuation_logprobs(
                    llm, llm_params, inputs_embeds=embeds, attention_mask=mask,
                    continuation_ids=self._global(cont_ids), continuation_mask=self._global(cont_mask),
                    packed_len=packed_length(cont_mask)))
                ll_sum = logp.sum(-1)  # [B, K]
                ll_mean = ll_sum / cont_mask.sum(-1)
            if two_tower:
                v_user = sharding.to_host(self._pooled(params, ids, mask, slots, self._global(batch["history_mask"]),
                                                       user_slot, user_state))
            for j in np.flatnonzero(valid):
                rec = rows[j]
                cand_titles = [titles[c] for c in rec["candidates"]]
                target_pos = int(rec["candidates"].index(rec["target"]))
                pred = dict(row=int(batch["row"][j]), user=rec.get("user"), target=titles[rec["target"]],
                            target_position=target_pos, target_item=int(rec["target"]))
                if self.do_generate:
                    text = self.tok.decode(tokens[j, : lengths[j]], skip_special_tokens=True)
                    s = generation_metrics.score_answer(text, cand_titles, target_pos)
                    scored.append(s)
                    pred.update(output=text, matched=[cand_titles[i] for i in s["named"]], hit=s["hit"],
                                # Positions in the prompt's candidate list and item ids: what eval.answer_bias reads.
                                named_positions=[int(i) for i in s["named"]],
                                named_items=[int(rec["candidates"][i]) for i in s["named"]])
                if self.grounded:
                    # The emitted sequence is exactly one candidate's answer (ids, so no text matching).
                    g = g_tokens[j, : g_lengths[j]]
                    pos = [k for k in range(cont_ids.shape[1])
                           if cont_mask[j, k].sum() == len(g) and np.array_equal(cont_ids[j, k, : len(g)], g)]
                    if not pos:  # the trie makes this impossible; a bug, not a miss
                        raise RuntimeError(f"grounded decoding emitted {g.tolist()}, not one candidate's answer")
                    # Two candidates with the same title (MovieLens has a few) are one answer: the first counts.
                    grounded_hits.append(float(pos[0] == target_pos))
                    pred.update(grounded_output=self.tok.decode(g, skip_special_tokens=True),
                                grounded_position=pos[0], grounded_hit=bool(grounded_hits[-1]))
                if self.score_candidates:
                    # Rank 1 = best; ties count against the target (no credit for a flat score).
                    ll_ranks.append(int(np.sum(ll_mean[j] >= ll_mean[j, target_pos])))
                    ll_sum_ranks.append(int(np.sum(ll_sum[j] >= ll_sum[j, target_pos])))
                    # The target answer's loss splits exactly into a copy part, -log P(answer is one of the
                    # candidates' answers; disjoint events, each ends with its newline), and a choice part,
                    # -log P(target | one of the candidates), which is ln 20 for a model with no preference.
                    log_mass = float(np.logaddexp.reduce(ll_sum[j]))
                    ll_split.append((-log_mass, log_mass - float(ll_sum[j, target_pos]), -float(logp[j, target_pos, 0])))
                    pred.update(likelihood_top_position=int(np.argmax(ll_mean[j])), likelihood_target_rank=ll_ranks[-1],
                                likelihood_sum_target_rank=ll_sum_ranks[-1], likelihood_copy_nats=ll_split[-1][0],
                                likelihood_choice_nats=ll_split[-1][1], likelihood_first_token_nats=ll_split[-1][2],
                                # Every candidate's score (listed as rec["candidates"]), so other readouts
                                # (a fusion with SASRec's logits, say) can be computed from the file.
                                candidates=[int(c) for c in rec["candidates"]],
                                likelihood_scores=[round(float(x), 5) for x in ll_mean[j]])
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
        metrics = generation_metrics.aggregate(scored) if self.do_generate else dict(n=len(preds))
        if self.grounded:  # every grounded answer is valid: HR@1 = accuracy
            metrics["grounded_hr1"] = float(np.mean(grounded_hits))
        if self.score_candidates:
            ll_ranks, ll_sum_ranks = np.asarray(ll_ranks), np.asarray(ll_sum_ranks)
            copy, choice, first = np.asarray(ll_split).reshape(-1, 3).T
            metrics.update(likelihood_hr1=float(np.mean(ll_ranks == 1)), likelihood_sum_hr1=float(np.mean(ll_sum_ranks == 1)),
                           likelihood_mean_rank=float(np.mean(ll_ranks)),
                           # Means over rows, in nats: target answer loss = copy + choice.
                           likelihood_copy_nats=float(np.mean(copy)), likelihood_choice_nats=float(np.mean(choice)),
                           likelihood_target_nats=float(np.mean(copy + choice)),
                           likelihood_first_token_nats=float(np.mean(first)))
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
        return (metrics, preds) if with_predictions else metrics


def params_fingerprint(params) -> str:
    """Short hash of the trainable leaves' values: names the item-vector cache of one checkpoint."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        a = np.asarray(leaf)
        h.update(a.tobytes()[:4096])
        h.update(str(a.shape).encode())
    return h.hexdigest()[:16]
