"""Split builder: invariants on the real data, the generic protocol, validation and caching."""
import json
import pathlib

import numpy as np
import pytest

from rsllm_jax.data import cache as cache_lib
from rsllm_jax.data import readers, splits
from rsllm_jax.data.errors import DataError


@pytest.fixture(scope="session")
def real_split(data_dir, split_cache_dir):
    built = {}

    def get(name):
        if name not in built:
            built[name] = splits.load_split(name, data_dir=str(data_dir), cache_dir=str(split_cache_dir))
        return built[name]
    return get


def _check_invariants(s: splits.SplitData, *, min_eval_history: int = 3):
    n = s.num_items
    assert n == len(s.titles) and all(s.titles)
    for rec in s.train:
        assert 3 <= len(rec["history"]) <= 10
        assert all(0 <= i < n for i in rec["history"]) and 0 <= rec["target"] < n
        assert rec["target"] not in rec["history"]
        assert isinstance(rec["user"], str) and "candidates" not in rec
    for rec in s.val + s.test:
        assert min_eval_history <= len(rec["history"]) <= 10
        assert rec["target"] not in rec["history"]
        c = rec["candidates"]
        assert len(c) == 20 == len(set(c)) and rec["target"] in c
        assert not set(c) & set(rec["history"])
        assert all(0 <= i < n for i in c)
    # Shuffled: the target is not always in the same slot.
    assert len({rec["candidates"].index(rec["target"]) for rec in s.val + s.test}) > 5


def _users(records):
    return {r["user"] for r in records}


def test_movielens(real_split, data_dir):
    s = real_split("movielens")
    assert (len(s.val), len(s.test), s.num_items) == (94, 95, 1682)
    _check_invariants(s)
    assert len(_users(s.train)) == 943 - 94 - 95 == 754
    assert not _users(s.train) & (_users(s.val) | _users(s.test))
    assert not _users(s.val) & _users(s.test)
    assert s.titles[63] == "The Shawshank Redemption"
    m = s.manifest
    assert m["counts"]["train"] == len(s.train) == 66_127
    assert m["filtered"] == {"ratings_below_3": 17_480, "users_without_kept_ratings": 0,
                             "train_windows_history_lt_3": 1_508, "train_users_without_any_window": 0}
    assert m["movielens_source"] == "local" and m["sources"]["ratings"]["sha256"] == readers.ML100K_UDATA_SHA256
    # Val/test are LLaRA's rows verbatim (ratings dropped).
    rows = readers.read_llara_rows(data_dir / "llara_ref/movielens/Test_data.jsonl", 1682)
    assert [(r["history"], r["target"]) for r in rows] == [(r["history"], r["target"]) for r in s.test]


def test_movielens_val_test_are_last_windows(real_split, data_dir):
    """Each val/test row is its user's last window under the legacy-introsort tie order."""
    s = real_split("movielens")
    ratings = readers.read_movielens_ratings(data_dir / "ml-100k/u.data")
    kept = ratings[ratings["rating"] >= 3]
    for rec in s.val[:20] + s.test[:20]:
        g = kept[kept["user"] == int(rec["user"])]
        seq = g["item"].to_numpy()[splits.legacy_quicksort_argsort(g["timestamp"].to_numpy())].tolist()
        assert seq[-11:] == rec["history"] + [rec["target"]]
    # And a train user's windows are consecutive slices of that sequence.
    user = s.train[0]["user"]
    windows = [r for r in s.train if r["user"] == user]
    for a, b in zip(windows, windows[1:]):
        assert b["history"][-1] == a["target"]


def test_lastfm(real_split):
    s = real_split("lastfm")
    assert (len(s.val), len(s.test), s.num_items) == (122, 122, 4606)
    _check_invariants(s)
    m = s.manifest
    assert m["user_ids"].startswith("recovered")
    assert m["filtered"] == {"train_rows_history_lt_3": 2_928}
    assert len(s.train) == 50_800 - 2_928
    assert len(_users(s.train)) == 976
    assert not _users(s.train) & (_users(s.val) | _users(s.test))
    assert not _users(s.val) & _users(s.test)
    assert all(u.isdigit() for u in _users(s.train) | _users(s.val))  # hetrec user ids


def test_lastfm_without_hetrec_uses_synthetic_users(data_dir, tmp_path):
    root = tmp_path / "data"
    (root / "llara_ref").mkdir(parents=True)
    (root / "llara_ref" / "lastfm").symlink_to(data_dir / "llara_ref" / "lastfm")
    s = splits.load_split("lastfm", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    assert s.manifest["user_ids"].startswith("synthetic")
    assert s.val[0]["user"].startswith("lastfm_val_") and len(s.train) == 47_872


def test_steam(real_split):
    s = real_split("steam")
    assert (len(s.val), len(s.test), s.num_items) == (1194, 1194, 3581)
    # LLaRA's official Steam val/test keep 18 rows with < 3 history items (one is empty).
    _check_invariants(s, min_eval_history=0)
    m = s.manifest
    assert m["official_eval_rows_history_lt_min"] == 18
    assert sum(len(r["history"]) < 3 for r in s.val + s.test) == 18
    assert m["train_is_reconstruction"] and any("RECONSTRUCTION" in n for n in m["notes"])
    assert m["train_from_released_sample"] == 1000
    assert len(s.train) == 1000 + m["train_from_eval_histories"]


def test_lastfm_raw_generic_on_hetrec(real_split):
    s = real_split("lastfm_raw")
    _check_invariants(s)
    assert not _users(s.train) & (_users(s.val) | _users(s.test))
    f = s.manifest["filtered"]
    assert f["tag_rows_artist_not_in_artists_dat"] > 0 and f["repeat_interactions"] > 0
    users = s.manifest["users"]
    assert users["val"] == users["test"] == round(0.1 * sum(users.values()))


# ---- generic protocol on small custom data -------------------------------------------------------

def _write_custom(tmp_path: pathlib.Path, n_users=30, n_items=40, per_user=8, sep=",", seed=0):
    rng = np.random.default_rng(seed)
    inter = tmp_path / ("inter.csv" if sep == "," else "inter.tsv")
    items = tmp_path / "items.csv"
    lines = [sep.join(("user", "item", "timestamp"))]
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, size=per_user, replace=False)):
            lines.append(sep.join((f"user{u}", f"sku-{i}", str(1000 + 10 * t))))
    lines.append(sep.join(("user0", lines[1].split(sep)[1], "99999")))  # a repeat interaction
    inter.write_text("\n".join(lines) + "\n")
    items.write_text("item,title\n" + "".join(f"sku-{i},Item {i}\n" for i in reversed(range(n_items + 2))))
    return inter, items


def test_custom_generic_protocol(tmp_path):
    inter, items = _write_custom(tmp_path)
    s = splits.load_split("custom", custom_interactions=str(inter), custom_items=str(items),
                          cache_dir=str(tmp_path / "cache"))
    _check_invariants(s)
    assert (len(s.val), len(s.test), len(_users(s.train))) == (3, 3, 24)
    assert not _users(s.train) & (_users(s.val) | _users(s.test))
    f = s.manifest["filtered"]
    assert f["repeat_interactions"] == 1 and f["items_without_interactions"] >= 2
    # Ids follow the items file's order (which lists sku-41 first, so it is reversed here).
    keys = [k for k in (f"sku-{i}" for i in reversed(range(42)))
            if k in {line.split(",")[1] for line in inter.read_text().splitlines()[1:]}]
    assert s.titles == [f"Item {k.split('-')[1]}" for k in keys]
    # Each user: 8 items -> 7 windows, 2 of them with history < 3.
    assert len(s.train) == 24 * 5 and f["train_windows_history_lt_3"] == 24 * 2
    # TSV input gives the same split.
    tsv_inter, _ = _write_custom(tmp_path, sep="\t")
    t = splits.load_split("custom", custom_interactions=str(tsv_inter), custom_items=str(items),
                          cache_dir=str(tmp_path / "cache"))
    assert (t.train, t.val, t.test, t.titles) == (s.train, s.val, s.test, s.titles)


def test_seed_changes_split_and_candidates(tmp_path):
    inter, items = _write_custom(tmp_path)
    kw = dict(custom_interactions=str(inter), custom_items=str(items), cache_dir=str(tmp_path / "c"))
    a, b = splits.load_split("custom", seed=0, **kw), splits.load_split("custom", seed=1, **kw)
    assert a.val != b.val
    assert splits.load_split("custom", seed=0, **kw).val == a.val


def test_custom_bad_inputs(tmp_path):
    inter, items = _write_custom(tmp_path)
    items.write_text("item,title\n" + "".join(f"sku-{i},Item {i}\n" for i in range(39)))  # no sku-39
    kw = dict(custom_interactions=str(inter), custom_items=str(items), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError) as e:
        splits.load_split("custom", **kw)
    line = next(k for k, text in enumerate(inter.read_text().splitlines(), 1) if ",sku-39," in text)
    assert e.value.path == str(inter) and e.value.line == line and e.value.field == "item"
    assert "no title" in str(e.value)
    with pytest.raises(DataError, match="missing interactions"):
        splits.load_split("custom", custom_interactions=str(tmp_path / "nope.csv"),
                          custom_items=str(items), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match="needs an interactions file"):
        splits.load_split("custom", cache_dir=str(tmp_path / "c"))
    few, _ = _write_custom(tmp_path, n_users=2)
    with pytest.raises(DataError, match="only 2 users") as e:
        splits.load_split("custom", custom_interactions=str(few), custom_items=str(items),
                          cache_dir=str(tmp_path / "c"))
    assert e.value.path == str(few)


def _mini_steam(root: pathlib.Path, val_rows: list[str], titles=("a", "b", "c", "d", "e", "f", "g")):
    d = root / "llara_ref" / "steam"
    d.mkdir(parents=True, exist_ok=True)
    (d / "id2name.txt").write_text("".join(f"{i}::{t}\n" for i, t in enumerate(titles)))
    n = len(titles)
    row = lambda h, t: json.dumps({"seq": h + [n] * (10 - len(h)), "len_seq": len(h), "next": t})  # noqa: E731
    (d / "Val_data.jsonl").write_text("\n".join(val_rows or [row([0, 1, 2], 3)]) + "\n")
    (d / "Test_data.jsonl").write_text(row([1, 2, 3], 4) + "\n")
    (d / "train_data.sample1000.jsonl").write_text(row([0, 1, 2, 3], 4) + "\n")
    return row


def test_official_split_bad_inputs(tmp_path):
    root = tmp_path / "data"
    row = _mini_steam(root, [])
    # 7 items and 20 candidates cannot work: the sampler says so.
    with pytest.raises(ValueError, match="cannot draw 19 negatives"):
        splits.load_split("steam", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    s = splits.load_split("steam", data_dir=str(root), cache_dir=str(tmp_path / "c"), num_candidates=3)
    assert len(s.val) == 1 and len(s.val[0]["candidates"]) == 3
    # A history id with no title (id 8 >= 7 items).
    _mini_steam(root, [row([0, 1, 2], 3), row([0, 8, 2], 3)])
    with pytest.raises(DataError) as e:
        splits.load_split("steam", data_dir=str(root), cache_dir=str(tmp_path / "c"), num_candidates=3)
    assert e.value.path.endswith("Val_data.jsonl") and e.value.line == 2 and e.value.field == "seq"
    assert "unknown item id 8" in str(e.value)
    # Missing file.
    (root / "llara_ref" / "steam" / "Test_data.jsonl").unlink()
    with pytest.raises(DataError, match="Test_data"):
        splits.load_split("steam", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=r"needs files that no package ships: llara_ref/steam/"):
        splits.load_split("steam", data_dir=str(tmp_path / "absent"), cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("dataset,needs", [
    ("lastfm", "llara_ref/lastfm/{train_data,Val_data,Test_data}"),
    ("lastfm_raw", "hetrec2011-lastfm-2k/{artists.dat"),
    ("steam", "llara_ref/steam/{Val_data,Test_data}")])
def test_no_data_dir_names_the_files_to_add(dataset, needs, tmp_path, monkeypatch):
    monkeypatch.delenv("RSLLM_DATA_DIR", raising=False)
    with pytest.raises(DataError) as e:
        splits.load_split(dataset, cache_dir=str(tmp_path))
    msg = str(e.value)
    assert needs in msg and ("huggingface.co" in msg or "grouplens.org" in msg)
    assert "$RSLLM_DATA_DIR" in msg and e.value.field == "data_dir"


# ---- MovieLens without LLaRA's files ----------------------------------------------------------

def test_llara_movielens_user_ids_are_the_released_rows_users(real_split):
    """The committed user ids are exactly the users the released rows match, in row order."""
    s = real_split("movielens")
    users = splits.read_llara_movielens_users()
    assert users == {"val": [int(r["user"]) for r in s.val], "test": [int(r["user"]) for r in s.test]}
    assert s.manifest["eval_rows"] == "llara_released"


def test_movielens_rebuilt_without_llara_ref_equals_released(real_split, data_dir, tmp_path, monkeypatch):
    """With ml-100k but no llara_ref/, the whole split (titles, train, val/test and their frozen
    candidates) is identical to the one built from LLaRA's released files."""
    monkeypatch.delenv("RSLLM_DATA_DIR", raising=False)
    root = tmp_path / "data"
    root.mkdir()
    (root / "ml-100k").symlink_to(data_dir / "ml-100k")
    rebuilt = splits.load_split("movielens", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
    released = real_split("movielens")
    assert rebuilt.manifest["eval_rows"] == "llara_rebuilt"
    assert "eval_users" in rebuilt.manifest["sources"] and "val" not in rebuilt.manifest["sources"]
    for name in ("titles", "train", "val", "test"):
        assert getattr(rebuilt, name) == getattr(released, name), name
    # A shorter history setting cuts the rebuilt rows like the released ones.
    short = {k: splits.load_split("movielens", data_dir=str(d), cache_dir=str(tmp_path / k), max_history=5)
             for k, d in (("rebuilt", root), ("released", data_dir))}
    assert short["rebuilt"].test == short["released"].test


def test_movielens_rebuilt_rejects_a_user_without_a_window(tmp_path, monkeypatch):
    monkeypatch.delenv("RSLLM_DATA_DIR", raising=False)
    ml = tmp_path / "data" / "ml-100k"
    ml.mkdir(parents=True)
    users = splits.read_llara_movielens_users()
    # Every listed user rates item 1 and 2 (a window), except the first test user.
    lines = [f"{u}\t{i}\t4\t{100 + i}" for u in users["val"] + users["test"][1:] for i in (1, 2)]
    (ml / "u.data").write_text("\n".join(lines) + "\n")
    (ml / "u.item").write_bytes(b"1|Heat (1995)|x\n2|Casino (1995)|x\n")
    with pytest.raises(DataError) as e:
        splits.load_split("movielens", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                          num_candidates=1)
    assert f"ml-100k user {users['test'][0]} of LLaRA's test rows" in str(e.value)
    assert e.value.path.endswith("llara_movielens_users.json") and e.value.field == "test"


# ---- cache ---------------------------------------------------------------------------------

def test_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    inter, items = _write_custom(tmp_path)
    cache = tmp_path / "cache"
    kw = dict(custom_interactions=str(inter), custom_items=str(items), cache_dir=str(cache))
    saves = []
    real_save = cache_lib.save_cached
    monkeypatch.setattr(cache_lib, "save_cached", lambda *a, **k: (saves.append(a[0]), real_save(*a, **k)))

    first = splits.load_split("custom", **kw)
    again = splits.load_split("custom", **kw)
    assert len(saves) == 1
    assert (again.train, again.val, again.titles) == (first.train, first.val, first.titles)
    assert again.manifest == first.manifest
    manifest = json.loads((saves[0] / "manifest.json").read_text())
    assert manifest["sources"]["interactions"]["sha256"] == readers.sha256_file(inter)
    assert manifest["seed"] == 0 and manifest["protocol"]["max_history"] == 10

    splits.load_split("custom", seed=3, **kw)  # new seed -> rebuild
    assert len(saves) == 2
    inter.write_text(inter.read_text() + "user1,sku-0,123456\n")  # changed source -> rebuild
    splits.load_split("custom", **kw)
    assert len(saves) == 3 and len(set(saves)) == 3
    # A directory whose manifest does not match its key is never trusted.
    (saves[0] / "manifest.json").write_text(json.dumps({"fingerprint": {"stale": True}}))
    inter.write_text("\n".join(inter.read_text().splitlines()[:-1]) + "\n")
    splits.load_split("custom", **kw)
    assert len(saves) == 4 and saves[3] == saves[0]
    assert not list(cache.glob(".tmp-*"))  # atomic writes leave no temp dirs behind


def test_sample_candidates_uniform_and_exclusive():
    rng = np.random.default_rng(0)
    counts = np.zeros(30, int)
    for _ in range(3000):
        c = splits.sample_candidates(rng, [0, 1, 2], 3, 30, n=5)
        assert len(set(c)) == 5 and 3 in c and not {0, 1, 2} & set(c)
        counts[c] += 1
    negatives = counts[4:] / 3000  # each of 26 items has 4/26 chance
    assert np.allclose(negatives, 4 / 26, atol=0.03) and counts[3] == 3000


def test_eval_subset_is_seeded_ordered_and_shared():
    records = [dict(user=str(i), target=i) for i in range(100)]
    sub = splits.eval_subset(records, 10)
    assert len(sub) == 10 and len({r["user"] for r in sub}) == 10
    assert [r["target"] for r in sub] == sorted(r["target"] for r in sub)  # original order kept
    assert sub == splits.eval_subset(records, 10)  # same (n, seed): same rows for every model
    assert sub != splits.eval_subset(records, 10, seed=1)
    assert sub != records[:10]  # a random subset, not the head of the file
    assert splits.eval_subset(records, 0) == records and splits.eval_subset(records, 500) == records
