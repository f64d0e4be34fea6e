"""The experiments driver: the planned commands, collection into the results tables, and a tiny end-to-end
run (stage 0 -> stage 1 -> stage 2 through the real entry point) that a second invocation skips."""
import json
import math
import os
import shlex

import numpy as np
import pytest

from rsllm_jax.report import experiments as ex
from synthetic_data import write_custom_dataset
from tiny_llm import save_tiny_llm


def _flags(cmd: list[str]) -> dict[str, str]:
    """--key=value flags of a command (each key once: the driver never repeats a flag)."""
    out = {}
    for arg in cmd[3:]:
        key, _, value = arg.partition("=")
        assert key not in out, f"{key} repeated in {cmd}"
        out[key] = value
    return out


# ---------------------------------------------------------------- 1. the plan
def test_dry_run_commands_overrides_and_dependencies(tmp_path, capsys):
    root = str(tmp_path / "exp")
    argv = ["--dataset=movielens", f"--root={root}", "--seeds=0,1", "--dry_run", "--",
            "--config.train.max_train_samples=0", "--config.loss.weight_ut=0.2", "--config.data.max_history=10",
            "--config.eval.max_rows=50"]
    opts = ex.parse_args(argv)
    runs = {r.key: r for r in ex.plan_runs(opts)}
    wd = lambda row, s: os.path.join(root, "movielens", f"{row}-s{s}")  # noqa: E731
    # Every row for both seeds, except the deterministic zero-shot evaluation (once).
    assert set(runs) == {f"{r.name}-s{s}" for r in ex.ROWS for s in (0, 1)} - {"zero_shot-s1"}

    for run in runs.values():
        assert run.command[1:3] == ["-m", "rsllm_jax.main"]
        f = _flags(run.command)
        assert f["--workdir"] == run.workdir == wd(run.row.name, run.seed)
        assert f["--config.data.dataset"] == "movielens" and f["--config.seed"] == str(run.seed)
        assert "--config.data.split_seed" not in f  # LLaRA's val/test rows for every seed
        assert f["--config.data.max_history"] == "10"  # data extras reach every row, stage 0 included
        assert f["--config.eval.max_rows"] == "50"  # and the evaluation subset: every row on the same rows
        if run.row.name == "sasrec":
            assert f["--config"].endswith("configs/sasrec.py")
            assert "--config.train.max_train_samples" not in f and "--config.optim.lr" not in f
            continue
        assert f["--config.train.max_train_samples"] == "0"  # extras reach every LLM row
        if run.row.kind == "stage2":
            assert f["--config"].endswith("configs/stage2.py")
            assert f["--config.stage2.sasrec_dir"] == wd("sasrec", run.seed)
            assert f["--config.stage2.build_missing"] == "False"
            assert float(f["--config.optim.lr"]) == 8e-4

    z = _flags(runs["zero_shot-s0"].command)
    assert z["--config"].endswith("configs/eval.py")
    assert z["--config.checkpoint"] == "" and z["--config.checkpoint_stage"] == "stage1"
    assert z["--config.prompts.use_ids"] == "False" and z["--config.prompts.chat_template"] == "auto"
    assert "--config.optim.lr" not in z

    t = _flags(runs["text_ft-s1"].command)
    assert t["--config"].endswith("configs/stage1.py")
    assert t["--config.stage1.datasets"] == '("movielens",)'
    assert float(t["--config.optim.lr"]) == 8e-4

    ll = _flags(runs["llara_like-s0"].command)
    assert ll["--config.stage2.stage1_dir"] == "none" and ll["--config.train.curriculum"] == "True"
    assert ll["--config.loss.weight_tt"] == "0" and ll["--config.loss.weight_ut"] == "0"  # the row beats the extra
    assert runs["llara_like-s0"].dropped == ["--config.loss.weight_ut=0.2"]
    assert runs["llara_like-s0"].deps == ["sasrec-s0"]

    for s in (0, 1):
        r = _flags(runs[f"rsllm-s{s}"].command)
        assert r["--config.stage2.stage1_dir"] == wd("text_ft", s)
        assert r["--config.loss.weight_ut"] == "0.2"  # not defining for rsllm: the extra applies
        assert "--config.loss.weight_tt" not in r and "--config.train.curriculum" not in r
        assert runs[f"rsllm-s{s}"].deps == [f"sasrec-s{s}", f"text_ft-s{s}"]
    assert _flags(runs["no_ut-s0"].command)["--config.loss.weight_ut"] == "0"
    assert _flags(runs["no_tt-s0"].command)["--config.loss.weight_tt"] == "0"
    assert _flags(runs["no_stage1-s1"].command)["--config.stage2.stage1_dir"] == "none"
    idf = _flags(runs["id_only-s0"].command)
    assert idf["--config.prompts.use_titles"] == "False" and idf["--config.stage2.stage1_dir"] == wd("text_ft", 0)

    # Dependencies run before their dependants.
    order = list(runs)
    for key, run in runs.items():
        assert all(order.index(d) < order.index(key) for d in run.deps)

    # main --dry_run prints exactly these commands and runs nothing.
    assert ex.main(argv) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[run] ")]
    assert printed == [f"[run] {k}: {shlex.join(r.command)}" for k, r in runs.items()]
    assert not (tmp_path / "exp").exists()


def test_seeded_rows_repeat_only_the_key_rows(tmp_path):
    root = str(tmp_path / "exp")
    opts = ex.parse_args(["--dataset=movielens", f"--root={root}", "--seeds=0,1,2", "--seeded_rows=rsllm"])
    runs = {r.key: r for r in ex.plan_runs(opts)}
    # rsllm and what it depends on in every seed; every other row (and the seed-free zero-shot) once.
    repeated = {f"{name}-s{s}" for name in ("sasrec", "text_ft", "rsllm") for s in (0, 1, 2)}
    once = {f"{r.name}-s0" for r in ex.ROWS if r.name not in ("sasrec", "text_ft", "rsllm")}
    assert set(runs) == repeated | once
    for s in (1, 2):  # a repeated row reads its own seed's stage 0 and stage 1
        f = _flags(runs[f"rsllm-s{s}"].command)
        assert f["--config.seed"] == str(s)
        assert f["--config.stage2.sasrec_dir"] == os.path.join(root, "movielens", f"sasrec-s{s}")
        assert f["--config.stage2.stage1_dir"] == os.path.join(root, "movielens", f"text_ft-s{s}")
    assert runs["no_ut-s0"].deps == ["sasrec-s0", "text_ft-s0"]
    # Without the flag every seeded row repeats (the earlier behaviour).
    plain = ex.plan_runs(ex.parse_args(["--dataset=movielens", f"--root={root}", "--seeds=0,1,2"]))
    assert len(plain) == 3 * (len(ex.ROWS) - 1) + 1
    with pytest.raises(SystemExit):
        ex.parse_args(["--dataset=movielens", "--seeds=0,1", "--seeded_rows=rsllm,nope"])


def test_likelihood_runs_follow_each_llm_row(tmp_path):
    root = str(tmp_path / "exp")
    opts = ex.parse_args(["--dataset=lastfm", f"--root={root}", "--rows=zero_shot,rsllm", "--likelihood", "--",
                          "--config.eval.max_rows=50", "--config.eval.split=val"])
    plan = ex.with_likelihood(opts, ex.plan_runs(opts))
    assert [r.key for r in plan] == [
        "sasrec-s0", "zero_shot-s0", "zero_shot:likelihood-s0", "zero_shot:likelihood_val-s0", "text_ft-s0",
        "text_ft:likelihood-s0", "text_ft:likelihood_val-s0", "rsllm-s0", "rsllm:likelihood-s0",
        "rsllm:likelihood_val-s0"]
    by_key = {r.key: r for r in plan}
    for name in ("zero_shot", "text_ft", "rsllm"):
        # The validation-row run only scores (fusion picks its weight there); it is finished by its own file.
        run, val = by_key[f"{name}-s0"], by_key[f"{name}:likelihood_val-s0"]
        fv = _flags(val.command)
        assert fv["--config.eval.split"] == "val" and fv["--config.eval.grounded"] == "False"
        assert fv["--workdir"] == val.workdir == os.path.join(run.workdir, "likelihood_val")
        assert ex.result_file(val.row) == "metrics_val.json" and val.deps == [run.key]
        run, ll = by_key[f"{name}-s0"], by_key[f"{name}:likelihood-s0"]
        f, parent = _flags(ll.command), _flags(run.command)
        assert f["--config"].endswith("configs/eval.py") and ll.deps == [run.key]
        assert f["--workdir"] == ll.workdir == os.path.join(run.workdir, "likelihood")
        assert f["--config.eval.generate"] == "False" and f["--config.eval.score_candidates"] == "True"
        assert f["--config.eval.split"] == "test"  # the table's split, whatever the extras say
        assert f["--config.eval.max_rows"] == "50" and f["--config.data.dataset"] == "lastfm"
        assert ll.row.kind == "eval" and ex.finished_result(ll.row, ll.workdir) is None
        if name == "zero_shot":  # evaluates the untrained model exactly as its row does
            assert f["--config.checkpoint"] == "" and f["--config.prompts.chat_template"] == "auto"
        else:  # the row's checkpoint, in the row's prompt format
            assert f["--config.checkpoint"] == run.workdir
            assert f["--config.checkpoint_stage"] == run.row.kind
            for key in ("--config.prompts.use_ids", "--config.stage2.sasrec_dir"):
                assert f.get(key) == parent.get(key)
    assert _flags(by_key["text_ft:likelihood-s0"].command)["--config.prompts.use_ids"] == "False"
    # Without the flag nothing is added.
    opts = ex.parse_args(["--dataset=lastfm", f"--root={root}", "--rows=rsllm"])
    assert [r.key for r in ex.with_likelihood(opts, ex.plan_runs(opts))] == ["sasrec-s0", "text_ft-s0", "rsllm-s0"]


def test_rows_selection_lr_and_reused_sasrec(tmp_path):
    opts = ex.parse_args(["--dataset=steam", f"--root={tmp_path}", "--rows=no_tt", "--sasrec_dir=runs/sasrec-steam",
                          "--seeds=3,4", "--row_flag=text_ft:--config.train.max_train_samples=512"])
    runs = {r.key: r for r in ex.plan_runs(opts)}
    # Dependencies are added; one shared stage-0 run when it is reused.
    assert list(runs) == ["sasrec-s3", "text_ft-s3", "no_tt-s3", "text_ft-s4", "no_tt-s4"]
    assert runs["sasrec-s3"].reused and runs["sasrec-s3"].workdir == "runs/sasrec-steam"
    for s in (3, 4):
        f = _flags(runs[f"no_tt-s{s}"].command)
        assert f["--config.stage2.sasrec_dir"] == "runs/sasrec-steam"
        assert float(f["--config.optim.lr"]) == 5e-4
        assert f.get("--config.train.max_train_samples") != "512"  # a row flag reaches its row only
        assert _flags(runs[f"text_ft-s{s}"].command)["--config.train.max_train_samples"] == "512"
    opts = ex.parse_args(["--dataset=lastfm", "--rows=sasrec,text_ft", "--lr=1e-4", "--configs=tiny"])
    (sas, ft) = ex.plan_runs(opts)
    assert float(_flags(ft.command)["--config.optim.lr"]) == 1e-4
    assert _flags(ft.command)["--config"].endswith("configs/tiny.py:stage1")
    assert _flags(sas.command)["--config"].endswith("configs/tiny.py")
    with pytest.raises(SystemExit):
        ex.parse_args(["--dataset=movielens", "--rows=rsllm,nope"])
    with pytest.raises(SystemExit):
        ex.parse_args(["--dataset=movielens", "--", "config.seed=1"])


def test_reused_stage1_dir(tmp_path):
    """--stage1_dir: one existing stage-1 run feeds every seed's stage-2 rows; a bad one stops them, named."""
    sas, ft = tmp_path / "sas", tmp_path / "ft"
    opts = ex.parse_args(["--dataset=steam", f"--root={tmp_path / 'r'}", "--rows=no_tt", f"--sasrec_dir={sas}",
                          f"--stage1_dir={ft}", "--seeds=3,4"])
    runs = {r.key: r for r in ex.plan_runs(opts)}
    assert list(runs) == ["sasrec-s3", "text_ft-s3", "no_tt-s3", "no_tt-s4"]
    assert runs["text_ft-s3"].reused and runs["text_ft-s3"].workdir == str(ft)
    for s in (3, 4):
        f = _flags(runs[f"no_tt-s{s}"].command)
        assert f["--config.stage2.stage1_dir"] == str(ft) and f["--config.seed"] == str(s)
        assert runs[f"no_tt-s{s}"].deps == ["sasrec-s3", "text_ft-s3"]
    done = {"dataset": "steam", "test": {"hr1": 0.1}}
    ex.write_json_atomic(str(sas / "results.json"), done)
    # No finished stage 1 there: nothing is started, and the message names the flag and the directory.
    problems = ex.run_all(opts, list(runs.values()))
    assert problems["text_ft-s3"] == f"--stage1_dir={ft} holds no finished results.json"
    assert "needs text_ft-s3" in problems["no_tt-s3"] and "needs text_ft-s3" in problems["no_tt-s4"]
    assert "sasrec-s3" not in problems and not (tmp_path / "r").exists()
    ex.write_json_atomic(str(ft / "results.json"), dict(done, dataset="lastfm"))
    problems = ex.run_all(opts, list(runs.values()))
    assert problems["text_ft-s3"] == f"--stage1_dir={ft} is a lastfm run, not steam"


def test_planned_commands_parse_against_the_real_configs():
    """Every override names an existing field of the real configs (they are locked) and yields the value meant."""
    from absl import flags
    from ml_collections import config_flags

    opts = ex.parse_args(["--dataset=lastfm", "--root=r", "--seeds=1"])
    cfgs = {}
    for run in ex.plan_runs(opts):
        argv = ["main", *run.command[3:]]
        fv = flags.FlagValues()
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        fv(argv)
        cfgs[run.row.name] = fv.config
    for name, c in cfgs.items():
        assert c.stage == ex.ROW_BY_NAME[name].kind and c.data.dataset == "lastfm" and c.seed == 1
        assert c.data.split_seed == 0
        if ex.ROW_BY_NAME[name].trains_llm:
            assert c.optim.lr == 7e-4
        if c.stage == "stage2":
            assert c.stage2.sasrec_dir == "r/lastfm/sasrec-s1" and c.stage2.build_missing is False
    assert cfgs["text_ft"].stage1.datasets == ("lastfm",) and cfgs["text_ft"].prompts.use_ids is False
    z = cfgs["zero_shot"]
    assert (z.checkpoint, z.checkpoint_stage) == ("", "stage1")
    assert (z.prompts.use_ids, z.prompts.chat_template) == (False, "auto")
    ll = cfgs["llara_like"]
    assert (ll.loss.weight_tt, ll.loss.weight_ut, ll.train.curriculum, ll.stage2.stage1_dir) == (0, 0, True, "none")
    assert (cfgs["rsllm"].loss.weight_tt, cfgs["rsllm"].loss.weight_ut) == (0.1, 0.1)
    assert cfgs["rsllm"].stage2.stage1_dir == "r/lastfm/text_ft-s1" and not cfgs["rsllm"].train.curriculum
    assert cfgs["no_ut"].loss.weight_ut == 0 and cfgs["no_ut"].loss.weight_tt == 0.1
    assert cfgs["no_tt"].loss.weight_tt == 0 and cfgs["no_tt"].loss.weight_ut == 0.1
    assert cfgs["no_stage1"].stage2.stage1_dir == "none"
    assert cfgs["id_only"].prompts.use_titles is False and cfgs["id_only"].prompts.use_ids is True
    lw = cfgs["ranked_listwise"]
    assert (lw.loss.weight_listwise, lw.loss.listwise_negatives, lw.prompts.candidate_order) == (1.0, 9, "sasrec")


def test_tuple_override_syntax_gives_a_one_element_tuple():
    """What the driver passes for config.stage1.datasets, parsed by ml_collections' tuple parser."""
    from ml_collections.config_flags import tuple_parser

    parse = tuple_parser.TupleParser().parse
    assert parse('("movielens",)') == ("movielens",)
    assert parse("movielens") == ("movielens",)  # a bare name also works (literal_eval fails -> 1-tuple)


# ---------------------------------------------------------------- 2. collection
def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _llm_result(valid, hit_ratio, acc, tt=None, steps=12, samples=384, wall=100.0):
    test = dict(n=95, valid_ratio=valid, hit_ratio_at_1=hit_ratio, accuracy=acc)
    if tt is not None:
        test.update(two_tower_hr1=tt, two_tower_hr10=tt / 2, two_tower_ndcg10=tt / 4)
    return dict(stage="stage2", test=test, val=dict(n=94, valid_ratio=0.5, hit_ratio_at_1=0.1, accuracy=0.05),
                train_samples=samples, steps=steps, best_step=steps, wall_time_s=wall)


def test_collect_from_fake_workdirs(tmp_path):
    root = tmp_path / "exp"
    d = root / "movielens"
    _write(d / "sasrec-s0" / "results.json", dict(test=dict(hr1_cand=0.3, hr10=0.1, ndcg10=0.05, n=95),
                                                   val=dict(hr1_cand=0.4), train_samples=66127, wall_time_s=60.0))
    (d / "sasrec-s0" / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n')
    _write(d / "sasrec-s1" / "results.json", dict(test=dict(hr1_cand=0.4, hr10=0.2, ndcg10=0.07, n=95),
                                                   train_samples=66127, wall_time_s=80.0))
    _write(d / "zero_shot-s0" / "metrics_test.json", dict(n=95, valid_ratio=0.0, hit_ratio_at_1=0.0, accuracy=0.0,
                                                          two_tower_hr1=0.02, two_tower_hr10=0.0,
                                                          two_tower_ndcg10=0.0, wall_time_s=309.2))
    _write(d / "rsllm-s0" / "results.json", _llm_result(0.9, 0.4, 0.36, tt=0.2, wall=120.0))
    (d / "rsllm-s0" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0, "nip": 3.0}\n{"step": 2, "loss": 2.0}\n')
    _write(d / "rsllm-s1" / "results.json", _llm_result(0.8, 0.5, 0.40, tt=0.4, wall=180.0))
    # Likelihood readouts: read where they exist, on the same test rows only.
    _write(d / "rsllm-s0" / "likelihood" / "metrics_test.json", dict(n=95, likelihood_hr1=0.2, likelihood_sum_hr1=0.1,
                                                                     likelihood_mean_rank=6.0))
    _write(d / "rsllm-s1" / "likelihood" / "metrics_test.json", dict(n=95, likelihood_hr1=0.3))
    _write(d / "text_ft-s0" / "likelihood" / "metrics_test.json", dict(n=50, likelihood_hr1=0.9))
    # text_ft: seed 0 finished, seed 1 failed; a stage run killed after writing metrics_test.json is unfinished.
    _write(d / "text_ft-s0" / "results.json", _llm_result(0.7, 0.3, 0.21, samples=192, steps=6))
    _write(d / "text_ft-s1" / "experiment.json", dict(command=["python", "-m", "x"], attempts=[
        dict(started="t", returncode=1, wall_time_s=5.0)]))
    _write(d / "no_ut-s0" / "metrics_test.json", dict(n=95, valid_ratio=1.0, hit_ratio_at_1=1.0, accuracy=1.0))

    results = tmp_path / "results"
    argv = ["--dataset=movielens", f"--root={root}", "--seeds=0,1", "--collect_only", f"--results_dir={results}",
            "--rows=sasrec,zero_shot,text_ft,rsllm,no_ut"]
    assert ex.main(argv) == 0
    out = json.loads((results / "movielens.json").read_text())
    assert out["git"]["revision"] and isinstance(out["git"]["dirty"], bool)
    assert out["host"] and out["date"] and out["seeds"] == [0, 1]
    runs = {f"{e['row']}-s{e['seed']}": e for e in out["runs"]}
    assert set(runs) == {"sasrec-s0", "sasrec-s1", "zero_shot-s0", "text_ft-s0", "text_ft-s1", "rsllm-s0",
                         "rsllm-s1", "no_ut-s0", "no_ut-s1"}

    r0 = runs["rsllm-s0"]
    assert r0["status"] == "finished" and r0["seed"] == 0
    assert r0["metrics"] == dict(valid_ratio=0.9, hit_ratio_at_1=0.4, accuracy=0.36, two_tower_hr1=0.2, hr10=0.1,
                                 ndcg10=0.05, n=95, likelihood_hr1=0.2, likelihood_sum_hr1=0.1, likelihood_mean_rank=6.0,
                                 likelihood_copy_nats=None, likelihood_choice_nats=None, grounded_hr1=None)
    assert runs["text_ft-s0"]["metrics"]["likelihood_hr1"] is None  # evaluated on other rows: not mixed in
    assert (r0["train_samples"], r0["steps"], r0["wall_time_s"]) == (384, 12, 120.0)
    assert "--config.stage2.stage1_dir=" + str(d / "text_ft-s0") in r0["command"]
    assert r0["command_source"] == "planned"
    assert os.path.exists(r0["curves"])  # training curves plotted into the workdir
    s = runs["sasrec-s0"]
    assert s["metrics"]["hit_ratio_at_1"] == 0.3 and s["metrics"]["valid_ratio"] is None and s["steps"] == 20
    assert runs["zero_shot-s0"]["metrics"]["two_tower_hr1"] == 0.02 and runs["zero_shot-s0"]["steps"] == 0
    assert runs["text_ft-s1"]["status"] == "unfinished" and "failed (exit 1)" in runs["text_ft-s1"]["note"]
    assert runs["text_ft-s1"]["command"] == ["python", "-m", "x"] and runs["text_ft-s1"]["command_source"] == "recorded"
    assert runs["no_ut-s0"]["status"] == "unfinished"  # metrics_test.json alone is not a finished stage run
    assert runs["no_ut-s1"]["note"] == "not run yet"

    sm = out["summary"]
    assert sm["rsllm"]["hit_ratio_at_1"]["mean"] == pytest.approx(0.45)
    assert sm["rsllm"]["hit_ratio_at_1"]["std"] == pytest.approx(np.std([0.4, 0.5], ddof=1))
    assert sm["rsllm"]["two_tower_hr1"]["n"] == 2 and sm["text_ft"]["accuracy"]["n"] == 1
    assert sm["no_ut"]["accuracy"] is None

    md = (results / "movielens.md").read_text()
    table = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| `")}
    assert list(table) == ["`sasrec`", "`zero_shot`", "`text_ft`", "`rsllm`", "`no_ut`"]
    # what | seeds | ValidRatio | HitRatio@1 | accuracy | 2T HR@1 | LL HR@1 | grounded HR@1 | fusion HR@1 | gate HR@1 |
    # HR@10 | NDCG@10 |
    # samples | steps | wall
    rs = table["`rsllm`"]
    assert rs[1] == "2/2"
    assert rs[2] == f"0.8500 ± {np.std([0.9, 0.8], ddof=1):.4f}"
    assert rs[3] == f"0.4500 ± {np.std([0.4, 0.5], ddof=1):.4f}"
    assert rs[4] == f"0.3800 ± {np.std([0.36, 0.40], ddof=1):.4f}"
    assert rs[5] == f"0.3000 ± {np.std([0.2, 0.4], ddof=1):.4f}"
    assert rs[6] == f"0.2500 ± {np.std([0.2, 0.3], ddof=1):.4f}"
    assert rs[7] == rs[8] == rs[9] == "—"  # no grounded readout, no val likelihood scores for fusion or gate
    assert rs[12:] == ["384", "12", f"2.5 ± {np.std([120, 180], ddof=1) / 60:.1f} min"]
    assert table["`text_ft`"][1] == "1/2" and table["`text_ft`"][3] == "0.3000" and table["`text_ft`"][5] == "—"
    assert table["`text_ft`"][6] == "—" and table["`sasrec`"][6] == "—"
    assert table["`sasrec`"][2] == "—" and table["`sasrec`"][3] == f"0.3500 ± {np.std([0.3, 0.4], ddof=1):.4f}"
    assert table["`zero_shot`"][1].startswith("1/1")
    assert table["`no_ut`"][1] == "0/2" and table["`no_ut`"][3] == "—"
    notes = md.split("Not in the table")[1]
    assert "`text_ft` seed 1" in notes and "failed (exit 1)" in notes
    assert "`no_ut` seed 0" in notes and "`no_ut` seed 1" in notes and "not run yet" in notes
    assert "`rsllm`" not in notes
    assert "Training NIP loss per answer" not in md  # no run logged answer_tokens: no table

    # The NIP loss per answer: per-token NIP x answer tokens per example (micro-batch 32 / 8 = 4).
    w = tmp_path / "nip"
    _write(w / "config.json", dict(train=dict(batch_size=32, grad_accum_steps=8), data=dict(num_candidates=20)))
    (w / "metrics.jsonl").write_text("".join(json.dumps(dict(step=i, nip=nip, answer_tokens=tok)) + "\n" for i, nip, tok in
                                             [(1, 2.0, 20.0), (2, 1.5, 24.0), (3, 1.0, 20.0), (4, 1.0, 28.0),
                                              (5, 0.5, 16.0)] + [(4, 3.0, 8.0)]))  # a resumed step 4: last wins
    n = ex.nip_per_answer(str(w))
    assert n["first"] == pytest.approx(10.0) and n["tokens_per_answer"] == pytest.approx((5 + 6 + 5 + 2 + 4) / 5)
    assert n["last"] == pytest.approx(0.5 * 4) and n["last_steps"] == 1  # the last quarter of 5 steps: 1
    assert n["copy_floor"] == pytest.approx(np.log(20)) and n["per_step"] == [[1, 10.0], [2, 9.0], [3, 5.0], [4, 6.0], [5, 2.0]]
    (w / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')  # SASRec-style metrics: nothing to read
    assert ex.nip_per_answer(str(w)) is None
    (w / "metrics.jsonl").write_text('{"step": 1, "nip": 1.0, "answer_tokens": 4.0}\n{"step": 2, "ni\n')
    assert ex.nip_per_answer(str(w)) is None  # a cut line: warned about, and collection goes on
    out["runs"][-1]["nip_per_answer"] = n
    md = ex.markdown(out)
    assert "ln 20 = 3.00" in md and f"| `{out['runs'][-1]['row']}` s1 | 4.4 | 10.00 | 2.00 (1 steps) |" in md


# ---------------------------------------------------------------- 3. end to end (tiny)
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exp")
    model_dir = save_tiny_llm(tmp / "tiny-llama")
    inter, items = write_custom_dataset(tmp / "data")
    extra = [f"--config.llm.model={model_dir}", f"--config.data.custom_interactions={inter}",
             f"--config.data.custom_items={items}", f"--config.data.cache_dir={tmp / 'cache'}",
             "--config.train.max_train_samples=16", "--config.train.val_samples=4", "--config.eval.max_rows=4",
             "--config.log_every_steps=1"]
    return tmp, extra


def test_tiny_end_to_end_and_resume(tiny_setup, monkeypatch, capsys):
    tmp, extra = tiny_setup
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")  # fewer fake devices: faster
    root, results = tmp / "runs", tmp / "results"
    argv = ["--dataset=custom", f"--root={root}", f"--results_dir={results}", "--configs=tiny", "--rows=rsllm",
            "--likelihood", "--", *extra]
    rc = ex.main(argv)
    first = capsys.readouterr().out
    assert rc == 0, first[-4000:]
    out = json.loads((results / "custom.json").read_text())
    runs = {f"{e['row']}-s{e['seed']}": e for e in out["runs"]}
    assert set(runs) == {"sasrec-s0", "text_ft-s0", "rsllm-s0"}
    d = root / "custom"
    for key, e in runs.items():
        assert e["status"] == "finished", e
        assert e["metrics"]["n"] and e["wall_time_s"] > 0 and e["process_wall_time_s"] > 0
        assert e["command_source"] == "recorded" and e["command"][1:3] == ["-m", "rsllm_jax.main"]
        assert (d / key / "run.log").stat().st_size > 0
        assert (d / key / "curves.png").exists()
    assert runs["rsllm-s0"]["metrics"]["valid_ratio"] is not None
    assert runs["rsllm-s0"]["metrics"]["two_tower_hr1"] is not None
    assert runs["rsllm-s0"]["steps"] == 1 and runs["rsllm-s0"]["train_samples"] == 16
    # --likelihood: each LLM row's checkpoint was also ranked by answer likelihood, on the same test rows.
    for key in ("text_ft-s0", "rsllm-s0"):
        assert 0.0 <= runs[key]["metrics"]["likelihood_hr1"] <= 1.0
        assert 1.0 <= runs[key]["metrics"]["likelihood_mean_rank"] <= 20.0
        assert (d / key / "likelihood" / "predictions_test.jsonl").exists()
    assert "restored" in (d / "rsllm-s0" / "likelihood" / "run.log").read_text()
    # ... and on the validation rows, so the fusion with SASRec's logits picks its weight there.
    from rsllm_jax.eval import fusion, paired

    for key in ("text_ft-s0", "rsllm-s0"):
        m = runs[key]["metrics"]
        assert (d / key / "likelihood_val" / "predictions_val.jsonl").exists()
        assert m["fusion_weight"] in m["fusion_val_hr1"]
        assert m["fusion_val_hr1"][m["fusion_weight"]] == max(m["fusion_val_hr1"].values())
        assert m["fusion_hr1"] == m["fusion_test_hr1"][m["fusion_weight"]]
        # w = inf is SASRec alone: the same test hits as the stage-0 row's own HR@1 on the candidates.
        assert m["fusion_test_hr1"]["inf"] == pytest.approx(runs["sasrec-s0"]["metrics"]["hit_ratio_at_1"])
        # The gate answering no row is SASRec alone too; its share is the one val scores best.
        assert m["gate_test_hr1"]["0.0"] == pytest.approx(runs["sasrec-s0"]["metrics"]["hit_ratio_at_1"])
        assert m["gate_val_hr1"][str(m["gate_share"])] == max(m["gate_val_hr1"].values())
        assert m["gate_hr1"] == m["gate_test_hr1"][str(m["gate_share"])]
    # Every finished run's per-row test hits are kept beside the tables, and stand in for the run.
    hits = results / ex.HITS_DIR
    names = sorted(p.name for p in hits.iterdir())
    assert "custom-sasrec-s0.json" in names and "custom-rsllm-s0-grounded.json" in names
    assert "custom-rsllm-s0-fusion.json" in names and "custom-rsllm-s0-gate.json" in names
    split = ex._run_split(ex.parse_args(argv), ex.plan_runs(ex.parse_args(argv))[0])
    assert (paired.run_hits(str(hits / "custom-rsllm-s0.json"), split.test)
            == paired.run_hits(str(d / "rsllm-s0"), split.test))
    assert fusion.WEIGHTS[0] == 0.0 and math.isinf(fusion.WEIGHTS[-1])
    cmd = runs["rsllm-s0"]["command"]
    assert f"--config.stage2.stage1_dir={d / 'text_ft-s0'}" in cmd
    assert f"--config.stage2.sasrec_dir={d / 'sasrec-s0'}" in cmd
    # Stage 2 really continued from stage 1 and read stage 0's table.
    log = (d / "rsllm-s0" / "run.log").read_text()
    assert "restored" in log and "text_ft-s0" in log
    np.testing.assert_array_equal(np.load(d / "rsllm-s0" / "item_embeddings.npy"),
                                  np.load(d / "sasrec-s0" / "item_embeddings.npy"))
    md = (results / "custom.md").read_text()
    assert "`rsllm`" in md and "Not in the table" not in md
    # User-blind references on the run's own split: 1/K for a random pick, most-popular in [0, 1].
    ref = out["references"]
    assert ref["n"] >= runs["rsllm-s0"]["metrics"]["n"]  # every test row (the runs evaluate max_rows)
    assert ref["random_hr1"] == pytest.approx(1 / 20) and 0.0 <= ref["most_popular_hr1"] <= 1.0
    assert f"{ref['most_popular_hr1']:.4f}" in md.split("User-blind references")[1]
    # Every finished LLM run's test answers get an answer-bias report, in the JSON and the markdown.
    for key in ("text_ft-s0", "rsllm-s0"):
        bias = runs[key]["answer_bias"]
        assert bias["n"] == runs[key]["metrics"]["n"]
        assert bias["valid"] == round(runs[key]["metrics"]["valid_ratio"] * bias["n"])
    assert "answer_bias" not in runs["sasrec-s0"]
    assert "| `rsllm` s0 |" in md.split("What the LLM rows' valid test answers follow")[1]
    # The report is saved beside the run: collected again without the predictions (a copy of the logs),
    # the table keeps it.
    assert json.loads((d / "rsllm-s0" / ex.ANSWER_BIAS_FILE).read_text()) == runs["rsllm-s0"]["answer_bias"]
    (d / "rsllm-s0" / "predictions_test.jsonl").rename(d / "rsllm-s0" / "predictions_test.jsonl.bak")
    assert ex.main([*argv[:-len(extra) - 1], "--collect_only", "--", *extra]) == 0
    again = {f"{e['row']}-s{e['seed']}": e for e in json.loads((results / "custom.json").read_text())["runs"]}
    assert again["rsllm-s0"]["answer_bias"] == runs["rsllm-s0"]["answer_bias"]
    (d / "rsllm-s0" / "predictions_test.jsonl.bak").rename(d / "rsllm-s0" / "predictions_test.jsonl")
    capsys.readouterr()

    # Rerun: everything is finished, nothing runs again, the tables are rebuilt.
    mtime = (results / "custom.json").stat().st_mtime_ns
    assert ex.main(argv) == 0
    second = capsys.readouterr().out
    for key in ("text_ft:likelihood-s0", "rsllm:likelihood-s0"):
        assert f"{key}: finished, skipping" in second
    for key in runs:
        assert f"{key}: finished, skipping" in second
        record = json.loads((d / key / "experiment.json").read_text())
        assert len(record["attempts"]) == 1
    assert "running" not in second
    assert (results / "custom.json").stat().st_mtime_ns > mtime
