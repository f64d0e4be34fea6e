"""The cross-dataset overview reads what the experiments driver writes (collected from fake workdirs here)."""
import json

import numpy as np
import pytest

from rsllm_jax.report import experiments as ex
from rsllm_jax.report import overview


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _llm(valid, acc, n):
    test = dict(n=n, valid_ratio=valid, hit_ratio_at_1=acc / valid, accuracy=acc)
    return dict(stage="stage2", test=test, train_samples=256, steps=8, best_step=8, wall_time_s=60.0)


@pytest.fixture(params=[False])
def results(tmp_path, request):
    root, out = tmp_path / "exp", tmp_path / "results"
    ml = root / "movielens"
    _write(ml / "sasrec-s0" / "results.json", dict(test=dict(hr1_cand=32 / 95, n=95), train_samples=10))
    _write(ml / "text_ft-s0" / "results.json", _llm(0.7, 7 / 95, 95))
    _write(ml / "rsllm-s0" / "results.json", _llm(0.6, 5 / 95, 95))
    _write(ml / "rsllm-s1" / "results.json", _llm(0.8, 9 / 95, 95))
    if request.param:  # the likelihood readout of one run (experiments --likelihood)
        _write(ml / "rsllm-s0" / "likelihood" / "metrics_test.json", dict(n=95, likelihood_hr1=0.25))
    lf = root / "lastfm"
    _write(lf / "sasrec-s0" / "results.json", dict(test=dict(hr1_cand=40 / 122, n=122), train_samples=10))
    _write(lf / "rsllm-s0" / "results.json", _llm(0.9, 12 / 122, 122))
    for ds, seeds in (("movielens", "0,1"), ("lastfm", "0")):
        argv = [f"--dataset={ds}", f"--root={root}", f"--seeds={seeds}", "--collect_only", f"--results_dir={out}",
                "--rows=sasrec,text_ft,rsllm"]
        assert ex.main(argv) == 0
    # Collection stores the test-row count once; the overview's hit counts read it.
    assert json.loads((out / "movielens.json").read_text())["n_test"] == [95]
    # The references need a real split (diagnostics()); give one dataset a recorded pair.
    path = out / "lastfm.json"
    data = json.loads(path.read_text())
    data["references"] = dict(n=122, random_hr1=0.05, most_popular_hr1=12 / 122)
    path.write_text(json.dumps(data))
    if request.param:  # one run's training loss per answer (experiments.nip_per_answer needs a real config)
        path = out / "movielens.json"
        data = json.loads(path.read_text())
        run = next(e for e in data["runs"] if e["row"] == "rsllm" and e["seed"] == 0)
        run["nip_per_answer"] = dict(copy_floor=float(np.log(20)), per_step=[[1, 9.0], [2, 6.0]])
        path.write_text(json.dumps(data))
    return out


def _table(md):
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in md.splitlines() if line.startswith("| `")}


def test_overview_table_and_figure(results):
    md_path, png, nip_png = overview.write(str(results), str(results / "overview"))
    assert nip_png is None  # no run logged the NIP loss per answer: no empty figure
    md = open(md_path).read()
    table = _table(md)
    # Driver order, every row any dataset planned; columns: ML acc, LastFM acc, ML VR, LastFM VR.
    assert list(table) == ["`sasrec`", "`text_ft`", "`rsllm`"]
    assert table["`sasrec`"] == ["0.337 (32)", "0.328 (40)", "—", "—"]
    assert table["`text_ft`"] == ["0.074 (7)", "—", "0.700", "—"]
    # Two seeds: mean ± sample std and no hit count.
    assert table["`rsllm`"][0] == f"{7 / 95:.3f} ± {np.std([5 / 95, 9 / 95], ddof=1):.3f}"
    assert table["`rsllm`"][1] == "0.098 (12)" and table["`rsllm`"][3] == "0.900"
    assert "lastfm (n = 122): most popular candidate 0.098, random 0.050" in md
    assert "movielens (n =" not in md  # no references recorded for it: none invented
    assert "LL HR@1" not in md  # no likelihood readout anywhere: no empty columns
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_overview_errors_name_the_file(results, tmp_path):
    (results / "steam.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"steam\.json: not JSON.*--dataset=steam --collect_only"):
        overview.load(str(results))
    (results / "steam.json").write_text(json.dumps(dict(runs=[])))
    with pytest.raises(ValueError, match=r"steam\.json: field 'summary' missing"):
        overview.load(str(results))
    with pytest.raises(FileNotFoundError, match="no results/<dataset>.json"):
        overview.load(str(tmp_path / "empty"))
    # Only the datasets asked for are read.
    assert list(overview.load(str(results), ["movielens"])) == ["movielens"]


@pytest.mark.parametrize("results", [True], indirect=True)
def test_overview_likelihood_columns(results):
    md = open(overview.write(str(results), str(results / "overview"))[0]).read()
    table = _table(md)
    # ML acc, LastFM acc, ML VR, LastFM VR, ML LL, LastFM LL
    assert table["`rsllm`"][4:] == ["0.250", "—"] and table["`sasrec`"][4:] == ["—", "—"]
    assert "LL HR@1: the candidates ranked" in md


@pytest.mark.parametrize("results", [True], indirect=True)
def test_overview_training_loss_figure(results):
    _, _, nip_png = overview.write(str(results), str(results / "overview"))
    assert nip_png == str(results / "overview_nip.png")
    with open(nip_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Only the datasets with a series get a panel: LastFM has none, so the figure has one.
    import matplotlib.image

    h, w = matplotlib.image.imread(nip_png).shape[:2]
    assert w < 1.5 * h * (4.2 / 3.6)
