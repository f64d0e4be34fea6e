"""The split builder (spec §1): raw data / LLaRA's released rows -> train / val / test records.

Protocol. A sample is (history: the user's previous <= `max_history` items, oldest first;
target: the next item). Samples with fewer than `min_history` history items are dropped (and
counted). Users are split 8:1:1; val/test hold one sample per user (the user's last window),
train holds every window of every train user. Val/test carry `candidates`: the target plus
`num_candidates - 1` items drawn uniformly from items that are neither in the history nor the
target, shuffled, drawn once with `seed` and stored with the split. Train candidates are not
stored (the training pipeline redraws them every epoch).

Datasets:
- `movielens`: official val/test = LLaRA's released rows; train = all windows of the other
  ml-100k users. Facts verified on the real data (asserted by the builder, so a different copy
  of ml-100k fails loudly): LLaRA keeps ratings >= 3 only, and orders each user's ratings by
  timestamp with numpy's classic (pre-SIMD) introsort applied to the user's rows in u.data order
  (`legacy_quicksort_argsort`). With that ordering every one of the 189 val/test rows is the
  last window of exactly one user; a stable sort reproduces only 27 of them.
- `lastfm`: LLaRA's train/val/test rows; user ids recovered from hetrec (see
  `recover_lastfm_users`); LLaRA's LastFM "sequences" follow the hetrec file order (artist id
  ascending per user), not time.
- `lastfm_raw`: the generic protocol on hetrec, ordered by each user-artist pair's first tag time.
- `steam`: LLaRA's val/test rows; train is a reconstruction (the released 1,000-row sample plus
  the windows inside val/test histories), because LLaRA's full Steam train set is not available.
- `custom`: the generic protocol on a user's own interactions + items files.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from absl import logging

from rsllm_jax.data import cache as cache_lib
from rsllm_jax.data import readers
from rsllm_jax.data.errors import DataError

PROTOCOL_VERSION = 1
DATASETS = ("movielens", "lastfm", "lastfm_raw", "steam", "custom")
# What each dataset needs under the data root when no package ships it, and where it is published.
_HETREC = "hetrec2011-lastfm-2k/{artists.dat,user_taggedartists-timestamps.dat} (grouplens.org/datasets/hetrec-2011)"
_LLARA = "huggingface.co/datasets/joyliao7777/LLaRA"
NEEDS_DATA = {
    "lastfm": f"llara_ref/lastfm/{{train_data,Val_data,Test_data}}.df (or .jsonl) and id2name.txt ({_LLARA}/lastfm)",
    "lastfm_raw": _HETREC,
    "steam": f"llara_ref/steam/{{Val_data,Test_data}}.df (or .jsonl), id2name.txt and train_data.sample1000.df "
             f"(a 1,000-row sample of train_data.df, {_LLARA}/steam)",
}
MOVIELENS_MIN_RATING = 3  # LLaRA keeps ratings >= 3 (verified: the released rows contain no 1s or 2s)
LLARA_MAX_HISTORY = 10


@dataclasses.dataclass
class SplitData:
    """A processed split in memory. Item ids index `titles`; `num_items` is also the padding id."""
    dataset: str
    titles: list[str]  # index = item id (0..num_items-1), cleaned
    train: list[dict]  # {'user': str, 'history': list[int] oldest first, 'target': int}
    val: list[dict]  # same + 'candidates': list[int] (distinct, contains target, shuffled)
    test: list[dict]
    manifest: dict  # sources (path + sha256), seed, protocol params, counts, filtered rows and why

    @property
    def num_items(self) -> int:
        return len(self.titles)


def eval_subset(records: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """A seeded random subset of `n` evaluation rows in their original order (0 or n >= len: all rows).
    Every model evaluated with the same (n, seed) sees the same rows, so their numbers stay paired."""
    if not n or n >= len(records):
        return list(records)
    idx = np.sort(np.random.default_rng(seed).choice(len(records), n, replace=False))
    return [records[i] for i in idx]


def item_train_counts(records: Sequence[dict], num_items: int) -> np.ndarray:
    """Training interactions per item = distinct (train user, item) pairs over the user's windows (the
    windows overlap, so counting occurrences would count one interaction up to max_history + 1 times)."""
    seen: set[tuple[str, int]] = set()
    for i, r in enumerate(records):
        user = str(r.get("user", f"row{i}"))
        for item in list(r["history"]) + [r["target"]]:
            seen.add((user, int(item)))
    counts = np.zeros(num_items, np.int64)
    for _, item in seen:
        counts[item] += 1
    return counts


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

def sample_negatives(rng: np.random.Generator, history: Sequence[int], target: int,
                     num_items: int, n: int) -> list[int]:
    """`n` distinct items drawn uniformly from the catalogue minus the history and the target."""
    allowed = np.ones(num_items, dtype=bool)
    allowed[np.asarray(list(history) + [target], dtype=np.int64)] = False
    pool = np.flatnonzero(allowed)
    if n > len(pool):
        raise ValueError(f"cannot draw {n} negatives: only {len(pool)} items are outside the "
                         f"history and target (catalogue of {num_items})")
    return rng.choice(pool, size=n, replace=False).tolist()


def sample_candidates(rng: np.random.Generator, history: Sequence[int], target: int,
                      num_items: int, n: int = 20) -> list[int]:
    """The target plus `n - 1` negatives (see `sample_negatives`), in random order."""
    candidates = np.asarray(sample_negatives(rng, history, target, num_items, n - 1) + [target])
    return rng.permutation(candidates).tolist()


# ----------------------------------------------------------------------------------------------
# Ordering and windows
# ----------------------------------------------------------------------------------------------

_SMALL_QUICKSORT = 15  # numpy: SMALL_QUICKSORT (insertion sort for <= 16 elements)


def legacy_quicksort_argsort(keys: Sequence[int] | np.ndarray) -> np.ndarray:
    """`np.argsort(keys, kind='quicksort')` exactly as numpy computed it before SIMD sorts.

    LLaRA ordered MovieLens ratings with pandas `sort_values('timestamp')`, i.e. numpy's
    introsort (median-of-3 quicksort, insertion sort up to 16 elements, heapsort past the depth
    limit). It is not stable, so the order of equal timestamps is an artefact of that algorithm;
    numpy >= 2 on AVX2/AVX-512 CPUs dispatches to a different (SIMD) sort and gives another tie
    order. This is a line-by-line port of numpy's `aquicksort_` (npysort/quicksort.cpp) so the
    released LLaRA rows are reproduced on any machine and numpy version.
    """
    v = np.asarray(keys).tolist()
    idx = list(range(len(v)))
    if len(v) < 2:
        return np.asarray(idx, dtype=np.int64)
    pl, pr = 0, len(v) - 1
    stack: list[tuple[int, int, int]] = []
    cdepth = (len(v).bit_length() - 1) * 2
    while True:
        if cdepth < 0:
            _legacy_aheapsort(v, idx, pl, pr - pl + 1)
        else:
            while pr - pl > _SMALL_QUICKSORT:
                pm = pl + ((pr - pl) >> 1)
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                if v[idx[pr]] < v[idx[pm]]:
                    idx[pr], idx[pm] = idx[pm], idx[pr]
                if v[idx[pm]] < v[idx[pl]]:
                    idx[pm], idx[pl] = idx[pl], idx[pm]
                vp = v[idx[pm]]
                pi, pj = pl, pr - 1
                idx[pm], idx[pj] = idx[pj], idx[pm]
                while True:
                    pi += 1
                    while v[idx[pi]] < vp:
                        pi += 1
                    pj -= 1
                    while vp < v[idx[pj]]:
                        pj -= 1
                    if pi >= pj:
                        break
                    idx[pi], idx[pj] = idx[pj], idx[pi]
                idx[pi], idx[pr - 1] = idx[pr - 1], idx[pi]
                cdepth -= 1
                # Recurse into the smaller part now, keep the larger one for later (as numpy).
                if pi - pl < pr - pi:
                    stack.append((pi + 1, pr, cdepth))
                    pr = pi - 1
                else:
                    stack.append((pl, pi - 1, cdepth))
                    pl = pi + 1
            for i in range(pl + 1, pr + 1):  # insertion sort
                vi = idx[i]
                j = i
                while j > pl and v[vi] < v[idx[j - 1]]:
                    idx[j] = idx[j - 1]
                    j -= 1
                idx[j] = vi
        if not stack:
            break
        pl, pr, cdepth = stack.pop()
    return np.asarray(idx, dtype=np.int64)


def _legacy_aheapsort(v: list, idx: list[int], start: int, n: int) -> None:
    """numpy's `aheapsort_` on idx[start:start+n] (1-based heap indexing, as in the C code)."""
    def sift(i: int, j: int, n: int, tmp: int) -> None:
        while j <= n:
            if j < n and v[idx[start + j - 1]] < v[idx[start + j]]:
                j += 1
            if v[tmp] < v[idx[start + j - 1]]:
                idx[start + i - 1] = idx[start + j - 1]
                i, j = j, j + j
            else:
                break
        idx[start + i - 1] = tmp

    for top in range(n >> 1, 0, -1):
        sift(top, top << 1, n, idx[start + top - 1])
    while n > 1:
        tmp = idx[start + n - 1]
        idx[start + n - 1] = idx[start]
        n -= 1
        sift(1, 2, n, tmp)


def sliding_windows(sequence: Sequence[int], *, max_history: int,
                    min_history: int) -> tuple[list[tuple[list[int], int]], int]:
    """Every (previous <= max_history items, next item) pair; returns (windows, dropped).

    `dropped` counts the windows whose history is shorter than `min_history`.
    """
    windows, dropped = [], 0
    for t in range(1, len(sequence)):
        history = list(sequence[max(0, t - max_history):t])
        if len(history) < min_history:
            dropped += 1
        else:
            windows.append((history, sequence[t]))
    return windows, dropped


def _last_window(sequence: Sequence[int], max_history: int) -> tuple[tuple[int, ...], int]:
    return tuple(sequence[-1 - max_history:-1]), sequence[-1]


# ----------------------------------------------------------------------------------------------
# Builders. Each returns _Parts; `load_split` adds candidates, manifest and caching.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Parts:
    titles: list[str]
    train: list[dict]
    val: list[dict]
    test: list[dict]
    filtered: dict[str, int]  # reason -> rows/users removed
    notes: list[str]
    info: dict = dataclasses.field(default_factory=dict)  # extra manifest entries


@dataclasses.dataclass
class _Plan:
    sources: dict[str, pathlib.Path]  # name -> file; their sha256s key the cache
    build: Callable[[np.random.Generator], _Parts]  # gets the user-split rng
    # Where the val/test rows come from: llara_released (LLaRA's files), llara_rebuilt (LLaRA's rows
    # rebuilt from raw data and their user ids), generic (the generic protocol's own user split).
    eval_rows: str = "generic"


@dataclasses.dataclass(frozen=True)
class _Protocol:
    max_history: int
    min_history: int


def _record(user: str, history: Sequence[int], target: int) -> dict:
    return {"user": user, "history": [int(i) for i in history], "target": int(target)}


def _official_record(user: str, row: dict, p: _Protocol) -> dict:
    # Official rows keep LLaRA's history, cut to the configured length.
    return _record(user, row["history"][-p.max_history:], row["target"])


LLARA_MOVIELENS_USERS = pathlib.Path(__file__).with_name("llara_movielens_users.json")


def read_llara_movielens_users(path: pathlib.Path = LLARA_MOVIELENS_USERS) -> dict[str, list[int]]:
    """{'val': [...], 'test': [...]}: the ml-100k user of each of LLaRA's MovieLens rows, in row order."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return {name: [int(u) for u in obj[name]] for name in ("val", "test")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"cannot read LLaRA's MovieLens user ids ({type(e).__name__}: {e})", path=path,
                        hint="reinstall rsllm_jax (the file ships with the package)") from e


def _plan_movielens(data_dir: pathlib.Path | None, downloads: pathlib.Path, p: _Protocol) -> _Plan:
    """LLaRA's val/test rows from `llara_ref/movielens` when it is there ("llara_released"); else the
    same rows rebuilt from u.data and the 189 user ids that ship with the package ("llara_rebuilt":
    each released row is the last window of its user, so the rebuild is exact; tested)."""
    src = readers.resolve_movielens_source(data_dir, downloads)
    ref = data_dir / "llara_ref" / "movielens" if data_dir is not None else None
    released = ref is not None and all(
        any((ref / f"{stem}{suffix}").is_file() for suffix in (".jsonl", ".df")) for stem in ("Val_data", "Test_data"))
    sources = {"ratings": src.ratings, "items": src.items}
    if released:
        sources |= {"val": readers.llara_split_path(ref, "Val_data"),
                    "test": readers.llara_split_path(ref, "Test_data")}
        eval_rows = "llara_released"
    else:
        sources["eval_users"] = LLARA_MOVIELENS_USERS
        eval_rows = "llara_rebuilt"
        logging.warning(
            "MovieLens val/test: no llara_ref/movielens under %s; rebuilding LLaRA's 94/95 rows from u.data and "
            "their user ids (%s), identical to the released rows", data_dir or "$RSLLM_DATA_DIR (unset)",
            LLARA_MOVIELENS_USERS.name)

    def build(rng: np.random.Generator) -> _Parts:
        del rng  # the user split is LLaRA's
        titles = src.read_titles()
        ratings = src.read_ratings()
        header = 1 if src.kind == "recbole" else 0
        bad = (ratings["item"] >= len(titles)).to_numpy()
        if bad.any():
            i = int(bad.argmax())
            raise DataError(f"unknown item id {ratings['item'].iloc[i] + 1} (u.item has {len(titles)})",
                            path=src.ratings, line=i + 1 + header, field="item",
                            hint="ratings and items must come from the same ml-100k copy")
        kept = ratings[ratings["rating"] >= MOVIELENS_MIN_RATING]
        sequences: dict[int, list[int]] = {}
        ratings_of: dict[int, dict[int, int]] = {}
        for user, g in kept.groupby("user", sort=True):
            order = legacy_quicksort_argsort(g["timestamp"].to_numpy())
            sequences[int(user)] = g["item"].to_numpy()[order].tolist()
            ratings_of[int(user)] = dict(zip(g["item"].tolist(), g["rating"].tolist()))
        split_records = (_movielens_released(sources, sequences, ratings_of, len(titles), p) if released
                         else _movielens_rebuilt(sources["eval_users"], sequences, p))
        eval_users = {int(r["user"]) for name in ("val", "test") for r in split_records[name]}

        train, dropped, no_window = [], 0, 0
        for user, seq in sequences.items():
            if user in eval_users:
                continue
            windows, d = sliding_windows(seq, max_history=p.max_history, min_history=p.min_history)
            dropped += d
            no_window += not windows
            train.extend(_record(str(user), h, t) for h, t in windows)
        n_train_users = len(sequences) - len(eval_users)
        how = ("val/test = LLaRA's released rows; each is the last window of exactly one ml-100k user" if released
               else "val/test = LLaRA's rows rebuilt from u.data: the last window of each of their 189 ml-100k "
                    "users (llara_movielens_users.json); no llara_ref/ was given")
        return _Parts(
            titles, train, split_records["val"], split_records["test"],
            filtered={
                f"ratings_below_{MOVIELENS_MIN_RATING}": int(len(ratings) - len(kept)),
                "users_without_kept_ratings": int(ratings["user"].nunique() - len(sequences)),
                f"train_windows_history_lt_{p.min_history}": dropped,
                "train_users_without_any_window": no_window,
            },
            notes=[
                f"ratings < {MOVIELENS_MIN_RATING} removed (LLaRA keeps positive feedback only)",
                "per-user order: numpy legacy introsort by timestamp over u.data row order "
                "(reproduces all LLaRA val/test rows; ties are an artefact of that sort)",
                how,
            ],
            info={"movielens_source": src.kind, "user_ids": "ml-100k user ids",
                  "train_users": n_train_users})

    return _Plan(sources, build, eval_rows)


def _movielens_released(sources: dict, sequences: dict[int, list[int]], ratings_of: dict[int, dict[int, int]],
                        num_items: int, p: _Protocol) -> dict[str, list[dict]]:
    """LLaRA's released rows, each matched (and checked) against the last window of one ml-100k user."""
    last = collections.defaultdict(list)
    for user, seq in sequences.items():
        if len(seq) >= 2:
            last[_last_window(seq, LLARA_MAX_HISTORY)].append(user)
    eval_users: dict[int, str] = {}
    split_records = {}
    for name in ("val", "test"):
        rows = readers.read_llara_rows(sources[name], pad_id=num_items)
        recs = []
        for row in rows:
            users = last[(tuple(row["history"]), row["target"])]
            if len(users) != 1:
                raise DataError(
                    f"row matches the last window of {len(users)} ml-100k users (expected 1)",
                    path=sources[name], line=row["line"], field="seq",
                    hint="use the ml-100k copy with u.data sha256 "
                    f"{readers.ML100K_UDATA_SHA256[:12]}...")
            user = users[0]
            got = [ratings_of[user][i] for i in row["history"] + [row["target"]]]
            if got != row["history_ratings"] + [row["target_rating"]]:
                raise DataError(f"ratings differ from u.data user {user}", path=sources[name],
                                line=row["line"], field="seq")
            if user in eval_users:
                raise DataError(f"user {user} is already in {eval_users[user]}",
                                path=sources[name], line=row["line"], field="seq")
            eval_users[user] = name
            recs.append(_official_record(str(user), row, p))
        split_records[name] = recs
    return split_records


def _movielens_rebuilt(users_path: pathlib.Path, sequences: dict[int, list[int]],
                       p: _Protocol) -> dict[str, list[dict]]:
    """LLaRA's rows without their files: the last (<= 10-item) window of each listed user."""
    users = read_llara_movielens_users(users_path)
    split_records = {}
    for name in ("val", "test"):
        recs = []
        for user in users[name]:
            seq = sequences.get(user)
            if seq is None or len(seq) < 2:
                raise DataError(f"ml-100k user {user} of LLaRA's {name} rows has {len(seq or [])} ratings >= "
                                f"{MOVIELENS_MIN_RATING} (expected a window)", path=users_path, field=name,
                                hint="use the ml-100k copy with u.data sha256 "
                                f"{readers.ML100K_UDATA_SHA256[:12]}... (or recbole==1.2.1)")
            history, target = _last_window(seq, LLARA_MAX_HISTORY)
            recs.append(_record(str(user), list(history)[-p.max_history:], target))
        split_records[name] = recs
    return split_records


def recover_lastfm_users(segments: list[list[int]], val_rows: list[dict], test_rows: list[dict],
                         titles: list[str], artists: pd.DataFrame, tags: pd.DataFrame
                         ) -> tuple[list[str], list[str], list[str]]:
    """hetrec user ids for LLaRA's LastFM train segments and val/test rows.

    LLaRA's LastFM sequence for a user = the user's tagged artists in order of first appearance
    in the hetrec tag file (sorted by artist id), restricted to the 4,606 catalogue artists.
    Titles are matched to artists.dat names (ignoring double quotes: LLaRA wrote
    '"Weird Al" Yankovic' as 'Weird Al Yankovic'). Raises ValueError unless every train segment
    equals exactly one user's sequence, every val/test row is the last window of exactly one
    user, and all those users are distinct.
    """
    def key(name: str) -> str:
        return " ".join(name.replace('"', "").split())

    by_name = collections.defaultdict(list)
    for artist, name in zip(artists["artist"].tolist(), artists["name"].tolist()):
        by_name[key(name)].append(artist)
    artist_to_item = {}
    for item, title in enumerate(titles):
        found = by_name.get(key(title), [])
        if len(found) != 1:
            raise ValueError(f"title {title!r} matches {len(found)} hetrec artists")
        artist_to_item[found[0]] = item
    sequences: dict[int, list[int]] = {}
    known = tags[tags["artist"].isin(artist_to_item.keys())]
    for user, g in known.groupby("user", sort=True):
        sequences[int(user)] = [artist_to_item[a] for a in dict.fromkeys(g["artist"].tolist())]
    by_seq = collections.defaultdict(list)
    by_last = collections.defaultdict(list)
    for user, seq in sequences.items():
        by_seq[tuple(seq)].append(user)
        if len(seq) >= 2:
            by_last[_last_window(seq, LLARA_MAX_HISTORY)].append(user)

    def unique(found: list[int], what: str) -> str:
        if len(found) != 1:
            raise ValueError(f"{what} matches {len(found)} hetrec users")
        return str(found[0])

    train_users = [unique(by_seq[tuple(s)], f"train segment {k}") for k, s in enumerate(segments)]
    val_users = [unique(by_last[(tuple(r["history"]), r["target"])], f"val line {r['line']}")
                 for r in val_rows]
    test_users = [unique(by_last[(tuple(r["history"]), r["target"])], f"test line {r['line']}")
                  for r in test_rows]
    everyone = train_users + val_users + test_users
    if len(set(everyone)) != len(everyone):
        raise ValueError("a hetrec user matches more than one segment/row")
    return train_users, val_users, test_users


def _lastfm_segments(rows: list[dict], p_max: int = LLARA_MAX_HISTORY) -> list[list[int]]:
    """Cut LLaRA's LastFM train rows into users: a user's rows start with an empty history and
    each row's history is the previous rows' targets. Returns per-user row indices; raises
    ValueError if the rows do not have that shape."""
    segments: list[list[int]] = []
    full: list[int] = []
    for k, row in enumerate(rows):
        if not row["history"]:
            segments.append([])
            full = []
        if not segments or row["history"] != full[-p_max:]:
            raise ValueError(f"train line {row['line']} does not continue its user's sequence")
        segments[-1].append(k)
        full.append(row["target"])
    return segments


def _plan_lastfm(data_dir: pathlib.Path, p: _Protocol) -> _Plan:
    ref = data_dir / "llara_ref" / "lastfm"
    het = data_dir / "hetrec2011-lastfm-2k"
    sources = {"id2name": ref / "id2name.txt",
               "train": readers.llara_split_path(ref, "train_data"),
               "val": readers.llara_split_path(ref, "Val_data"),
               "test": readers.llara_split_path(ref, "Test_data")}
    if (het / "artists.dat").is_file():
        sources["artists"] = het / "artists.dat"
        sources["tags"] = readers.find_hetrec_tag_timestamps(het)
    if not sources["id2name"].is_file():
        raise DataError("missing LastFM id2name.txt", path=sources["id2name"])

    def build(rng: np.random.Generator) -> _Parts:
        del rng  # the user split is LLaRA's
        titles = readers.read_id2name(sources["id2name"])
        rows = {name: readers.read_llara_rows(sources[name], pad_id=len(titles))
                for name in ("train", "val", "test")}
        try:
            segments = _lastfm_segments(rows["train"])
            if "artists" not in sources:
                raise ValueError(f"hetrec files not found under {het}")
            seg_users, val_users, test_users = recover_lastfm_users(
                [[rows["train"][k]["target"] for k in seg] for seg in segments], rows["val"],
                rows["test"], titles, readers.read_hetrec_artists(sources["artists"]),
                readers.read_hetrec_tag_timestamps(sources["tags"]))
            user_of_row = {k: seg_users[s] for s, seg in enumerate(segments) for k in seg}
            user_ids = "recovered hetrec2011 user ids (verified unique matches)"
        except ValueError as e:
            logging.warning("LastFM user ids could not be recovered (%s); using synthetic ids", e)
            user_of_row = {k: f"lastfm_train_row_{r['row']}" for k, r in enumerate(rows["train"])}
            val_users = [f"lastfm_val_{r['row']}" for r in rows["val"]]
            test_users = [f"lastfm_test_{r['row']}" for r in rows["test"]]
            user_ids = (f"synthetic: could not recover hetrec users ({e}); train rows are not "
                        "grouped by user and 'no val/test user in train' is unverified")
        train = [_record(user_of_row[k], r["history"][-p.max_history:], r["target"])
                 for k, r in enumerate(rows["train"]) if len(r["history"]) >= p.min_history]
        short_eval = sum(len(r["history"]) < p.min_history for n in ("val", "test") for r in rows[n])
        return _Parts(
            titles, train,
            [_official_record(u, r, p) for u, r in zip(val_users, rows["val"])],
            [_official_record(u, r, p) for u, r in zip(test_users, rows["test"])],
            filtered={f"train_rows_history_lt_{p.min_history}": len(rows["train"]) - len(train)},
            notes=["train/val/test = LLaRA's released rows",
                   "LLaRA's LastFM sequences follow hetrec file order (artist id ascending per "
                   "user), not tag time",
                   f"official val/test rows with history < {p.min_history} kept: {short_eval}"],
            info={"user_ids": user_ids, "official_eval_rows_history_lt_min": short_eval})

    return _Plan(sources, build, "llara_released")


def _plan_steam(data_dir: pathlib.Path, p: _Protocol) -> _Plan:
    ref = data_dir / "llara_ref" / "steam"
    sources = {"id2name": ref / "id2name.txt",
               "train_sample": readers.llara_split_path(ref, "train_data.sample1000"),
               "val": readers.llara_split_path(ref, "Val_data"),
               "test": readers.llara_split_path(ref, "Test_data")}
    if not sources["id2name"].is_file():
        raise DataError("missing Steam id2name.txt", path=sources["id2name"])

    def build(rng: np.random.Generator) -> _Parts:
        del rng  # the user split is LLaRA's
        titles = readers.read_id2name(sources["id2name"])
        rows = {name: readers.read_llara_rows(sources[name], pad_id=len(titles))
                for name in ("train_sample", "val", "test")}
        train, dropped = [], 0
        for r in rows["train_sample"]:
            if len(r["history"]) >= p.min_history:
                train.append(_record(f"steam_train_row_{r['row']}", r["history"][-p.max_history:],
                                     r["target"]))
            else:
                dropped += 1
        evals = {}
        history_windows = 0
        for name in ("val", "test"):
            evals[name] = []
            for r in rows[name]:
                user = f"steam_{name}_{r['row']}"
                evals[name].append(_official_record(user, r, p))
                # Histories are known at inference time; their inner windows are fair training data.
                windows, d = sliding_windows(r["history"], max_history=p.max_history,
                                             min_history=p.min_history)
                dropped += d
                history_windows += len(windows)
                train.extend(_record(user, h, t) for h, t in windows)
        short_eval = sum(len(r["history"]) < p.min_history for n in ("val", "test") for r in rows[n])
        return _Parts(
            titles, train, evals["val"], evals["test"],
            filtered={f"train_windows_history_lt_{p.min_history}": dropped},
            notes=["STEAM TRAIN IS A RECONSTRUCTION: LLaRA's full Steam train set (>= 151,038 rows) "
                   "is not available; train = the released 1,000-row random sample + every window "
                   "inside the val/test histories (their val/test targets are never used)",
                   "Steam users are unknown: ids are synthetic (steam_<split>_<LLaRA row>); "
                   "history windows carry their val/test row's id, so those users appear in train",
                   f"official val/test rows with history < {p.min_history} kept: {short_eval}"],
            info={"user_ids": "synthetic", "train_is_reconstruction": True,
                  "train_from_released_sample": len(train) - history_windows,
                  "train_from_eval_histories": history_windows,
                  "official_eval_rows_history_lt_min": short_eval})

    return _Plan(sources, build, "llara_released")


def build_generic(interactions: pd.DataFrame, items: pd.DataFrame, rng: np.random.Generator, *,
                  max_history: int, min_history: int, interactions_path: str | os.PathLike = "",
                  filtered: dict[str, int] | None = None) -> _Parts:
    """The generic protocol on string-keyed data (bring-your-own data and `lastfm_raw`).

    `interactions`: user, item, timestamp (+ optional `line` for error messages), any order.
    `items`: item, title, in the order that defines ids. Steps, each counted in `filtered`:
    1. every interacted item must have a title (else DataError naming file, line, field);
    2. each user's items are sorted by timestamp, ties kept in file order (stable sort);
    3. only a user's first interaction with an item is kept (so no target is in its history);
    4. the catalogue = items with at least one interaction, ids 0..n-1 in items-file order;
    5. users with fewer than `min_history + 1` items have no sample and are left out;
    6. the rest are shuffled with `rng` and split 8:1:1 (val/test at least one user each);
    7. train = all windows of train users, val/test = each user's last window.
    """
    filtered = dict(filtered or {})
    titles_of = dict(zip(items["item"].tolist(), items["title"].tolist()))
    unknown = ~interactions["item"].isin(titles_of.keys()).to_numpy()
    if unknown.any():
        i = int(unknown.argmax())
        line = int(interactions["line"].iloc[i]) if "line" in interactions else None
        raise DataError(f"item {interactions['item'].iloc[i]!r} has no title in the items file",
                        path=interactions_path, line=line, field="item",
                        hint="add the item to the items file (item,title) or remove the line")
    if interactions.empty:
        raise DataError("no interactions", path=interactions_path)
    ordered = interactions.sort_values(["user", "timestamp"], kind="stable")
    first = ordered.drop_duplicates(["user", "item"], keep="first")
    filtered["repeat_interactions"] = filtered.get("repeat_interactions", 0) + len(ordered) - len(first)
    used = set(first["item"].tolist())
    keys = [k for k in items["item"].tolist() if k in used]
    filtered["items_without_interactions"] = len(items) - len(keys)
    item_id = {k: i for i, k in enumerate(keys)}
    titles = [titles_of[k] for k in keys]

    sequences = {u: [item_id[k] for k in g["item"].tolist()]
                 for u, g in first.groupby("user", sort=True)}
    eligible = [u for u, s in sequences.items() if len(s) >= min_history + 1]
    filtered[f"users_with_fewer_than_{min_history + 1}_items"] = len(sequences) - len(eligible)
    n_eval = max(1, round(0.1 * len(eligible)))
    if len(eligible) < 2 * n_eval + 1:
        raise DataError(f"only {len(eligible)} users have >= {min_history + 1} items; need at "
                        "least 3 (train, val, test)", path=interactions_path, field="user",
                        hint="add data or lower min_history")
    perm = [eligible[i] for i in rng.permutation(len(eligible))]
    val_users, test_users, train_users = perm[:n_eval], perm[n_eval:2 * n_eval], perm[2 * n_eval:]
    train, dropped = [], 0
    for u in sorted(train_users):
        windows, d = sliding_windows(sequences[u], max_history=max_history, min_history=min_history)
        dropped += d
        train.extend(_record(str(u), h, t) for h, t in windows)
    filtered[f"train_windows_history_lt_{min_history}"] = dropped

    def last(users):
        return [_record(str(u), *_last_window(sequences[u], max_history)) for u in users]

    return _Parts(titles, train, last(val_users), last(test_users), filtered,
                  notes=["generic protocol: per-user stable sort by timestamp (ties in file "
                         "order), first interaction per (user, item), users split 8:1:1 with the seed"],
                  info={"user_ids": "from the interactions file",
                        "users": {"train": len(train_users), "val": len(val_users),
                                  "test": len(test_users)}})


def _plan_lastfm_raw(data_dir: pathlib.Path, p: _Protocol) -> _Plan:
    het = data_dir / "hetrec2011-lastfm-2k"
    sources = {"artists": het / "artists.dat", "tags": readers.find_hetrec_tag_timestamps(het)}

    def build(rng: np.random.Generator) -> _Parts:
        artists = readers.read_hetrec_artists(sources["artists"])
        tags = readers.read_hetrec_tag_timestamps(sources["tags"])
        known = tags["artist"].isin(set(artists["artist"].tolist())).to_numpy()
        tags = tags[known]
        # A user-artist pair happens at its first tag; later tags of the same pair are repeats.
        pairs = tags.groupby(["user", "artist"], sort=False, as_index=False)["timestamp"].min()
        inter = pd.DataFrame({"user": pairs["user"].astype(str), "item": pairs["artist"].astype(str),
                              "timestamp": pairs["timestamp"]})
        items = pd.DataFrame({"item": artists["artist"].astype(str), "title": artists["name"]})
        parts = build_generic(inter, items, rng, max_history=p.max_history,
                              min_history=p.min_history, interactions_path=sources["tags"],
                              filtered={"tag_rows_artist_not_in_artists_dat": int((~known).sum()),
                                        "repeat_interactions": len(tags) - len(pairs)})
        parts.notes.append("hetrec user-artist pairs ordered by first tag time (day resolution; "
                           "ties in artist id order); item ids follow artists.dat order")
        return parts

    return _Plan(sources, build)


def _plan_custom(interactions: str, items: str, p: _Protocol) -> _Plan:
    if not interactions or not items:
        raise DataError("dataset 'custom' needs an interactions file and an items file",
                        field="custom_interactions" if not interactions else "custom_items",
                        hint="pass --interactions=FILE --items=FILE")
    sources = {"interactions": pathlib.Path(interactions), "items": pathlib.Path(items)}
    for name, path in sources.items():
        if not path.is_file():
            raise DataError(f"missing {name} file", path=path, hint="check the path")

    def build(rng: np.random.Generator) -> _Parts:
        return build_generic(readers.read_custom_interactions(sources["interactions"]),
                             readers.read_custom_items(sources["items"]), rng,
                             max_history=p.max_history, min_history=p.min_history,
                             interactions_path=sources["interactions"])

    return _Plan(sources, build)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def resolve_data_dir(data_dir: str | os.PathLike | None) -> pathlib.Path | None:
    """Explicit argument, else $RSLLM_DATA_DIR, else None."""
    d = data_dir or os.environ.get("RSLLM_DATA_DIR")
    return pathlib.Path(d) if d else None


def _validate(parts: _Parts, sources: dict[str, pathlib.Path]) -> None:
    """Every id must have a non-empty title; an empty split is an error."""
    n = len(parts.titles)
    for i, title in enumerate(parts.titles):
        if not title:
            raise DataError(f"item {i} has no title", field="title")
    for name in ("train", "val", "test"):
        recs = getattr(parts, name)
        if not recs:
            raise DataError(f"the {name} split is empty", path=sources.get(name),
                            hint="check the input files / protocol parameters")
        for rec in recs:
            for field in ("history", "target"):
                ids = rec[field] if field == "history" else [rec[field]]
                if any(not 0 <= i < n for i in ids):
                    raise DataError(f"item id outside 0..{n - 1} for user {rec['user']}",
                                    path=sources.get(name), field=field)


def load_split(dataset: str, *, data_dir: str | None = None, cache_dir: str | None = None,
               seed: int = 0, custom_interactions: str = "", custom_items: str = "",
               num_candidates: int = 20, max_history: int = 10, min_history: int = 3) -> SplitData:
    """Build (or load from the cache) one dataset's split. See the module docstring.

    `seed` drives the user split of generic datasets and the frozen val/test candidates.
    `data_dir` defaults to $RSLLM_DATA_DIR; `cache_dir` to `cache.default_cache_dir()`.
    """
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}", field="dataset", hint=f"use one of {DATASETS}")
    if not 1 <= min_history <= max_history:
        raise ValueError(f"need 1 <= min_history <= max_history, got {min_history}, {max_history}")
    root = pathlib.Path(cache_dir) if cache_dir else cache_lib.default_cache_dir()
    data_root = resolve_data_dir(data_dir)
    p = _Protocol(max_history=max_history, min_history=min_history)
    if dataset == "custom":
        plan = _plan_custom(custom_interactions, custom_items, p)
    elif dataset == "movielens":
        plan = _plan_movielens(data_root, root / "_downloads", p)
    else:
        if data_root is None or not data_root.is_dir():
            raise DataError(f"dataset {dataset!r} needs files that no package ships: {NEEDS_DATA[dataset]}",
                            path=data_root, field="data_dir",
                            hint="put them under one directory and pass --config.data.data_dir=DIR or set "
                                 "$RSLLM_DATA_DIR=DIR (movielens and custom run without it)")
        plan = {"lastfm": _plan_lastfm, "lastfm_raw": _plan_lastfm_raw,
                "steam": _plan_steam}[dataset](data_root, p)
    for name, path in plan.sources.items():
        if not path.is_file():
            raise DataError(f"missing source file ({name})", path=path,
                            hint="check --data_dir / $RSLLM_DATA_DIR")
    sources = {name: {"path": str(path), "sha256": readers.sha256_file(path)}
               for name, path in plan.sources.items()}
    fingerprint = {"protocol_version": PROTOCOL_VERSION, "dataset": dataset, "seed": seed,
                   "num_candidates": num_candidates, "max_history": max_history,
                   "min_history": min_history,
                   "sources": {k: v["sha256"] for k, v in sources.items()}}
    path = cache_lib.cache_path(root, dataset, fingerprint)
    cached = cache_lib.load_cached(path, fingerprint)
    if cached is not None:
        logging.info("split %s: reusing cache %s", dataset, path)
        split = SplitData(dataset, *cached)
        split.manifest.setdefault("eval_rows", plan.eval_rows)
        return split

    logging.info("split %s: building into %s", dataset, path)
    split_rng, candidate_rng = (np.random.default_rng(s)
                                for s in np.random.SeedSequence(seed).spawn(2))
    parts = plan.build(split_rng)
    _validate(parts, plan.sources)
    for name in ("val", "test"):
        for rec in getattr(parts, name):
            try:
                rec["candidates"] = sample_candidates(candidate_rng, rec["history"], rec["target"],
                                                      len(parts.titles), num_candidates)
            except ValueError as e:  # a catalogue too small for num_candidates outside a history
                items_file = plan.sources.get("items") or plan.sources.get("id2name") or next(iter(plan.sources.values()))
                raise DataError(
                    f"{name} row of user {rec.get('user')!r}: {e}", path=items_file, field="num_candidates",
                    hint=f"the catalogue has {len(parts.titles)} items: lower config.data.num_candidates "
                         f"(now {num_candidates}) or config.data.max_history (now {max_history}), or add items"
                ) from None
    manifest = {
        "dataset": dataset, "seed": seed, "fingerprint": fingerprint, "sources": sources,
        "protocol": {"version": PROTOCOL_VERSION, "max_history": max_history,
                     "min_history": min_history, "num_candidates": num_candidates,
                     "candidates": "val/test drawn once: target + uniform negatives outside "
                                   "history/target, shuffled; train candidates are redrawn by the pipeline"},
        "counts": {"items": len(parts.titles), "train": len(parts.train), "val": len(parts.val),
                   "test": len(parts.test),
                   "train_users": len({r["user"] for r in parts.train})},
        "filtered": parts.filtered, "notes": parts.notes, "eval_rows": plan.eval_rows, **parts.info,
    }
    cache_lib.save_cached(path, parts.titles, parts.train, parts.val, parts.test, manifest)
    return SplitData(dataset, parts.titles, parts.train, parts.val, parts.test, manifest)


def load_split_from_config(data_cfg, dataset: str | None = None) -> SplitData:
    """`load_split` with the fields of a run config's `data` block (every stage loads data this way)."""
    d = data_cfg
    return load_split(
        dataset or d.dataset, data_dir=d.data_dir or None, cache_dir=d.cache_dir or None, seed=d.split_seed,
        custom_interactions=d.custom_interactions, custom_items=d.custom_items,
        num_candidates=d.num_candidates, max_history=d.max_history, min_history=d.min_history,
    )
