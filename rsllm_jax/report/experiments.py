"""Run every row of one dataset's results table, resumably, then collect the tables.

    python -m rsllm_jax.report.experiments --dataset=movielens --root=runs/exp [--seeds=0,1,2] [--rows=rsllm,no_ut]
        [--dry_run] [--collect_only] [--likelihood] [--sasrec_dir=runs/sasrec-movielens]
        [--stage1_dir=runs/exp/movielens/text_ft-s0] [--lr=8e-4]
        [--row_flag=text_ft:--config.train.max_train_samples=384 ...]
        [-- --config.train.max_train_samples=0 --config.llm.model=/path/to/hf_dir ...]

Each (row, seed) is one subprocess `python -m rsllm_jax.main --config=... --workdir=<root>/<dataset>/<row>-s<seed>`
whose output is tee'd to <workdir>/run.log. A run whose workdir already holds its final result
(results.json with test metrics; metrics_test.json for the evaluation-only row) is skipped, so a killed
driver started again with the same arguments resumes (and a killed training run resumes from its own
checkpoint). Stage 0 (the `sasrec` row) and stage 1 (the `text_ft` row) are run once per seed and reused:
every LLM stage-2 row reads `sasrec`'s workdir as config.stage2.sasrec_dir (build_missing=False), and the
rows that continue from stage 1 read `text_ft`'s workdir as config.stage2.stage1_dir. `--rows` adds the
rows a selected row depends on. `--sasrec_dir` / `--stage1_dir` point those two rows at existing finished
runs (one for every seed), e.g. to try a stage-2 setting under a new --root without repeating stages 0-1.

Rows (see ROWS): sasrec, zero_shot, text_ft, llara_like, rsllm, the ablations no_ut, no_tt, no_stage1,
id_only, and the user-learning levers user_slot, distill, user_distill, ranked, ranked_cf, ranked_user_distill,
ranked_listwise. Flag precedence in each command, lowest first: for stage-2 rows the budget and candidate order configs/stage2.py had before it took the winning recipe (_STAGE2_BASE), then the per-dataset learning rate (LLaRA's: 8e-4
MovieLens, 7e-4 LastFM, 5e-4 Steam; --lr overrides) < the flags after `--` (every LLM row; the
`--config.data.*` ones and `--config.eval.max_rows` also reach stage 0, whose item ids and test rows must
match) < what defines the row (its loss weights, prompts, stages, dataset, seed, dependency dirs) <
--row_flag. An extra flag that a row's definition overrides is dropped for that row with a warning.
data.split_seed is never touched, so the val/test rows and their candidates are LLaRA's for every seed.

`--likelihood` adds, after each LLM row, an evaluation of its checkpoint that ranks the 20 candidates by the
LM's likelihood of each as the answer (<workdir>/likelihood/, the table's LL HR@1): a readout that cannot
be invalid, so it shows whether a row learned the user's preference apart from the answer format; the same
evaluation decodes grounded answers (greedy within the candidates' answers, the table's grounded HR@1).

After the runs: <results_dir>/<dataset>.json (every run: test metrics, training samples, steps, wall time,
the exact command, seed; git revision and dirty flag, date, host) and <results_dir>/<dataset>.md (mean ±
sample std over seeds per row; unfinished runs listed with the reason). `--collect_only` rebuilds both from
the workdirs without running anything. Each run's training curves go to <workdir>/curves.png.
"""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import datetime
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

LLARA_LR = {"movielens": 8e-4, "lastfm": 7e-4, "steam": 5e-4}
CONFIG_KINDS = ("sasrec", "stage1", "stage2", "eval")
# Which override points a dependency's workdir at the row that needs it.
DEPENDENCY_FLAG = {"sasrec": "stage2.sasrec_dir", "text_ft": "stage2.stage1_dir"}
# The driver flag that points a dependency row at an existing finished run instead of running it.
REUSE_FLAG = {"sasrec": "sasrec_dir", "text_ft": "stage1_dir"}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str  # the config it runs: sasrec | stage1 | stage2 | eval
    description: str
    overrides: tuple[tuple[str, str], ...] = ()  # config fields (no "config." prefix) -> value
    needs: tuple[str, ...] = ()  # rows whose workdirs it reads (keys of DEPENDENCY_FLAG)
    seeded: bool = True  # False: deterministic (no training); run once, for the first seed
    split: str = "test"  # the split an eval row scores (its metrics_<split>.json marks it finished)

    @property
    def trains_llm(self) -> bool:
        return self.kind in ("stage1", "stage2")


_STAGE2 = (("stage2.build_missing", "False"),)
# The lowest layer of every stage-2 row: configs/stage2.py's budget and prompt order before the embedded
# default took the winning recipe, so every row (and every committed table's command) means what it did;
# the flags after `--` and a row's definition override it.
_STAGE2_BASE = (("prompts.candidate_order", "given"), ("train.max_train_samples", "384"), ("train.batch_size", "32"),
                ("train.grad_accum_steps", "8"), ("train.checkpoint_every_steps", "2"),
                ("stage2.stage1_train_samples", "192"))
_USER_SLOT = (("prompts.user_slot", "True"),)
_DISTILL = (("loss.weight_distill", "1.0"), ("loss.distill_temperature", "1.0"))
_RANKED = (("prompts.candidate_order", "sasrec"),)
_LISTWISE = (("loss.weight_listwise", "1.0"), ("loss.listwise_negatives", "9"))
ROWS = (
    Row("sasrec", "sasrec", "SASRec (stage 0), candidates ranked by logits"),
    Row("zero_shot", "eval", "untrained LLM, text-only prompt",
        (("checkpoint", ""), ("checkpoint_stage", "stage1"), ("prompts.use_ids", "False"),
         ("prompts.chat_template", "auto"), ("eval.split", "test")), seeded=False),
    Row("text_ft", "stage1", "stage 1 only: text-only LoRA fine-tune on this dataset",
        (("prompts.use_ids", "False"),)),
    Row("llara_like", "stage2", "LLaRA-like: unified prompts, NIP only, curriculum, no stage 1",
        _STAGE2 + (("stage2.stage1_dir", "none"), ("loss.weight_tt", "0"), ("loss.weight_ut", "0"),
                   ("train.curriculum", "True")), needs=("sasrec",)),
    Row("rsllm", "stage2", "RSLLM: stage 1 -> stage 2, NIP + L_TT + L_UT", _STAGE2, needs=("sasrec", "text_ft")),
    Row("no_ut", "stage2", "RSLLM without L_UT", _STAGE2 + (("loss.weight_ut", "0"),), needs=("sasrec", "text_ft")),
    Row("no_tt", "stage2", "RSLLM without L_TT", _STAGE2 + (("loss.weight_tt", "0"),), needs=("sasrec", "text_ft")),
    Row("no_stage1", "stage2", "RSLLM without stage 1", _STAGE2 + (("stage2.stage1_dir", "none"),),
        needs=("sasrec",)),
    Row("id_only", "stage2", "RSLLM with ID slots only (no titles in the prompt)",
        _STAGE2 + (("prompts.use_titles", "False"),), needs=("sasrec", "text_ft")),
    # The user-learning levers (configs/base.py documents each field).
    Row("user_slot", "stage2", "RSLLM + user slot (SASRec's user state, projected, after the history)",
        _STAGE2 + _USER_SLOT, needs=("sasrec", "text_ft")),
    Row("distill", "stage2", "RSLLM + listwise distillation of SASRec's candidate softmax (first answer token)",
        _STAGE2 + _DISTILL, needs=("sasrec", "text_ft")),
    Row("user_distill", "stage2", "RSLLM + user slot + listwise distillation from SASRec",
        _STAGE2 + _USER_SLOT + _DISTILL, needs=("sasrec", "text_ft")),
    Row("ranked", "stage2", "RSLLM re-ranking SASRec's order (candidates shown best first by SASRec)",
        _STAGE2 + _RANKED, needs=("sasrec", "text_ft")),
    Row("ranked_cf", "stage2", "ranked, training windows ordered by a SASRec that never saw their user (2 user folds)",
        _STAGE2 + _RANKED + (("prompts.crossfit_folds", "2"),), needs=("sasrec", "text_ft")),
    Row("ranked_user_distill", "stage2", "ranked + user slot + listwise distillation",
        _STAGE2 + _RANKED + _USER_SLOT + _DISTILL, needs=("sasrec", "text_ft")),
    Row("ranked_listwise", "stage2", "ranked + listwise loss over the target's and 9 hardest candidates' answers",
        _STAGE2 + _RANKED + _LISTWISE, needs=("sasrec", "text_ft")),
)
ROW_BY_NAME = {r.name: r for r in ROWS}

# Table columns: (key in a run's "metrics", header).
METRIC_COLUMNS = (
    ("valid_ratio", "ValidRatio"),
    ("hit_ratio_at_1", "HitRatio@1"),
    ("accuracy", "accuracy"),
    ("two_tower_hr1", "2T HR@1"),
    ("likelihood_hr1", "LL HR@1"),
    ("grounded_hr1", "grounded HR@1"),
    ("fusion_hr1", "fusion HR@1"),
    ("gate_hr1", "gate HR@1"),
    ("hr10", "HR@10"),
    ("ndcg10", "NDCG@10"),
)


@dataclasses.dataclass
class Run:
    row: Row
    seed: int
    workdir: str
    command: list[str]
    deps: list[str]  # keys of the runs it needs
    reused: bool = False  # an existing run dir (--sasrec_dir, --stage1_dir): never run here
    dropped: list[str] = dataclasses.field(default_factory=list)  # extra flags the row's definition overrode

    @property
    def key(self) -> str:
        return f"{self.row.name}-s{self.seed}"


# ---------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m rsllm_jax.report.experiments", allow_abbrev=False,
        description="Run every row of one dataset's results table (resumable), then write the tables. "
                    "Flags after `--` go to every LLM row.")
    p.add_argument("--dataset", required=True, help="movielens | lastfm | steam | custom")
    p.add_argument("--root", default="runs/exp", help="workdirs go to ROOT/DATASET/ROW-sSEED")
    p.add_argument("--seeds", default="0", help="comma list of config.seed values, e.g. 0,1,2")
    p.add_argument("--rows", default="", help=f"comma list (default all): {','.join(ROW_BY_NAME)}; "
                                              "the rows they depend on are added")
    p.add_argument("--seeded_rows", default="",
                   help="comma list: only these rows (and the rows they depend on) run for every seed in --seeds; "
                        "the others for the first seed only (default: every row). E.g. the key rows in 3 seeds "
                        "and the ablations in one: --seeds=0,1,2 --seeded_rows=rsllm")
    p.add_argument("--dry_run", action="store_true", help="print the commands (and what is finished), run nothing")
    p.add_argument("--collect_only", action="store_true", help="only rebuild the results tables from the workdirs")
    p.add_argument("--results_dir", default="results", help="where DATASET.json and DATASET.md go")
    p.add_argument("--sasrec_dir", default="", help="reuse this finished stage-0 run for every seed instead of "
                                                    "running the sasrec row")
    p.add_argument("--stage1_dir", default="",
                   help="reuse this finished stage-1 run for every seed instead of running the text_ft row "
                        "(e.g. to try a stage-2 setting in a new --root on an existing stage 1)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak LR of every LLM training row (default LLaRA's per dataset: "
                        + ", ".join(f"{k} {v:g}" for k, v in LLARA_LR.items()) + ")")
    p.add_argument("--config_dir", default="", help="directory holding sasrec.py, stage1.py, stage2.py, eval.py "
                                                    "(default: the repo's configs/)")
    p.add_argument("--configs", default="",
                   help="per-stage config overrides KIND=PATH[:ARG],... (KIND in sasrec, stage1, stage2, eval), "
                        "or 'tiny' for configs/tiny.py and its :stage1/:stage2/:eval variants")
    p.add_argument("--row_flag", action="append", default=[], metavar="ROW:--config.a.b=v",
                   help="a flag for one row only (repeatable); wins over everything else")
    p.add_argument("--likelihood", action="store_true",
                   help="after each LLM row, rank its test candidates by the LM's likelihood of each as the answer "
                        "(configs/eval.py with config.eval.score_candidates into <workdir>/likelihood; the LL HR@1 "
                        "column). Collection always reads these results where they exist")
    p.add_argument("--quiet", action="store_true", help="do not echo the runs' output (run.log still gets it)")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    argv = list(argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = build_parser()
    opts = parser.parse_args(argv)
    for flag in extra:
        if not flag.startswith("--"):
            parser.error(f"extra flag {flag!r} after `--` must look like --config.a.b=value")
    opts.extra = extra
    opts.seed_list = [int(s) for s in opts.seeds.split(",") if s.strip()]
    if not opts.seed_list:
        parser.error("--seeds is empty")
    wanted = [r for r in opts.rows.split(",") if r.strip()]
    unknown = [r for r in wanted if r not in ROW_BY_NAME]
    if unknown:
        parser.error(f"unknown rows {unknown}; rows: {', '.join(ROW_BY_NAME)}")
    opts.row_list = select_rows(wanted)
    seeded = [r for r in opts.seeded_rows.split(",") if r.strip()]
    unknown = [r for r in seeded if r not in ROW_BY_NAME]
    if unknown:
        parser.error(f"--seeded_rows: unknown rows {unknown}; rows: {', '.join(ROW_BY_NAME)}")
    opts.seeded_names = {r.name for r in select_rows(seeded)} if seeded else set(ROW_BY_NAME)
    opts.row_flags = {}
    for spec in opts.row_flag:
        name, sep, flag = spec.partition(":")
        if not sep or name not in ROW_BY_NAME or not flag.startswith("--"):
            parser.error(f"--row_flag={spec!r}: expected ROW:--config.a.b=value with ROW in {', '.join(ROW_BY_NAME)}")
        opts.row_flags.setdefault(name, []).append(flag)
    try:
        opts.config_paths = config_paths(opts.config_dir, opts.configs)
    except ValueError as e:
        parser.error(str(e))
    return opts


def select_rows(wanted: list[str]) -> list[Row]:
    """The selected rows plus everything they depend on, in table order (dependencies first)."""
    if not wanted:
        return list(ROWS)
    keep = set(wanted)
    for name in wanted:
        keep.update(ROW_BY_NAME[name].needs)
    return [r for r in ROWS if r.name in keep]


def _default_config_dir() -> str:
    d = REPO / "configs"
    rel = os.path.relpath(d)
    return rel if not rel.startswith("..") else str(d)


def config_paths(config_dir: str, spec: str) -> dict[str, str]:
    d = config_dir or _default_config_dir()
    paths = {k: os.path.join(d, f"{k}.py") for k in CONFIG_KINDS}
    if spec == "tiny":
        tiny = os.path.join(d, "tiny.py")
        paths = {"sasrec": tiny, **{k: f"{tiny}:{k}" for k in ("stage1", "stage2", "eval")}}
        spec = ""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, sep, path = item.partition("=")
        if not sep or kind not in CONFIG_KINDS:
            raise ValueError(f"--configs: {item!r} is not KIND=PATH with KIND in {CONFIG_KINDS}")
        paths[kind] = path
    for kind, path in paths.items():
        if not os.path.isfile(path.split(":", 1)[0]):
            raise ValueError(f"config for {kind} not found: {path}")
    return paths


# ---------------------------------------------------------------- the plan
def _flag_key(flag: str) -> str:
    """'--config.a.b=v' -> '--config.a.b' (and '--noconfig.a.b' -> '--config.a.b')."""
    key = flag.split("=", 1)[0]
    if key.startswith("--no") and "=" not in flag and key[4:].startswith("config."):
        key = "--" + key[4:]
    return key


def _merge(*layers: list[str]) -> tuple[list[str], dict[str, str]]:
    """Flags of later layers replace earlier ones with the same key (tuple-valued config fields would
    otherwise concatenate repeated flags). Returns the flags and, per replaced key, the old flag."""
    out: dict[str, str] = {}
    replaced: dict[str, str] = {}
    for layer in layers:
        for flag in layer:
            key = _flag_key(flag)
            if key in out:
                if out[key] != flag:
                    replaced[key] = out[key]
                del out[key]  # the flag moves to the layer that set it last
            out[key] = flag
    return list(out.values()), replaced


def _cfg(field: str, value) -> str:
    return f"--config.{field}={value}"


def row_workdir(opts, row: Row, seed: int) -> str:
    return reused_dir(opts, row.name) or os.path.join(opts.root, opts.dataset, f"{row.name}-s{seed}")


def reused_dir(opts, row_name: str) -> str:
    """The existing run dir --sasrec_dir / --stage1_dir names for this row ('' when the row runs here)."""
    flag = REUSE_FLAG.get(row_name)
    return getattr(opts, flag, "") if flag else ""


def plan_runs(opts) -> list[Run]:
    """Every (row, seed) run in execution order: seed by seed, rows in table order (dependencies first)."""
    lr = opts.lr if opts.lr is not None else LLARA_LR.get(opts.dataset)
    runs: list[Run] = []
    for i, seed in enumerate(opts.seed_list):
        for row in opts.row_list:
            if i > 0 and not _repeats(opts, row.name):
                continue
            runs.append(_plan_one(opts, row, seed, lr))
    return runs


def _repeats(opts, row_name: str) -> bool:
    """Whether the row runs for every seed (else only for the first)."""
    row = ROW_BY_NAME[row_name]
    return row.seeded and not reused_dir(opts, row_name) and row_name in opts.seeded_names


def _seed_of(opts, row_name: str, seed: int) -> int:
    return seed if _repeats(opts, row_name) else opts.seed_list[0]


def _plan_one(opts, row: Row, seed: int, lr) -> Run:
    workdir = row_workdir(opts, row, seed)
    if row.kind == "sasrec":
        # Stage 0 takes only the data flags of the extras (its item ids must match the LLM rows') and
        # the evaluation subset (its test numbers must be on the same rows).
        common = [f for f in opts.extra if _flag_key(f).startswith("--config.data.")
                  or _flag_key(f) == "--config.eval.max_rows"]
    else:
        common = ([_cfg("optim.lr", lr)] if lr is not None and row.trains_llm else []) + list(opts.extra)
    defining = [_cfg("data.dataset", opts.dataset), _cfg("seed", seed)]
    if row.kind == "stage1":
        defining.append(_cfg("stage1.datasets", f'("{opts.dataset}",)'))  # a one-element tuple
    defining += [_cfg(k, v) for k, v in row.overrides]
    deps = []
    for dep in row.needs:
        dep_seed = _seed_of(opts, dep, seed)
        defining.append(_cfg(DEPENDENCY_FLAG[dep], row_workdir(opts, ROW_BY_NAME[dep], dep_seed)))
        deps.append(f"{dep}-s{dep_seed}")
    base = [_cfg(k, v) for k, v in _STAGE2_BASE] if row.kind == "stage2" else []
    flags, replaced = _merge(base, common, defining, opts.row_flags.get(row.name, []))
    dropped = [old for key, old in replaced.items() if old in opts.extra]
    cmd = [sys.executable, "-m", "rsllm_jax.main", f"--config={opts.config_paths[row.kind]}",
           f"--workdir={workdir}", *flags]
    return Run(row, seed, workdir, cmd, deps, reused=bool(reused_dir(opts, row.name)), dropped=dropped)


LIKELIHOOD_DIR = "likelihood"  # inside an LLM row's workdir
# Each finished LLM run's answer bias, kept next to its predictions so a copy of the run's logs without
# them (results/logs/) still rebuilds the table.
ANSWER_BIAS_FILE = "answer_bias_test.json"


def likelihood_run(opts, run: Run, split: str = "test") -> Run | None:
    """The candidate-likelihood evaluation of an LLM row's checkpoint on `split` (None for stage 0): the
    row's own flags (prompt format, data, evaluation rows) on configs/eval.py, reading the row's workdir.
    The test run also decodes grounded answers; the val run only scores (what eval.fusion picks its
    weight on)."""
    if run.row.kind == "sasrec":
        return None
    flags = [f for f in run.command[3:] if not f.startswith(("--workdir=", "--config="))]
    if run.row.kind != "eval":  # a trained row: evaluate its best checkpoint, in its own prompt format
        flags += [_cfg("checkpoint", run.workdir), _cfg("checkpoint_stage", run.row.kind)]
    flags, _ = _merge(flags, [_cfg("eval.split", split), _cfg("eval.generate", "False"),
                              _cfg("eval.score_candidates", "True"), _cfg("eval.grounded", str(split == "test")),
                              _cfg("eval.two_tower", "False")])
    sub = LIKELIHOOD_DIR if split == "test" else f"{LIKELIHOOD_DIR}_{split}"
    workdir = os.path.join(run.workdir, sub)
    cmd = [sys.executable, "-m", "rsllm_jax.main", f"--config={opts.config_paths['eval']}", f"--workdir={workdir}",
           *flags]
    row = dataclasses.replace(run.row, name=f"{run.row.name}:{sub}", kind="eval", split=split,
                              description=run.row.description + f" (likelihood readout, {split})")
    return Run(row, run.seed, workdir, cmd, deps=[run.key])


def with_likelihood(opts, runs: list[Run]) -> list[Run]:
    """Execution order with --likelihood: each LLM run followed by its likelihood evaluation on the test
    rows, then on the validation rows (for the fusion readout's weight)."""
    out = []
    for run in runs:
        out.append(run)
        for split in ("test", "val") if opts.likelihood else ():
            extra = likelihood_run(opts, run, split)
            if extra is not None:
                out.append(extra)
    return out


# ---------------------------------------------------------------- state of a workdir
def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def result_file(row: Row) -> str:
    return f"metrics_{row.split}.json" if row.kind == "eval" else "results.json"


def finished_result(row: Row, workdir: str) -> dict | None:
    """The run's final result, or None when it has not finished."""
    data = _read_json(os.path.join(workdir, result_file(row)))
    if not isinstance(data, dict):
        return None
    if row.kind != "eval" and not isinstance(data.get("test"), dict):
        return None
    return data


def _record_path(workdir: str) -> str:
    return os.path.join(workdir, "experiment.json")


def write_json_atomic(path: str, obj) -> None:
    """Whole-file write via rename: a reader (or a killed driver) never leaves half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- running
class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def execute(run: Run, quiet: bool = False) -> int:
    """Run one command, its stdout+stderr tee'd to <workdir>/run.log; attempts recorded in experiment.json."""
    os.makedirs(run.workdir, exist_ok=True)
    record = _read_json(_record_path(run.workdir)) or {}
    attempts = record.get("attempts", [])
    attempt = dict(started=_now(), command=run.command, returncode=None)
    attempts.append(attempt)
    record.update(row=run.row.name, seed=run.seed, command=run.command, cwd=os.getcwd(), attempts=attempts)
    write_json_atomic(_record_path(run.workdir), record)
    t0 = time.time()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with open(os.path.join(run.workdir, "run.log"), "ab") as log:
        log.write(f"\n===== {attempt['started']} {shlex.join(run.command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(run.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_child_env())
        try:
            fd = proc.stdout.fileno()
            while chunk := os.read(fd, 65536):
                log.write(chunk)
                log.flush()
                if not quiet:
                    sys.stdout.write(decoder.decode(chunk))
                    sys.stdout.flush()
            rc = proc.wait()
        except BaseException:
            # The driver was interrupted: stop the run too (it resumes from its checkpoint next time).
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            attempt.update(finished=_now(), returncode="interrupted", wall_time_s=round(time.time() - t0, 1))
            write_json_atomic(_record_path(run.workdir), record)
            raise
        finally:
            proc.stdout.close()
        log.write(f"===== exit {rc} after {time.time() - t0:.1f} s\n".encode())
    attempt.update(finished=_now(), returncode=rc, wall_time_s=round(time.time() - t0, 1))
    write_json_atomic(_record_path(run.workdir), record)
    return rc


def plot_curves(run: Run, dataset: str) -> str | None:
    """<workdir>/curves.png from metrics.jsonl (redrawn when the metrics are newer); None if nothing to plot."""
    metrics = os.path.join(run.workdir, "metrics.jsonl")
    out = os.path.join(run.workdir, "curves.png")
    if not os.path.exists(metrics):
        return None
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(metrics):
        return out
    try:
        # Imported here: only a run that has metrics needs it.
        from rsllm_jax.report.plot import plot
        from rsllm_jax.run_files import read_metrics

        series = read_metrics(metrics)
        if not series:
            return None
        return plot(series, out, f"{dataset} {run.key}")
    except Exception as e:  # a plot must never cost the results
        print(f"[experiments] could not plot {metrics}: {e!r}", file=sys.stderr)
        return None


def _log(msg: str) -> None:
    print(f"[experiments] {msg}", flush=True)


def run_all(opts, runs: list[Run]) -> dict[str, str]:
    """Runs what is not finished; returns key -> why it is not finished (absent = finished)."""
    problems: dict[str, str] = {}
    for run in runs:
        done = finished_result(run.row, run.workdir)
        if done is not None and run.reused and done.get("dataset") not in (None, opts.dataset):
            problems[run.key] = (f"--{REUSE_FLAG[run.row.name]}={run.workdir} is a {done.get('dataset')} run, "
                                 f"not {opts.dataset}")
            _log(f"{run.key}: {problems[run.key]}")
            continue
        if done is not None:
            _log(f"{run.key}: finished, skipping ({run.workdir})")
            _warn_if_changed(run)
            continue
        if run.reused:
            problems[run.key] = f"--{REUSE_FLAG[run.row.name]}={run.workdir} holds no finished results.json"
            _log(f"{run.key}: {problems[run.key]}")
            continue
        missing = [d for d in run.deps if d in problems]
        if missing:
            problems[run.key] = f"not run: needs {', '.join(missing)}, which did not finish"
            _log(f"{run.key}: {problems[run.key]}")
            continue
        for old in run.dropped:
            _log(f"{run.key}: warning: the row's definition overrides the extra flag {old}")
        _log(f"{run.key}: running {shlex.join(run.command)}")
        rc = execute(run, quiet=opts.quiet)
        if rc != 0:
            problems[run.key] = f"failed (exit {rc}); see {os.path.join(run.workdir, 'run.log')}"
        elif finished_result(run.row, run.workdir) is None:
            problems[run.key] = f"exited 0 without {result_file(run.row)} (interrupted?)"
        else:
            plot_curves(run, opts.dataset)
            continue
        _log(f"{run.key}: {problems[run.key]}")
    return problems


def _warn_if_changed(run: Run) -> None:
    record = _read_json(_record_path(run.workdir))
    if record and record.get("command") and record["command"][1:] != run.command[1:]:
        _log(f"{run.key}: warning: finished with a different command than planned now (kept; delete "
             f"{run.workdir} to rerun):\n  was: {shlex.join(record['command'])}\n  now: {shlex.join(run.command)}")


# ---------------------------------------------------------------- collecting
def _max_step(workdir: str) -> int | None:
    path = os.path.join(workdir, "metrics.jsonl")
    best = None
    try:
        with open(path) as f:
            for line in f:
                try:
                    step = json.loads(line).get("step")
                except ValueError:
                    continue
                if isinstance(step, (int, float)):
                    best = int(step) if best is None else max(best, int(step))
    except OSError:
        return None
    return best


def nip_per_answer(workdir: str) -> dict | None:
    """The training NIP loss in nats per answer, from the run's metrics.jsonl: at step 1 (before any update)
    and over the last quarter of the steps. Per answer = per-token NIP x answer tokens per example (each step
    logs the mean over its micro-batches of both; micro-batch = batch_size / grad_accum_steps). The tables
    set it against ln(K), what a model that copies one of the K candidate titles at random would pay."""
    cfg = _read_json(os.path.join(workdir, "config.json"))
    path = os.path.join(workdir, "metrics.jsonl")
    if not cfg or not os.path.exists(path):
        return None
    from rsllm_jax.run_files import read_metrics  # light: matplotlib is imported only when plotting

    try:
        series = read_metrics(path)
    except ValueError as e:  # e.g. a line cut by a kill before a resume: a diagnostic must not stop collection
        _log(f"warning: no NIP loss per answer: {e}")
        return None
    if "nip" not in series or "answer_tokens" not in series:
        return None
    micro = cfg["train"]["batch_size"] // cfg["train"]["grad_accum_steps"]
    tokens = dict(zip(*series["answer_tokens"]))
    steps = [(step, nip * tokens[step] / micro, tokens[step] / micro)
             for step, nip in zip(*series["nip"]) if step in tokens]
    if not steps:
        return None
    last = steps[-max(1, len(steps) // 4):]
    return dict(first=steps[0][1], last=sum(s[1] for s in last) / len(last), last_steps=len(last),
                tokens_per_answer=sum(s[2] for s in steps) / len(steps),
                copy_floor=math.log(cfg["data"]["num_candidates"]),
                per_step=[[int(step), round(nats, 4)] for step, nats, _ in steps])  # for overview's loss figure


def extract(row: Row, workdir: str, result: dict) -> dict:
    """One finished run's numbers in the table's terms (None where a metric does not apply)."""
    if row.kind == "sasrec":
        t = result["test"]
        # Ranking by logits always names exactly one candidate: HitRatio@1 = accuracy = HR@1 (20 cand.).
        metrics = dict(valid_ratio=None, hit_ratio_at_1=t.get("hr1_cand"), accuracy=t.get("hr1_cand"),
                       two_tower_hr1=None, likelihood_hr1=None, grounded_hr1=None, hr10=t.get("hr10"), ndcg10=t.get("ndcg10"),
                       n=t.get("n"))
        val = {"hr1_cand": result.get("val", {}).get("hr1_cand")}
        return dict(metrics=metrics, val=val, train_samples=result.get("train_samples"), steps=_max_step(workdir),
                    best_step=result.get("best_step"), wall_time_s=result.get("wall_time_s"))
    t = result if row.kind == "eval" else result["test"]
    metrics = dict(valid_ratio=t.get("valid_ratio"), hit_ratio_at_1=t.get("hit_ratio_at_1"),
                   accuracy=t.get("accuracy"), two_tower_hr1=t.get("two_tower_hr1"),
                   hr10=t.get("two_tower_hr10"), ndcg10=t.get("two_tower_ndcg10"), n=t.get("n"))
    ll = _read_json(os.path.join(workdir, LIKELIHOOD_DIR, "metrics_test.json"))
    ll = ll if isinstance(ll, dict) and ll.get("n") == t.get("n") else {}  # only on the same test rows
    metrics.update(likelihood_hr1=ll.get("likelihood_hr1"), likelihood_sum_hr1=ll.get("likelihood_sum_hr1"),
                   likelihood_mean_rank=ll.get("likelihood_mean_rank"), likelihood_copy_nats=ll.get("likelihood_copy_nats"),
                   likelihood_choice_nats=ll.get("likelihood_choice_nats"), grounded_hr1=ll.get("grounded_hr1"))
    if row.kind == "eval":
        return dict(metrics=metrics, val=None, train_samples=0, steps=0, best_step=None,
                    wall_time_s=result.get("wall_time_s"))
    v = result.get("val") or {}
    val = {k: v.get(k) for k in ("valid_ratio", "hit_ratio_at_1", "accuracy") if k in v}
    return dict(metrics=metrics, val=val, train_samples=result.get("train_samples"), steps=result.get("steps"),
                best_step=result.get("best_step"), wall_time_s=result.get("wall_time_s"),
                nip_per_answer=nip_per_answer(workdir))


def _why_unfinished(run: Run, problems: dict[str, str]) -> str:
    if run.key in problems:
        return problems[run.key]
    record = _read_json(_record_path(run.workdir))
    if record and record.get("attempts"):
        last = record["attempts"][-1]
        rc = last.get("returncode")
        if rc is None:
            return "started, no result yet (still running, or the driver was killed)"
        if rc == "interrupted":
            return "interrupted; run the driver again to resume"
        return f"failed (exit {rc}); see {os.path.join(run.workdir, 'run.log')}"
    if os.path.isdir(run.workdir):
        return "no result in the workdir (started outside the driver, or unfinished)"
    return "not run yet"


def _git() -> dict:
    def git(*args):
        try:
            out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(revision=rev, dirty=None if status is None else bool(status))


_split_cache: dict = {}  # (dataset, data fields) -> the split, loaded once per driver process
HITS_DIR = "hits"  # inside --results_dir: every finished run's per-row test hits (eval.paired reads them)


def _run_split(opts, run: Run):
    """The split the run was evaluated on: its saved config's data block (custom files, candidates,
    history lengths), loaded once per driver process."""
    from rsllm_jax.data.splits import load_split

    data = (_read_json(os.path.join(run.workdir, "config.json")) or {}).get("data") or {}
    kw = dict(data_dir=data.get("data_dir") or None, cache_dir=data.get("cache_dir") or None,
              seed=data.get("split_seed", 0), custom_interactions=data.get("custom_interactions", ""),
              custom_items=data.get("custom_items", ""), num_candidates=data.get("num_candidates", 20),
              max_history=data.get("max_history", 10), min_history=data.get("min_history", 3))
    key = json.dumps([opts.dataset, kw], sort_keys=True)
    if key not in _split_cache:
        _split_cache[key] = load_split(opts.dataset, **kw)
    return _split_cache[key]


def save_hits(opts, run: Run, runs: list[Run]) -> dict:
    """Write the run's per-row test hits (each readout it has) to <results_dir>/hits/, so paired tests
    pooled over seeds outlive the scratch workdirs; for an LLM row with likelihood scores on val and test
    and a SASRec run of its seed, also the fusion readout (eval.fusion). Returns the fusion's metrics
    (none when it cannot be computed). Best effort: a run whose files lack something keeps its table row."""
    from rsllm_jax.eval import fusion, paired

    if run.row.kind not in ("sasrec", "stage1", "stage2", "eval") or run.reused:
        return {}
    from rsllm_jax.checkpoint import user_states

    if not any(os.path.exists(os.path.join(run.workdir, f)) for f in ("predictions_test.jsonl", user_states.FILENAME)):
        return {}  # nothing per row to record (and no split to load)
    out_dir = os.path.join(opts.results_dir, HITS_DIR)
    metrics = {}
    try:
        split = _run_split(opts, run)
        sides = [run.workdir] + [f"{run.workdir}:{r}" for r in paired.READOUTS
                                 if os.path.exists(os.path.join(run.workdir, LIKELIHOOD_DIR, "predictions_test.jsonl"))]
        os.makedirs(out_dir, exist_ok=True)
        for side in sides:
            name = f"{opts.dataset}-{paired.hits_file_name(side)}"
            write_json_atomic(os.path.join(out_dir, name),
                              paired.hits_record(side, paired.run_hits(side, split.test, split), opts.dataset, split.test))
        sasrec = next((r for r in runs if r.row.kind == "sasrec" and r.seed == run.seed), None)
        val_path = os.path.join(run.workdir, fusion.SPLIT_DIRS["val"], "predictions_val.jsonl")
        if run.row.kind != "sasrec" and sasrec is not None and os.path.exists(val_path):
            r = fusion.evaluate(run.workdir, sasrec.workdir, split)
            metrics = dict(fusion_hr1=r["test_hr1_at_chosen"], fusion_weight=r["chosen_weight"],
                           fusion_val_hr1=dict(zip(r["weights"], r["val_hr1"])),
                           fusion_test_hr1=dict(zip(r["weights"], r["test_hr1"])),
                           gate_hr1=r["gate_test_hr1_at_chosen"], gate_share=r["gate_share"],
                           gate_test_llm_share=r["gate_test_llm_share"],
                           gate_val_hr1=dict(zip(map(str, r["gate_shares"]), r["gate_val_hr1"])),
                           gate_test_hr1=dict(zip(map(str, r["gate_shares"]), r["gate_test_hr1"])))
            fusion.write_hits(r, run.workdir, opts.dataset, split, out_dir)
    except (OSError, ValueError, KeyError) as e:
        _log(f"{run.key}: per-row hits not recorded ({e})")
    return metrics


def collect(opts, runs: list[Run], problems: dict[str, str] | None = None) -> dict:
    """results/<dataset>.json and .md from the workdirs; returns the JSON object."""
    problems = problems or {}
    entries = []
    for run in runs:
        record = _read_json(_record_path(run.workdir)) or {}
        entry = dict(row=run.row.name, seed=run.seed, dataset=opts.dataset, workdir=run.workdir,
                     config=run.row.kind, description=run.row.description, seed_independent=not run.row.seeded,
                     command=record.get("command") or run.command,
                     command_source="recorded" if record.get("command") else "planned",
                     depends_on=run.deps)
        if run.reused:
            cfg = _read_json(os.path.join(run.workdir, "config.json")) or {}
            entry.update(command=None, command_source=f"reused (--{REUSE_FLAG[run.row.name]})", seed=cfg.get("seed"))
        attempts = record.get("attempts") or []
        walls = [a["wall_time_s"] for a in attempts if isinstance(a.get("wall_time_s"), (int, float))]
        if walls:
            entry["process_wall_time_s"] = round(sum(walls), 1)  # every attempt, incl. startup and compile
        result = finished_result(run.row, run.workdir)
        if result is None:
            entry.update(status="unfinished", note=_why_unfinished(run, problems))
        else:
            entry.update(status="finished", **extract(run.row, run.workdir, result))
            entry["metrics"].update(save_hits(opts, run, runs))
            curves = plot_curves(run, opts.dataset)
            if curves:
                entry["curves"] = curves
        entries.append(entry)
    summary = summarize(entries)
    # The test-row counts the finished runs were evaluated on (one value unless eval.max_rows differs).
    n_test = sorted({e["metrics"]["n"] for e in entries if e["status"] == "finished" and e["metrics"].get("n")})
    out = dict(dataset=opts.dataset, date=_now(), host=socket.gethostname(), git=_git(), root=opts.root,
               seeds=opts.seed_list, rows=[r.name for r in opts.row_list], extra_flags=list(opts.extra),
               runs=entries, summary=summary, n_test=n_test, references=diagnostics(runs, entries))
    json_path = os.path.join(opts.results_dir, f"{opts.dataset}.json")
    write_json_atomic(json_path, out)
    md_path = os.path.join(opts.results_dir, f"{opts.dataset}.md")
    tmp = f"{md_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(markdown(out))
    os.replace(tmp, md_path)
    _log(f"wrote {json_path} and {md_path}")
    return out


def diagnostics(runs: list[Run], entries: list[dict]) -> dict | None:
    """User-blind references (a random pick; the candidate with the most training interactions) on the
    test rows the runs were evaluated on, and each finished LLM run's answer bias (eval.answer_bias),
    added to its entry. Needs the split: read through the first finished run's config.json."""
    configs = {run.key: _read_json(os.path.join(run.workdir, "config.json")) for run in runs}
    done = [run for run in runs if configs[run.key] and finished_result(run.row, run.workdir) is not None]
    done_keys = {run.key for run in done}
    if not done:
        return None
    import ml_collections  # the split loader is only needed here; planning and running stay light

    from rsllm_jax.data.splits import eval_subset, item_train_counts, load_split_from_config
    from rsllm_jax.eval import answer_bias

    first = configs[done[0].key]
    split = load_split_from_config(ml_collections.ConfigDict(first["data"]))
    counts = item_train_counts(split.train, split.num_items)

    def test_rows(cfg) -> list[dict]:
        return eval_subset(split.test, int((cfg.get("eval") or {}).get("max_rows") or 0))

    for run, entry in zip(runs, entries):
        if run.key not in done_keys or run.row.kind == "sasrec":
            continue
        path = os.path.join(run.workdir, "predictions_test.jsonl")
        saved = os.path.join(run.workdir, ANSWER_BIAS_FILE)
        if os.path.exists(path):
            try:
                entry["answer_bias"] = answer_bias.answer_bias(answer_bias.read_predictions(path),
                                                               test_rows(configs[run.key]), counts)
            except ValueError as e:  # predictions from before positions were recorded
                entry["answer_bias"] = dict(error=str(e))
            write_json_atomic(saved, entry["answer_bias"])
        elif os.path.exists(saved):  # a run's logs without its predictions (they quote the dataset's titles)
            entry["answer_bias"] = _read_json(saved)
    rows = test_rows(first)
    return dict(n=len(rows), random_hr1=1.0 / len(rows[0]["candidates"]),
                most_popular_hr1=answer_bias.most_popular_hr1(rows, counts), source=f"{done[0].workdir}/config.json")


def mean_std(values: list[float]) -> dict | None:
    values = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(float(v))]
    if not values:
        return None
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return dict(mean=mean, std=std, n=len(values))


def summarize(entries: list[dict]) -> dict:
    """Per row over its finished seeds: mean, sample std (n-1) and n of every column."""
    summary = {}
    for name in dict.fromkeys(e["row"] for e in entries):
        done = [e for e in entries if e["row"] == name and e["status"] == "finished"]
        s = dict(seeds=[e["seed"] for e in done], planned=sum(e["row"] == name for e in entries))
        for key, _ in METRIC_COLUMNS:
            s[key] = mean_std([e["metrics"].get(key) for e in done])
        for key in ("train_samples", "steps", "wall_time_s"):
            s[key] = mean_std([e.get(key) for e in done])
        summary[name] = s
    return summary


def _fmt(stat: dict | None, digits: int = 4) -> str:
    if stat is None:
        return "—"
    if stat["std"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _fmt_count(stat: dict | None) -> str:
    if stat is None:
        return "—"
    if not stat["std"]:
        return f"{stat['mean']:,.0f}"
    return f"{stat['mean']:,.0f} ± {stat['std']:,.0f}"


def _fmt_time(stat: dict | None) -> str:
    if stat is None:
        return "—"
    m = stat["mean"] / 60
    return f"{m:.1f} min" if stat["std"] is None else f"{m:.1f} ± {stat['std'] / 60:.1f} min"


def markdown(out: dict) -> str:
    git = out["git"]
    rev = (git.get("revision") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"# {out['dataset']}: results",
        "",
        f"git {rev}, {out['date']}, host {out['host']}; seeds {','.join(map(str, out['seeds']))}; "
        f"workdirs under `{out['root']}/{out['dataset']}/`"
        + (f"; extra flags `{' '.join(out['extra_flags'])}`" if out["extra_flags"] else ""),
        "",
        "| row | what | seeds | " + " | ".join(h for _, h in METRIC_COLUMNS) + " | train samples | steps | wall time |",
        "|---" * (3 + len(METRIC_COLUMNS) + 3) + "|",
    ]
    by_row = {}
    for e in out["runs"]:
        by_row.setdefault(e["row"], e)
    for name, s in out["summary"].items():
        e = by_row[name]
        seeds = f"{len(s['seeds'])}/{s['planned']}" + (" (seed-independent)" if e["seed_independent"] else "")
        cells = [f"`{name}`", e["description"], seeds, *(_fmt(s[k]) for k, _ in METRIC_COLUMNS),
                 _fmt_count(s["train_samples"]), _fmt_count(s["steps"]), _fmt_time(s["wall_time_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    n_test = out["n_test"]
    lines += [
        "",
        "Test split"
        + (f" ({', '.join(map(str, n_test))} rows)" if n_test else "")
        + ". Mean ± sample standard deviation (n - 1) over the finished seeds; `seeds` = finished/planned. "
        "ValidRatio = samples naming exactly one candidate / all; HitRatio@1 = hits / valid samples; "
        "accuracy = hits / all. 2T = the two-tower protocol (cos(v_U, v_T) over the 20 candidates); LL = the 20 "
        "candidates ranked by the LM's mean per-token log-likelihood of each as the answer (`--likelihood`); grounded = "
        "greedy decoding restricted to the candidates' answers (a prefix trie; `--likelihood`); HR@10 and "
        "NDCG@10 rank the whole catalogue (two-tower for LLM rows, logits for `sasrec`, whose HitRatio@1 and "
        "accuracy are its HR@1 on the 20 candidates). Wall time is each run's own (training + evaluation).",
    ]
    ref = out.get("references")
    if ref:
        lines += ["", f"User-blind references on the same test rows (HR@1 = accuracy): a random candidate "
                      f"{ref['random_hr1']:.4f}; the candidate with the most training interactions "
                      f"{ref['most_popular_hr1']:.4f}."]
    biased = {f"`{e['row']}` s{e['seed']}": e["answer_bias"] for e in out["runs"]
              if isinstance(e.get("answer_bias"), dict) and "n" in e["answer_bias"]}
    if biased:
        from rsllm_jax.eval.answer_bias import table  # imported late, as in diagnostics()

        lines += ["", "What the LLM rows' valid test answers follow (`python -m rsllm_jax.eval.answer_bias`): the "
                      "position in the candidate list (a model that learned the format but not the user names one "
                      "position) and the named item's training popularity among the row's candidates (0.5 = a "
                      "random pick).", "", *table(biased)]
    nip = [(f"`{e['row']}` s{e['seed']}", e["nip_per_answer"]) for e in out["runs"] if e.get("nip_per_answer")]
    if nip:
        floor = nip[0][1]["copy_floor"]
        lines += ["", "Training NIP loss per answer, in nats (per-token NIP x answer tokens per example, from each "
                      f"run's metrics.jsonl). Copying one of the candidate titles at random costs "
                      f"ln {round(math.exp(floor))} = {floor:.2f}; "
                      "knowing the target costs 0. Step 1 is measured before any update.", "",
                  "| run | answer tokens | step 1 | last quarter of the steps |", "|---|---|---|---|"]
        lines += [f"| {name} | {n['tokens_per_answer']:.1f} | {n['first']:.2f} | {n['last']:.2f} ({n['last_steps']} steps) |"
                  for name, n in nip]
    if out["dataset"] == "steam":
        lines += ["", "Steam: LLaRA's train split is public only as a 1,000-row sample; the train set here adds the "
                      "windows inside the val/test histories (their targets are never trained on)."]
    todo = [e for e in out["runs"] if e["status"] != "finished"]
    if todo:
        lines += ["", "Not in the table (unfinished):", ""]
        lines += [f"- `{e['row']}` seed {e['seed']} (`{e['workdir']}`): {e['note']}" for e in todo]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    runs = plan_runs(opts)
    if opts.dry_run:
        for run in with_likelihood(opts, runs):
            state = ("done" if finished_result(run.row, run.workdir) is not None
                     else "reuse" if run.reused else "run")
            print(f"[{state}] {run.key}: " + (shlex.join(run.command) if not run.reused else f"(reused) {run.workdir}"))
            for old in run.dropped:
                print(f"    the row's definition overrides the extra flag {old}")
        return 0
    problems: dict[str, str] = {}
    if not opts.collect_only:
        previous = None
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread
            pass
        try:
            problems = run_all(opts, with_likelihood(opts, runs))
        except (_Terminated, KeyboardInterrupt):
            _log("interrupted: collecting what has finished; run the same command again to resume")
            collect(opts, runs)
            return 130
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    out = collect(opts, runs, problems)
    unfinished = [e for e in out["runs"] if e["status"] != "finished"]
    if unfinished and not opts.collect_only:
        _log(f"{len(unfinished)} run(s) did not finish: " + ", ".join(f"{e['row']}-s{e['seed']}" for e in unfinished))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
