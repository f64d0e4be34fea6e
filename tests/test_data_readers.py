"""Readers: title cleaning, real-file facts, the RecBole fallback and every bad-input error."""
import gzip
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rsllm_jax.data import readers, splits
from rsllm_jax.data.errors import DataError


def _raises(fn, *args, path=None, line=None, field=None, **kwargs) -> DataError:
    """Call fn, expect DataError naming path / line / field (each checked only when given)."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    err = info.value
    msg = str(err)
    if path is not None:
        assert str(path) in msg and err.path == str(path)
    if line is not None:
        assert err.line == line and f"line {line}" in msg
    if field is not None:
        assert err.field == field and f"'{field}'" in msg
    return err


# ---- title cleaning --------------------------------------------------------------------------

@pytest.mark.parametrize("raw, clean", [
    ("Toy Story (1995)", "Toy Story"),
    ("Shawshank Redemption, The (1994)", "The Shawshank Redemption"),
    ("Fish Called Wanda, A (1988)", "A Fish Called Wanda"),
    ("American in Paris, An (1951)", "An American in Paris"),
    ("Usual Suspects, The", "The Usual Suspects"),  # RecBole titles have no year
    ("Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)", "Shanghai Triad (Yao a yao yao dao waipo qiao)"),
    ("City of Lost Children, The (1995)", "The City of Lost Children"),
    ("Theodore Rex (1995)", "Theodore Rex"),  # 'The' inside a word is not an article
    ("Postino, Il (1994)", "Postino, Il"),  # only The/A/An move (LLaRA's rule)
    ("1-900 (1994)", "1-900"),
    ("unknown", "unknown"),
    ("  Babe   (1995) ", "Babe"),
])
def test_clean_movielens_title(raw, clean):
    assert readers.clean_movielens_title(raw) == clean


# ---- real files ------------------------------------------------------------------------------

def test_real_movielens(data_dir):
    ratings = readers.read_movielens_ratings(data_dir / "ml-100k" / "u.data")
    titles = readers.read_movielens_items(data_dir / "ml-100k" / "u.item")
    assert len(ratings) == 100_000 and ratings["user"].nunique() == 943
    assert ratings["item"].min() == 0 and ratings["item"].max() == 1681 == len(titles) - 1
    assert titles[0] == "Toy Story" and titles[63] == "The Shawshank Redemption"
    assert any("é" in t for t in titles)  # latin-1 decoded


def test_real_llara_jsonl_equals_pickle(data_dir):
    for name, pad in (("movielens/Val_data", 1682), ("lastfm/Test_data", 4606), ("steam/Val_data", 3581)):
        stem = data_dir / "llara_ref" / name
        from_json = readers.read_llara_rows(stem.with_suffix(".jsonl"), pad)
        from_pickle = readers.read_llara_rows(stem.with_suffix(".df"), pad)
        drop = lambda rows: [{k: v for k, v in r.items() if k != "line"} for r in rows]  # noqa: E731
        assert drop(from_json) == drop(from_pickle)
    assert readers.llara_split_path(data_dir / "llara_ref" / "movielens", "Val_data").suffix == ".jsonl"


def test_llara_falls_back_to_pickle(tmp_path):
    pd.DataFrame({"seq": [[1, 2, 5, 5]], "len_seq": [2], "next": [3]}).to_pickle(tmp_path / "Val_data.df")
    path = readers.llara_split_path(tmp_path, "Val_data")
    assert path.suffix == ".df"
    rows = readers.read_llara_rows(path, pad_id=5)
    assert rows == [{"row": 0, "line": 1, "history": [1, 2], "target": 3}]


def test_real_hetrec_and_steam(data_dir):
    het = data_dir / "hetrec2011-lastfm-2k"
    assert len(readers.read_hetrec_artists(het / "artists.dat")) == 17_632
    assert len(readers.read_hetrec_user_artists(het / "user_artists.dat")) == 92_834
    tag_file = readers.find_hetrec_tag_timestamps(het)
    assert tag_file.name == "user_taggedartists-timestamps.RECONSTRUCTED.dat"
    tags = readers.read_hetrec_tag_timestamps(tag_file)
    assert len(tags) == 186_479 and tags["user"].nunique() == 1_892
    games = readers.read_steam_games(data_dir / "steam" / "steam_games.json.gz")
    assert len(games) == 32_135
    names = readers.read_id2name(data_dir / "llara_ref" / "steam" / "id2name.txt")
    # id2name titles are whitespace-normalised by the reader (4 game titles carry double spaces).
    game_titles = {" ".join(str(g.get("title")).split()) for g in games}
    assert len(names) == 3_581 and all(n in game_titles for n in names)


@pytest.fixture(scope="session")
def recbole_dir(tmp_path_factory):
    try:
        return readers.fetch_recbole_ml100k(tmp_path_factory.mktemp("downloads"))
    except DataError as e:
        pytest.skip(f"PyPI not reachable: {e}")


def test_recbole_copy_equals_udata(recbole_dir, data_dir):
    again = readers.fetch_recbole_ml100k(recbole_dir.parent)  # cached: no second download
    assert again == recbole_dir
    rb = readers.read_recbole_ratings(recbole_dir / "ml-100k.inter")
    raw = readers.read_movielens_ratings(data_dir / "ml-100k" / "u.data")
    pd.testing.assert_frame_equal(rb, raw)  # row for row, same order
    rb_titles = readers.read_recbole_items(recbole_dir / "ml-100k.item")
    titles = readers.read_movielens_items(data_dir / "ml-100k" / "u.item")
    assert len(rb_titles) == len(titles) == 1682
    assert rb_titles[63] == "The Shawshank Redemption"
    assert rb_titles == titles  # UTF-8 read, two RecBole typos corrected (readers.RECBOLE_TITLE_FIXES)
    assert rb_titles[542] == "Misérables, Les"


def test_movielens_source_fallback_to_recbole(recbole_dir, monkeypatch):
    # Nothing local and GroupLens unreachable -> the (already fetched) RecBole copy.
    monkeypatch.setattr(readers, "GROUPLENS_ML100K_URL", "http://127.0.0.1:9/ml-100k.zip")
    src = readers.resolve_movielens_source(None, recbole_dir.parent, timeout=1.0)
    assert src.kind == "recbole" and src.ratings == recbole_dir / "ml-100k.inter"
    assert len(src.read_ratings()) == 100_000


# ---- legacy sort (LLaRA's MovieLens tie order) -------------------------------------------------

def test_legacy_quicksort_sorts():
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 16, 17, 18, 100, 1000):
        keys = rng.integers(0, 7, size=n)
        order = splits.legacy_quicksort_argsort(keys)
        assert sorted(order.tolist()) == list(range(n))
        assert np.all(np.diff(keys[order]) >= 0)
    distinct = rng.permutation(500)
    np.testing.assert_array_equal(splits.legacy_quicksort_argsort(distinct), np.argsort(distinct))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 feature names")
def test_legacy_quicksort_matches_numpy_without_simd():
    """numpy's own argsort, with its SIMD sorts disabled, is the reference we port."""
    code = ("import numpy as np, json, sys\n"
            "rng = np.random.default_rng(1)\n"
            "arrs = [rng.integers(0, int(rng.integers(1, 30)), size=int(rng.integers(0, 600))) for _ in range(200)]\n"
            "json.dump([[a.tolist(), np.argsort(a, kind='quicksort').tolist()] for a in arrs], sys.stdout)\n")
    env = dict(os.environ, NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        pytest.skip(f"cannot disable numpy SIMD here: {proc.stderr[-300:]}")
    for keys, ref in json.loads(proc.stdout):
        assert splits.legacy_quicksort_argsort(keys).tolist() == ref


# ---- bad inputs ------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    _raises(readers.read_movielens_ratings, tmp_path / "u.data", path=tmp_path / "u.data")
    _raises(readers.read_id2name, tmp_path / "id2name.txt", path=tmp_path / "id2name.txt")
    err = _raises(readers.llara_split_path, tmp_path, "Val_data")
    assert "Val_data" in str(err)


def test_malformed_udata(tmp_path):
    p = tmp_path / "u.data"
    p.write_text("1\t2\t3\t100\n1\t3\t4\n")
    _raises(readers.read_movielens_ratings, p, path=p, line=2, field="timestamp")
    p.write_text("1\t2\t3\t100\n1\t3\t4\t101\t9\n")
    _raises(readers.read_movielens_ratings, p, path=p, line=2)
    p.write_text("1\t2\t3\t100\n1\tx\t4\t101\n")
    _raises(readers.read_movielens_ratings, p, path=p, line=2, field="item")
    p.write_text("")
    _raises(readers.read_movielens_ratings, p, path=p)


def test_uitem_errors(tmp_path):
    p = tmp_path / "u.item"
    p.write_bytes("1|Toy Story (1995)|x\n2|Misérables, Les (1995)|x\n".encode("latin-1"))
    assert readers.read_movielens_items(p) == ["Toy Story", "Misérables, Les"]
    _raises(readers.read_movielens_items, p, encoding="utf-8", path=p, line=2)  # wrong encoding
    p.write_bytes("1|Toy Story (1995)|x\n".encode("utf-16"))
    _raises(readers.read_movielens_items, p, path=p, line=1)  # UTF-16 file read as latin-1
    p.write_text("1|Toy Story (1995)\n3|Heat (1995)\n")
    _raises(readers.read_movielens_items, p, path=p, line=2, field="movieID")
    p.write_text("1|Toy Story (1995)\nno title here\n")
    _raises(readers.read_movielens_items, p, path=p, line=2, field="title")


def test_id2name_errors(tmp_path):
    p = tmp_path / "id2name.txt"
    p.write_bytes(b"0::a\n1::Caf\xe9\n")
    _raises(readers.read_id2name, p, path=p, line=2)
    p.write_text("0::a\n1 b\n")
    _raises(readers.read_id2name, p, path=p, line=2, field="name")
    p.write_text("0::a\n2::c\n")
    _raises(readers.read_id2name, p, path=p, line=2, field="id")
    p.write_text("0::a\n1::  \n")
    _raises(readers.read_id2name, p, path=p, line=2, field="name")


def test_llara_row_errors(tmp_path):
    p = tmp_path / "Val_data.jsonl"
    good = '{"seq": [1, 2, 5], "len_seq": 2, "next": 3}\n'
    for bad_line, field in [
        ('{"seq": [1, 7, 5], "len_seq": 2, "next": 3}', "seq"),  # unknown item id
        ('{"seq": [1, 2, 5], "len_seq": 2, "next": 9}', "next"),
        ('{"seq": [1, 2, 5], "len_seq": 3, "next": 3}', "len_seq"),
        ('{"seq": [1, 5, 2], "len_seq": 2, "next": 3}', "seq"),  # padding in the middle
        ('{"seq": [1, 2, 5], "next": 3}', "len_seq"),
    ]:
        p.write_text(good + bad_line + "\n")
        _raises(readers.read_llara_rows, p, 5, path=p, line=2, field=field)
    p.write_text(good + "{not json\n")
    _raises(readers.read_llara_rows, p, 5, path=p, line=2)


def test_steam_games_errors(tmp_path):
    p = tmp_path / "steam_games.json.gz"
    p.write_bytes(gzip.compress(b"{'id': '1', 'title': 'A'}\n{'id': '2', 'title': \n"))
    _raises(readers.read_steam_games, p, path=p, line=2)
    p.write_bytes(b"not gzip")
    _raises(readers.read_steam_games, p, path=p)


def test_custom_reader_errors(tmp_path):
    p = tmp_path / "inter.csv"
    p.write_text("user,item,time\nu1,a,1\n")
    _raises(readers.read_custom_interactions, p, path=p, line=1, field="timestamp")
    p.write_text("user,item,timestamp\nu1,a,1\nu1,b,yesterday\n")
    _raises(readers.read_custom_interactions, p, path=p, line=3, field="timestamp")
    p.write_text("user,item,timestamp\nu1,a,1\nu1,,2\n")
    _raises(readers.read_custom_interactions, p, path=p, line=3, field="item")
    p.write_text("user,item,timestamp\n")
    _raises(readers.read_custom_interactions, p, path=p)
    q = tmp_path / "items.tsv"
    q.write_text("item\ttitle\na\tA\nb\tB\na\tA again\n")
    _raises(readers.read_custom_items, q, path=q, line=4, field="item")


def test_custom_reader_formats(tmp_path):
    csv_path, tsv_path = tmp_path / "i.csv", tmp_path / "i.tsv"
    csv_path.write_text('user,item,timestamp,extra\nu1,"x, y",2024-01-02T00:00:00Z,1\nu1,b,2024-01-01,2\n')
    tsv_path.write_text("extra\ttimestamp\tuser\titem\n1\t2024-01-02T00:00:00Z\tu1\tx, y\n2\t2024-01-01\tu1\tb\n")
    a, b = readers.read_custom_interactions(csv_path), readers.read_custom_interactions(tsv_path)
    pd.testing.assert_frame_equal(a.drop(columns="line"), b.drop(columns="line"))
    assert a["item"].tolist() == ["x, y", "b"] and a["timestamp"].iloc[0] > a["timestamp"].iloc[1]


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_llara_pickle_runs_no_code(tmp_path, monkeypatch):
    import pickle

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "Val_data.df"
    path.write_bytes(pickle.dumps({"seq": _Hostile()}))
    with pytest.raises(DataError, match=r"Val_data.df.*refusing to unpickle (posix|os|nt)\.system"):
        readers.read_llara_rows(path, pad_id=5)
    assert not (tmp_path / "pwned").exists()
    # A pickle of something other than a DataFrame, and a file that is not a pickle at all.
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="holds a list, not a DataFrame"):
        readers.read_llara_rows(path, pad_id=5)
    path.write_text("seq,len_seq,next\n")
    with pytest.raises(DataError, match="not a pickle file"):
        readers.read_llara_rows(path, pad_id=5)
