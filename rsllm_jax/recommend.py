"""Ask a trained RSLLM for a user's next items, from the command line or from Python.

    python -m rsllm_jax.recommend --run=runs/stage2-movielens \\
        --history="Toy Story (1995); Heat (1995); Fargo (1996)" [--candidates=...] [--top_k=10] [--json]
    python -m rsllm_jax.recommend --run=RUN --history_ids=1,50,181 --catalogue

    from rsllm_jax.recommend import Recommender
    rec = Recommender.load("runs/stage2-movielens")
    rec.recommend(["Toy Story (1995)", "Heat (1995)", "Fargo (1996)"], top_k=5)

A request is scored exactly as the evaluator scores a test row (the same prompt, candidate order and
readouts; `Evaluator.run` on a one-row split): the LLM ranks the candidates by the likelihood of each
as its answer, and grounded decoding names the one it would answer. Beside them, SASRec's logit for
the same history. Candidates: `--candidates` (titles or `--candidate_ids`), else `--catalogue`
(SASRec ranks every item outside the history and the LLM re-ranks its top `--shortlist`, the
two-stage recipe the model was trained for), else `num_candidates` drawn from the catalogue as in
training. The model is loaded and compiled once; requests are padded to the evaluator's fixed batch
and length buckets, so repeated calls do not recompile.

A stage-0 SASRec run, or a P2Rec augmentation run (its augmented SASRec, `sasrec_p2rec/`), serves the
same way through SASRec alone: the ranking is SASRec's logits. `--explain` (chat models only) asks the
run's base LLM (LoRA off: the fine-tuned one only names items) for one or two sentences on why the top
item fits the history: generated text, labelled as such, not the cause of the ranking.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from rsllm_jax import sharding
from rsllm_jax.checkpoint.run_dirs import sibling_dir


class RequestError(ValueError):
    """A request the catalogue cannot answer (an unknown title or id), with the closest matches."""


class Recommender:
    def __init__(self, cfg, run_dir: str, split, built, evaluator, sasrec):
        # built / evaluator are None for a run that serves through SASRec alone (stage 0, P2Rec).
        self.cfg, self.run_dir, self.split, self.built, self.evaluator = cfg, run_dir, split, built, evaluator
        self.sasrec = sasrec  # (model, params, item table) of the SASRec the run reads
        self._by_title: dict[str, int] = {}
        for i, t in enumerate(split.titles):
            self._by_title.setdefault(t.strip().casefold(), i)
        self._state_fn = None
        self._explain_llm = None

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(cls, run_dir: str, *, llm=None) -> "Recommender":
        """A finished stage-2 run directory (its config.json, trainable checkpoint and SASRec table)."""
        from rsllm_jax.data.splits import load_split_from_config
        from rsllm_jax.eval.evaluate import Evaluator
        from rsllm_jax.models.sasrec import SASRec
        from rsllm_jax.checkpoint.run_dirs import restore_subtree, restore_trainable
        from rsllm_jax.p2rec.common import sasrec_config_from_params
        from rsllm_jax.train.rsllm_setup import build_rsllm
        from rsllm_jax.train.rsllm_trainer import candidate_order, prompt_builder

        path = os.path.join(run_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: --run must be a finished stage-2, SASRec or P2Rec "
                                    "augmentation run directory")
        cfg = ml_collections.ConfigDict(json.load(open(path)))
        if cfg.stage in ("sasrec", "p2rec_augment"):
            sas_dir = os.path.join(run_dir, "sasrec_p2rec") if cfg.stage == "p2rec_augment" else run_dir
            table_path = os.path.join(sas_dir, "item_embeddings.npy")
            if not os.path.exists(table_path):
                raise FileNotFoundError(f"{table_path} not found: is the {cfg.stage} run in {run_dir} finished?")
            sas_params, _ = restore_subtree(sas_dir, "params")
            return cls(cfg, run_dir, load_split_from_config(cfg.data), None, None,
                       (SASRec(sasrec_config_from_params(sas_params)), sas_params, np.load(table_path)))
        if cfg.stage != "stage2" or not cfg.prompts.use_ids:
            raise ValueError(f"{run_dir}: a {cfg.stage} run (use_ids={cfg.prompts.use_ids}); recommend serves "
                             "stage-2 runs (unified prompts read SASRec's item table), SASRec runs and P2Rec "
                             "augmentation runs")
        sasrec_dir = sibling_dir(cfg.stage2.sasrec_dir, run_dir, f"sasrec-{cfg.data.dataset}")
        table_path = next((p for p in (os.path.join(run_dir, "item_embeddings.npy"),
                                       os.path.join(sasrec_dir, "item_embeddings.npy")) if os.path.exists(p)), None)
        if table_path is None:
            raise FileNotFoundError(f"no item_embeddings.npy in {run_dir} or {sasrec_dir}")
        rec_table = np.load(table_path)
        sas_params, _ = restore_subtree(sasrec_dir, "params")
        sas_model = SASRec(sasrec_config_from_params(sas_params))
        split = load_split_from_config(cfg.data)
        mesh = sharding.make_mesh(cfg.mesh)
        built = build_rsllm(cfg, mesh, num_items=split.num_items, rec_table=rec_table,
                            extra_params=restore_trainable(run_dir), llm=llm, seed=cfg.seed)
        builder = prompt_builder(cfg, built.tokenizer, split, built.model.config.llm.vocab_size)
        evaluator = Evaluator(built.model, built.tokenizer, builder, mesh, batch_size=cfg.eval.batch_size,
                              max_new_tokens=cfg.eval.max_new_tokens, template=cfg.prompts.eval_template,
                              use_ids=True, buckets=cfg.prompts.buckets, generate=False, score_candidates=True,
                              max_answer_tokens=cfg.eval.max_answer_tokens, grounded=True,
                              candidate_order=candidate_order(cfg, rec_table))
        return cls(cfg, run_dir, split, built, evaluator, (sas_model, sas_params, rec_table))

    # ---------------------------------------------------------------- requests
    def item_ids(self, items: Sequence[str | int], what: str = "history") -> list[int]:
        """Titles (case-insensitive, exact) or item ids -> ids; an unknown one is refused with the closest titles."""
        out = []
        for x in items:
            if isinstance(x, (int, np.integer)) or (isinstance(x, str) and x.strip().isdigit()):
                i = int(x)
                if not 0 <= i < self.split.num_items:
                    raise RequestError(f"{what}: item id {i} is not in the catalogue (0..{self.split.num_items - 1})")
                out.append(i)
                continue
            key = str(x).strip().casefold()
            if key not in self._by_title:
                close = difflib.get_close_matches(key, list(self._by_title), n=5, cutoff=0.5)
                named = "; ".join(self.split.titles[self._by_title[c]] for c in close) or "none close"
                raise RequestError(f"{what}: no item titled {str(x).strip()!r}; closest: {named}")
            out.append(self._by_title[key])
        return out

    def user_state(self, history: Sequence[int]) -> np.ndarray:
        """SASRec's state after `history` (the vector it scores items with)."""
        from rsllm_jax.data.sasrec_batches import left_pad

        model, params, _ = self.sasrec
        if self._state_fn is None:
            self._state_fn = jax.jit(lambda p, seq: model.apply({"params": p}, seq, deterministic=True)[:, -1])
        seq = left_pad(list(history), model.config.max_len, model.config.pad_id)[None]
        return np.asarray(self._state_fn(params, seq)[0], np.float32)

    def recommend(self, history: Sequence[str | int], candidates: Sequence[str | int] | None = None, *,
                  catalogue: bool = False, shortlist: int | None = None, top_k: int = 10, seed: int = 0,
                  explain: bool = False) -> dict:
        """-> dict(history, candidates_from, grounded (the LLM's answer), ranking: [{item, title,
        likelihood, sasrec_logit, rank}] best first by `readout` (the LLM's likelihood; SASRec's logit for a
        run that serves through SASRec alone), latency_s, explanation (with `explain`))."""
        return self.recommend_batch([dict(history=history, candidates=candidates)], catalogue=catalogue,
                                    shortlist=shortlist, top_k=top_k, seed=seed, explain=explain)[0]

    def recommend_batch(self, requests: Sequence[dict], *, catalogue: bool = False, shortlist: int | None = None,
                        top_k: int = 10, seed: int = 0, explain: bool = False) -> list[dict]:
        """Several requests ({history, candidates (optional)}) in one pass: the evaluator pads them into
        its fixed batch and length buckets, so a batch costs about one padded batch's forward."""
        from rsllm_jax.data.splits import sample_negatives

        t0 = time.time()
        _, _, table = self.sasrec
        k = shortlist or self.cfg.data.num_candidates
        records, sources = [], []
        for n, req in enumerate(requests):
            # The LLM's prompt holds max_history items; SASRec alone reads up to its max_len.
            limit = self.cfg.data.max_history if self.evaluator is not None else self.sasrec[0].config.max_len
            hist = self.item_ids(req["history"], "history")[-limit:]
            if not hist:
                raise RequestError("history: give at least one item")
            state = self.user_state(hist)
            if req.get("candidates"):
                cands, source = list(dict.fromkeys(self.item_ids(req["candidates"], "candidates"))), "given"
            elif catalogue:
                logits = table @ state
                logits[hist] = -np.inf  # never recommend what the user already has
                cands = [int(i) for i in np.argsort(-logits, kind="stable")[:k]]
                source = f"SASRec's top {k} of the catalogue"
            else:
                cands = [int(c) for c in sample_negatives(np.random.default_rng(seed), hist, hist[-1],
                                                          self.split.num_items, k)]  # none the user already has
                source = f"{k} sampled from the catalogue (seed {seed})"
            if len(cands) < 2:
                raise RequestError("candidates: give at least two")
            records.append(dict(user=f"request{n}", history=hist, target=cands[0], candidates=cands, user_state=state))
            sources.append(source)
        if self.evaluator is None:  # SASRec alone
            preds = [None] * len(records)
        else:
            with jax.set_mesh(self.evaluator.mesh):
                _, preds = self.evaluator.run(self.built.params, records, self.split.titles, out_dir=None,
                                              name="request", two_tower=False, with_predictions=True)
            preds = sorted(preds, key=lambda p: p["row"])
        latency = round(time.time() - t0, 3)
        out = []
        for rec, p, source in zip(records, preds, sources):
            cands = rec["candidates"]
            sas = table[cands] @ rec["user_state"]
            scores = sas if p is None else np.asarray(p["likelihood_scores"])
            ranking = [dict(rank=r + 1, item=cands[i], title=self.split.titles[cands[i]],
                            likelihood=None if p is None else float(scores[i]), sasrec_logit=float(sas[i]))
                       for r, i in enumerate(np.argsort(-scores, kind="stable")[:top_k])]
            res = dict(history=[self.split.titles[i] for i in rec["history"]], candidates_from=source,
                       readout="SASRec logit" if p is None else "LLM likelihood", ranking=ranking, latency_s=latency)
            if p is not None:
                g = cands[p["grounded_position"]]
                res["grounded"] = dict(item=g, title=self.split.titles[g])
            out.append(res)
        if explain:
            for res in out:
                res["explanation"] = self.explain(res["history"], res["ranking"][0]["title"])
        return out

    # ---------------------------------------------------------------- explanations
    def explain(self, history_titles: Sequence[str], title: str, max_new_tokens: int = 64) -> dict:
        """One or two sentences from the run's base LLM on why `title` fits the history. Generated text: a
        rationale written after the ranking, not its cause."""
        from rsllm_jax.data.prompts import bucket_length
        from rsllm_jax.models.generate import generate, stop_token_ids

        if self.evaluator is None:
            raise RequestError("explain: this run serves through SASRec alone; explanations need a stage-2 run")
        tok = self.built.tokenizer
        if not getattr(tok, "chat_template", None):
            raise RequestError("explain: the run's LLM has no chat template; explanations need a chat/instruct model")
        domain = self.evaluator.builder.settings.domain
        noun = {"movie": "movie", "music": "artist", "game": "game"}.get(domain, "item")
        msg = (f"A user's recent {noun}s, oldest first: {'; '.join(history_titles)}. In one or two sentences, "
               f"say why they might enjoy the {noun} {title} next.")
        text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True)
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        n = bucket_length(len(ids), self.cfg.prompts.buckets)  # fixed lengths: repeated calls reuse the compile
        prompt = np.zeros((1, n), np.int32)
        prompt[0, n - len(ids):] = ids
        mask = (np.arange(n) >= n - len(ids)).astype(np.int32)[None]
        if self._explain_llm is None:
            # The base LLM, LoRA off: the fine-tuned one was trained to answer with a title and only repeats
            # it (measured on the MovieLens default run), while the instruct model still writes sentences.
            from flax import traverse_util

            flat = traverse_util.flatten_dict(jax.device_get(self.built.params["llm"]), sep="/")
            base = traverse_util.unflatten_dict({k: v for k, v in flat.items() if "lora_" not in k}, sep="/")
            self._explain_llm = (self.evaluator.llm.clone(lora=None), base)
        llm, params = self._explain_llm
        with jax.set_mesh(self.evaluator.mesh):
            tokens, lengths = generate(llm, params, jax.numpy.asarray(prompt), attention_mask=jax.numpy.asarray(mask),
                                       max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tok, ()),
                                       pad_id=tok.pad_token_id or 0)
        out = tok.decode(np.asarray(tokens)[0, : int(lengths[0])], skip_special_tokens=True).strip()
        out = " ".join(re.split(r"(?<=[.!?])\s+", out)[:2])  # at most the two sentences asked for
        return dict(text=out, label="generated by the base LLM with its LoRA off (a rationale, not the cause "
                                    "of the ranking)")


def format_table(result: dict) -> str:
    lines = [f"history: {' ; '.join(result['history'])}", f"candidates: {result['candidates_from']}"]
    if "grounded" in result:
        lines.append(f"grounded answer (the LLM's generation within the candidates): {result['grounded']['title']}")
    lines += ["", f"{'rank':>4}  {'likelihood':>10}  {'SASRec':>7}  title", f"{'':>4}  {'(LLM)':>10}  {'logit':>7}"]
    for r in result["ranking"]:
        ll = "-" if r["likelihood"] is None else f"{r['likelihood']:.3f}"
        lines.append(f"{r['rank']:>4}  {ll:>10}  {r['sasrec_logit']:>7.2f}  {r['title']}")
    how = ("the LLM's likelihood of each candidate as its answer" if result["readout"] == "LLM likelihood"
           else "SASRec's logit (this run serves through SASRec alone)")
    lines.append(f"\nranked by {how}; {result['latency_s']} s")
    if "explanation" in result:
        e = result["explanation"]
        lines.append(f"\nwhy {result['ranking'][0]['title']}? [{e['label']}]\n  {e['text']}")
    return "\n".join(lines)


def main(argv) -> None:
    from absl import flags

    f = flags.FLAGS
    if bool(f.history) == bool(f.history_ids):
        raise SystemExit("give --history (titles, ';'-separated) or --history_ids (comma-separated)")
    history = [t for t in f.history.split(";") if t.strip()] if f.history else f.history_ids.split(",")
    cands = ([t for t in f.candidates.split(";") if t.strip()] if f.candidates
             else f.candidate_ids.split(",") if f.candidate_ids else None)
    rec = Recommender.load(f.run)
    try:
        out = rec.recommend(history, cands, catalogue=f.catalogue, shortlist=f.shortlist, top_k=f.top_k, seed=f.seed,
                            explain=f.explain)
    except RequestError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(out, indent=1, ensure_ascii=False) if f.json else format_table(out))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("run", None, "a finished stage-2, SASRec or P2Rec augmentation run directory", required=True)
    flags.DEFINE_string("history", "", "the user's items, oldest first, as titles separated by ';'")
    flags.DEFINE_string("history_ids", "", "the user's items as comma-separated item ids")
    flags.DEFINE_string("candidates", "", "candidate titles separated by ';' (default: sampled, or --catalogue)")
    flags.DEFINE_string("candidate_ids", "", "candidate item ids, comma-separated")
    flags.DEFINE_bool("catalogue", False, "rank the whole catalogue: SASRec's top --shortlist, re-ranked by the LLM")
    flags.DEFINE_integer("shortlist", None, "candidates to score (default config.data.num_candidates)")
    flags.DEFINE_integer("top_k", 10, "rows to print")
    flags.DEFINE_integer("seed", 0, "seed of sampled candidates")
    flags.DEFINE_bool("json", False, "print JSON")
    flags.DEFINE_bool("explain", False, "the LLM says in one or two sentences why the top item (chat models only; "
                      "generated text, labelled)")
    app.run(main)
