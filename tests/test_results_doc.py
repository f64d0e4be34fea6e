"""docs/results.md's tables are regenerated from results/ between markers; the prose around them is kept."""
import json

import pytest

from rsllm_jax.report import results_doc


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run(row, valid, hits, n, **extra):
    metrics = dict(valid_ratio=valid, accuracy=hits / n, hit_ratio_at_1=hits / n / valid, two_tower_hr1=0.05, n=n,
                   likelihood_hr1=None)
    metrics.update(extra)
    return dict(row=row, status="finished", metrics=metrics,
                nip_per_answer=dict(first=5.3, last=5.8, tokens_per_answer=5.2, copy_floor=3.0, last_steps=2))


def _steps(path, norms):
    _write(path, "\n".join(json.dumps(dict(step=i + 1, **n)) for i, n in enumerate(norms)) + "\n")


@pytest.fixture
def results(tmp_path):
    r = tmp_path / "results"
    main_runs = [_run("rsllm", 0.6, 6, 95, likelihood_hr1=7 / 95, likelihood_mean_rank=10.3, likelihood_sum_hr1=0.06),
                 dict(row="no_tt", status="running")]
    _write(r / "movielens.json", json.dumps(dict(summary={}, runs=main_runs)))
    _write(r / "movielens.md", "# MovieLens\n\n| row | what | seeds |\n|---|---|---|\n| `rsllm` | x | 0 |\n\n"
                               "Not in the table: nothing\n")
    _steps(r / "logs/movielens/rsllm-s0/metrics.jsonl", [dict(grad_norm=1.5), dict(grad_norm=11.5), dict(grad_norm=9.7)])
    # The group-clip comparison run, which logged the norm per parameter group.
    _write(r / "stage2_clip/group/movielens.json", json.dumps(dict(summary={}, runs=[_run(
        "rsllm", 0.8, 9, 95, likelihood_hr1=7 / 95, likelihood_mean_rank=10.3, likelihood_copy_nats=2.5,
        likelihood_choice_nats=2.9)])))
    _steps(r / "stage2_clip/group/logs/movielens/rsllm-s0/metrics.jsonl",
           [{"grad_norm": 5.0, "grad_norm/projector": 4.0, "grad_norm/llm": 3.0},
            {"grad_norm": 13.0, "grad_norm/projector": 12.0, "grad_norm/llm": 5.0}])
    return r


DOC = """# Results

Prose before.

<!-- table:movielens -->
stale table
<!-- /table:movielens -->

<!-- table:steam -->
kept: no steam results yet
<!-- /table:steam -->

Prose between.

<!-- ll-table -->
<!-- /ll-table -->

<!-- clip-table -->
<!-- /clip-table -->

<!-- clip-steps -->
<!-- /clip-steps -->

Prose after.
"""


def _block(doc, name):
    return doc.split(f"<!-- {name} -->\n")[1].split(f"<!-- /{name} -->")[0]


def test_tables_regenerate_and_prose_stays(results):
    doc, changed = results_doc.splice(DOC, str(results))
    for prose in ("Prose before.", "Prose between.", "Prose after."):
        assert prose in doc
    assert set(changed) == {"table:movielens", "ll-table", "clip-table", "clip-steps"}
    assert _block(doc, "table:movielens") == "| row | what | seeds |\n|---|---|---|\n| `rsllm` | x | 0 |\n"
    assert _block(doc, "table:steam") == "kept: no steam results yet\n"  # no inputs: left as it was
    assert "| movielens | `rsllm` | 0.074 | 7 / 95 | 0.060 | 10.30 | — |" in _block(doc, "ll-table")

    rows = {line.split(" | ")[0][2:]: line for line in _block(doc, "clip-table").splitlines()[2:]}
    assert rows["movielens, global (main table)"].startswith(
        "| movielens, global (main table) | 0.600 | 6 / 95 | 0.105 | 0.050 | 7 / 10.30 | — | 5.30 -> 5.80 | 1.5 / 11.5 / 9.7 | — |")
    # A run with the copy / choice split of its likelihood readout shows it.
    assert "| 7 / 10.30 | 2.50 + 2.90 | 5.30 -> 5.80 |" in rows["movielens, group"]
    assert rows["movielens, group"].endswith("| 5.0 / 13.0 / 13.0 | 4.0 / 12.0 / 12.0; 3.0 / 5.0 / 5.0 |")
    assert "not run yet" in rows["movielens, global (re-run)"] and "not run yet" in rows["lastfm, group"]

    steps = _block(doc, "clip-steps").splitlines()
    assert steps[0] == "| step | movielens, group |"  # columns without logs are left out
    assert steps[2:] == ["| 1 | 5.0 / 4.0 / 3.0 |", "| 2 | 13.0 / 12.0 / 5.0 |"]

    # Idempotent: a second pass changes nothing.
    assert results_doc.splice(doc, str(results)) == (doc, [])


def test_write_replaces_the_file(results, tmp_path):
    path = tmp_path / "results.md"
    path.write_text(DOC)
    assert "clip-table" in results_doc.write(str(results), str(path))
    assert "6 / 95" in path.read_text() and not (tmp_path / "results.md.tmp").exists()


@pytest.mark.parametrize("doc, message", [
    ("a\n<!-- nonsense-table -->\n<!-- /nonsense-table -->\n", r"results\.md:2: unknown table <!-- nonsense-table -->"),
    ("a\nb\n<!-- ll-table -->\nrows\n", r"results\.md:3: <!-- ll-table --> is never closed"),
    ("<!-- /ll-table -->\n", r"results\.md:1: closing marker"),
])
def test_bad_markers_name_the_line(results, doc, message):
    with pytest.raises(ValueError, match=message):
        results_doc.splice(doc, str(results), "docs/results.md")


def test_broken_results_json_names_the_file(results):
    (results / "movielens.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"movielens\.json: not JSON"):
        results_doc.splice(DOC, str(results))


def test_nip_by_windows_lines_up_batch_sizes():
    # Batch 8 (1,024 windows in 128 steps): four steps per 32-window bin, averaged.
    run = dict(train_samples=64, steps=8, nip_per_answer=dict(per_step=[[s, float(s)] for s in range(1, 9)]))
    assert results_doc.nip_by_windows(run) == [(32, 2.5), (64, 6.5)]
    # Batch 32: one step per bin.
    run = dict(train_samples=64, steps=2, nip_per_answer=dict(per_step=[[1, 9.0], [2, 5.0]]))
    assert results_doc.nip_by_windows(run) == [(32, 9.0), (64, 5.0)]
    assert results_doc.nip_by_windows(dict(train_samples=0, steps=0)) == []


def test_comparison_figure_drawn_only_from_finished_runs(results, tmp_path):
    entries = [results_doc.Entry("main", "rsllm", "movielens.json", "logs/movielens"),
               results_doc.Entry("absent", "rsllm", "budget/none/movielens.json", "budget/none/logs")]
    out = tmp_path / "img" / "fig.png"
    assert results_doc.comparison_figure(str(results), entries, str(out)) is None  # no per-step series yet
    data = json.loads((results / "movielens.json").read_text())
    data["runs"][0].update(train_samples=64, steps=2)
    data["runs"][0]["nip_per_answer"]["per_step"] = [[1, 9.0], [2, 5.0]]
    (results / "movielens.json").write_text(json.dumps(data))
    assert results_doc.comparison_figure(str(results), entries, str(out)) == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_infonce_table_against_chance(results):
    run_dir = results / "logs/movielens/rsllm-s0"
    _write(run_dir / "config.json", json.dumps(dict(train=dict(batch_size=32, grad_accum_steps=8))))
    _steps(run_dir / "metrics.jsonl", [dict(grad_norm=1.0, l_ut=1.6 - 0.1 * i, l_tt=0.8 - 0.1 * i) for i in range(8)])
    entries = [results_doc.Entry("main", "rsllm", "movielens.json", "logs/movielens"),
               results_doc.Entry("absent", "rsllm", "budget/none/movielens.json", "budget/none/logs")]
    lines = results_doc.infonce_table(str(results), entries).splitlines()
    # Micro-batch 32 / 8 = 4: chance ln 4; first and last quarter (2 of 8 steps) of each loss.
    assert lines[2] == "| main | 4 | 4 | 1.39 | 1.55 -> 0.95 | 0.75 -> 0.15 | 0.050 | 6 / 95 |"
    assert lines[3].startswith("| absent | not run yet |")
    # With the step-wide pool every row of the batch of 32 is a negative: chance ln 32.
    _write(run_dir / "config.json", json.dumps(dict(train=dict(batch_size=32, grad_accum_steps=8),
                                                    loss=dict(nce_pool="step"))))
    lines = results_doc.infonce_table(str(results), entries).splitlines()
    assert lines[2].startswith("| main | 4 | 32 | 3.47 |")


def _ll(hits, n=95):
    return dict(likelihood_hr1=hits / n, likelihood_mean_rank=10.0, likelihood_sum_hr1=hits / n)


def test_seeds_table_and_seed_labels(results):
    assert results_doc.seeds_table(str(results)) is None  # one seed per row: nothing to average
    runs = [dict(_run("sasrec", 1.0, 32, 95), seed=0), dict(_run("sasrec", 1.0, 30, 95), seed=1),
            dict(_run("text_ft", 0.7, 7, 95, **_ll(5)), seed=0), dict(_run("text_ft", 0.8, 9, 95, **_ll(6)), seed=1),
            dict(_run("rsllm", 0.9, 12, 95, **_ll(4)), seed=1), dict(_run("rsllm", 0.6, 5, 95, **_ll(7)), seed=0),
            dict(_run("no_ut", 0.6, 6, 95), seed=0)]
    for r in runs[:2]:
        r["metrics"].update(valid_ratio=None, hit_ratio_at_1=r["metrics"]["accuracy"], two_tower_hr1=None)
    _write(results / "movielens.json", json.dumps(dict(summary={}, runs=runs)))
    lines = results_doc.seeds_table(str(results)).splitlines()
    assert lines[0] == ("| dataset | row | seed 0: accuracy (hits) | seed 1: accuracy (hits) | accuracy | ValidRatio "
                        "| 2T HR@1 | LL HR@1 |")
    rows = {line.split(" | ")[1]: line for line in lines[2:]}
    assert set(rows) == {"`sasrec`", "`text_ft`", "`rsllm`", "`rsllm` − `text_ft`", "`rsllm` − `sasrec`"}  # not no_ut
    assert rows["`sasrec`"] == "| movielens | `sasrec` | 0.337 (32) | 0.316 (30) | 0.326 ± 0.015 | — | — | — |"
    assert rows["`rsllm`"] == ("| movielens | `rsllm` | 0.053 (5) | 0.126 (12) | 0.089 ± 0.052 | 0.750 ± 0.212 "
                               "| 0.050 ± 0.000 | 0.058 ± 0.022 |")
    assert rows["`rsllm` − `text_ft`"].startswith("| movielens | `rsllm` − `text_ft` | -2 hits | +3 hits | 0.005 ± 0.037 |")
    assert rows["`rsllm` − `sasrec`"].startswith("| movielens | `rsllm` − `sasrec` | -27 hits | -18 hits |")
    # The per-run tables name the seed where a row has several; the comparisons read seed 0.
    doc, _ = results_doc.splice(DOC, str(results))
    assert "| movielens | `rsllm` s1 | 0.042 | 4 / 95 |" in _block(doc, "ll-table")
    rows = {line.split(" | ")[0][2:]: line for line in _block(doc, "clip-table").splitlines()[2:]}
    assert "| 0.600 | 5 / 95 |" in rows["movielens, global (main table)"]


def test_results_doc_needs_no_jax():
    # The tables rebuild on a machine without jax: the pool rule lives in the jax-free train/nce_pool.py.
    import subprocess
    import sys
    code = "import sys; sys.modules['jax'] = None; import rsllm_jax.report.results_doc"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_bug_inside_a_table_is_not_reported_as_an_unknown_marker(results):
    # A likelihood result without its summed-likelihood field: the builder's KeyError surfaces as itself.
    data = json.loads((results / "movielens.json").read_text())
    del data["runs"][0]["metrics"]["likelihood_sum_hr1"]
    (results / "movielens.json").write_text(json.dumps(data))
    with pytest.raises(KeyError, match="likelihood_sum_hr1"):
        results_doc.splice(DOC, str(results))
