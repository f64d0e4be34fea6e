"""Readers for every input format the data layer understands.

Each reader takes a path and returns plain Python / pandas objects; none of them caches, samples
or splits. Every malformed input raises `DataError` naming the file, line and field.

Item-id conventions (shared with LLaRA's released splits, so ids mean the same thing everywhere):
- MovieLens-100K: item id = u.item movieID - 1 (0-based). LLaRA pads with 1682 (= number of items).
- LastFM / Steam (LLaRA): the ids of `id2name.txt`, 0..n-1; padding id = n (4606 / 3581).
- Bring-your-own data: see `read_custom_items` for how string item keys become dense ids.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Sequence

import numpy as np
import pandas as pd
from absl import logging

from rsllm_jax.data.errors import DataError, missing_file

PathLike = str | os.PathLike

GROUPLENS_ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
ML100K_UDATA_SHA256 = "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490"
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBERS = {
    "ml-100k.inter": "recbole/dataset_example/ml-100k/ml-100k.inter",
    "ml-100k.item": "recbole/dataset_example/ml-100k/ml-100k.item",
}


def sha256_file(path: PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Shared parsing helpers
# ----------------------------------------------------------------------------------------------

def _read_text(path: PathLike, what: str, encoding: str = "utf-8") -> str:
    """Whole-file decode, so a bad byte is reported with its exact line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise missing_file(path, what)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"not a valid gzip file ({e})", path=path,
                            hint="re-download the file; it is truncated or not gzip") from e
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"byte 0x{raw[e.start]:02x} is not valid {encoding}", path=path, line=line,
                        hint=f"save the file as {encoding} (wrong encoding?)") from e
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError("NUL character in a text file", path=path, line=line,
                        hint=f"the file is binary or not {encoding} (UTF-16?); re-save it as {encoding}")
    return text


def _parse_table(path: PathLike, text: str, *, sep: str, columns: Sequence[str],
                 header: bool, quoting: int = csv.QUOTE_NONE) -> tuple[pd.DataFrame, np.ndarray]:
    """Parse delimited text into string columns and the 1-based source line of every row.

    With `header`, the first line must name every column in `columns` (extra columns are ignored);
    without it, the first `len(columns)` fields are taken positionally.
    """
    if not text.strip():
        raise DataError("file is empty", path=path, hint="provide a file with at least one data row")
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, header=0 if header else None, dtype=str,
                         keep_default_na=False, quoting=quoting, skip_blank_lines=False,
                         engine="c")
    except pd.errors.ParserError as e:
        m = re.search(r"line (\d+)", str(e))
        raise DataError(f"malformed line ({e})", path=path, line=int(m.group(1)) if m else None,
                        hint=f"every line needs the same number of {sep!r}-separated fields") from e
    first_data_line = 2 if header else 1
    lines = np.arange(len(df)) + first_data_line
    if header:
        missing = [c for c in columns if c not in df.columns]
        if missing:
            raise DataError(f"header has no column {missing[0]!r} (found {list(df.columns)})",
                            path=path, line=1, field=missing[0],
                            hint=f"the first line must name the columns {list(columns)}")
        df = df[list(columns)]
    else:
        if df.shape[1] < len(columns):
            raise DataError(f"expected {len(columns)} fields, found {df.shape[1]}", path=path, line=1,
                            field=columns[df.shape[1]],
                            hint=f"each line needs fields {list(columns)} separated by {sep!r}")
        df = df.iloc[:, :len(columns)]
        df.columns = list(columns)
    # Blank lines are not data; drop them but keep the line numbers of the rest right.
    blank = df.isna().all(axis=1).to_numpy() | (df.fillna("") == "").all(axis=1).to_numpy()
    df, lines = df[~blank].reset_index(drop=True), lines[~blank]
    if df.empty:
        raise DataError("no data rows", path=path, hint="the file has a header but no data")
    for col in columns:
        bad = df[col].isna().to_numpy() | (df[col].str.strip() == "").to_numpy()
        if bad.any():
            raise DataError("missing value (too few fields on this line?)", path=path,
                            line=int(lines[bad.argmax()]), field=col,
                            hint=f"each line needs fields {list(columns)} separated by {sep!r}")
    return df, lines


def _to_int(df: pd.DataFrame, col: str, lines: np.ndarray, path: PathLike) -> np.ndarray:
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    bad = values.isna().to_numpy() | (values.to_numpy() != np.round(values.to_numpy()))
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"expected an integer, found {df[col].iloc[i]!r}", path=path,
                        line=int(lines[i]), field=col, hint="fix or remove this line")
    return values.to_numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------
# MovieLens-100K (GroupLens raw files and the RecBole copy)
# ----------------------------------------------------------------------------------------------

_YEAR = re.compile(r"\s*\(\d{4}(?:/[IVX]+)?\)\s*$")
_TRAILING_ARTICLE = re.compile(r"^(?P<body>.*),\s+(?P<article>The|A|An)$")


def clean_movielens_title(raw: str) -> str:
    """'Shawshank Redemption, The (1994)' -> 'The Shawshank Redemption' (LLaRA's title form).

    Drops a trailing release year and moves a trailing ", The" / ", A" / ", An" to the front.
    Titles without a year (the RecBole copy) only get the article move.
    """
    title = _YEAR.sub("", raw.strip())
    m = _TRAILING_ARTICLE.match(title)
    if m:
        title = f"{m.group('article')} {m.group('body')}"
    return " ".join(title.split())


def read_movielens_ratings(path: PathLike) -> pd.DataFrame:
    """u.data: `user<TAB>item<TAB>rating<TAB>timestamp`, no header.

    Returns columns user, item (0-based = movieID - 1), rating, timestamp (all int64) in file
    order; the file order matters because LLaRA's tie order depends on it.
    """
    text = _read_text(path, "MovieLens ratings file (u.data)")
    cols = ("user", "item", "rating", "timestamp")
    df, lines = _parse_table(path, text, sep="\t", columns=cols, header=False)
    out = pd.DataFrame({c: _to_int(df, c, lines, path) for c in cols})
    out["item"] -= 1
    bad = (out["item"] < 0).to_numpy()
    if bad.any():
        raise DataError("movie id must be >= 1", path=path, line=int(lines[bad.argmax()]), field="item")
    return out


def read_movielens_items(path: PathLike, encoding: str = "latin-1") -> list[str]:
    """u.item (latin-1, `|`-separated): cleaned titles indexed by 0-based item id.

    Ids must be 1..n in file order, so the list index is the item id used everywhere.
    """
    text = _read_text(path, "MovieLens items file (u.item)", encoding=encoding)
    titles: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 2:
            raise DataError("expected `movieID|title|...`", path=path, line=lineno, field="title",
                            hint="u.item lines are '|'-separated")
        try:
            movie_id = int(fields[0])
        except ValueError:
            raise DataError(f"movie id {fields[0]!r} is not an integer", path=path, line=lineno,
                            field="movieID") from None
        if movie_id != len(titles) + 1:
            raise DataError(f"movie id {movie_id} out of order (expected {len(titles) + 1})",
                            path=path, line=lineno, field="movieID",
                            hint="u.item must list movies 1..n in order; use the original file")
        title = clean_movielens_title(fields[1])
        if not title:
            raise DataError("empty title", path=path, line=lineno, field="title")
        titles.append(title)
    if not titles:
        raise DataError("no items", path=path, hint="u.item is empty")
    return titles


def read_recbole_ratings(path: PathLike) -> pd.DataFrame:
    """RecBole `ml-100k.inter` (typed header `user_id:token ...`): same frame as `read_movielens_ratings`."""
    text = _read_text(path, "RecBole ml-100k.inter")
    cols = ("user_id:token", "item_id:token", "rating:float", "timestamp:float")
    df, lines = _parse_table(path, text, sep="\t", columns=cols, header=True)
    out = pd.DataFrame({new: _to_int(df, old, lines, path)
                        for new, old in zip(("user", "item", "rating", "timestamp"), cols)})
    out["item"] -= 1
    return out


# Where RecBole's ml-100k.item (UTF-8, years removed) differs from u.item after title cleaning:
# movieID -> u.item's cleaned title. With these the two copies give identical titles (tested).
RECBOLE_TITLE_FIXES = {
    267: "unknown",  # RecBole: "unkonwn"
    1412: "Land Before Time III: The Time of the Great Giving (1995) (V)",  # RecBole dropped "(1995) (V)"
}


def read_recbole_items(path: PathLike) -> list[str]:
    """RecBole `ml-100k.item`: cleaned titles indexed by 0-based item id, equal to u.item's."""
    text = _read_text(path, "RecBole ml-100k.item", encoding="utf-8")
    cols = ("item_id:token", "movie_title:token_seq")
    df, lines = _parse_table(path, text, sep="\t", columns=cols, header=True)
    ids = _to_int(df, cols[0], lines, path)
    order = np.argsort(ids, kind="stable")
    if not np.array_equal(ids[order], np.arange(1, len(ids) + 1)):
        raise DataError("item ids are not exactly 1..n", path=path, field=cols[0],
                        hint="use the file shipped in recbole==1.2.1")
    # order[k] is the row of movieID k + 1
    return [RECBOLE_TITLE_FIXES.get(k + 1) or clean_movielens_title(df[cols[1]].iloc[i])
            for k, i in enumerate(order)]


def fetch_grouplens_ml100k(cache_dir: PathLike, timeout: float = 5.0) -> pathlib.Path:
    """Download ml-100k.zip from GroupLens into `cache_dir/grouplens-ml-100k/` (u.data, u.item).

    Verifies the u.data sha256 against the published one. Reuses an existing verified copy.
    Raises OSError when offline (callers fall back to RecBole).
    """
    dest = pathlib.Path(cache_dir) / "grouplens-ml-100k"
    if (dest / "u.item").is_file() and (dest / "u.data").is_file() \
            and sha256_file(dest / "u.data") == ML100K_UDATA_SHA256:
        return dest
    with urllib.request.urlopen(GROUPLENS_ML100K_URL, timeout=timeout) as resp:
        payload = resp.read()
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        files = {name: z.read(f"ml-100k/{name}") for name in ("u.data", "u.item")}
    if hashlib.sha256(files["u.data"]).hexdigest() != ML100K_UDATA_SHA256:
        raise DataError("downloaded u.data has the wrong sha256", path=GROUPLENS_ML100K_URL,
                        field="u.data", hint=f"expected {ML100K_UDATA_SHA256}; the mirror is altered")
    _atomic_write_dir(dest, files)
    return dest


def fetch_recbole_ml100k(cache_dir: PathLike) -> pathlib.Path:
    """Fetch RecBole's ml-100k copy from PyPI into `cache_dir/recbole-1.2.1/` and return that dir.

    Runs `pip download --no-deps recbole==1.2.1`, checks the wheel sha256 and extracts only
    `ml-100k.inter` and `ml-100k.item`. A previous extraction is reused without network access.
    """
    dest = pathlib.Path(cache_dir) / "recbole-1.2.1"
    if all((dest / name).is_file() for name in RECBOLE_MEMBERS):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               RECBOLE_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        wheels = list(pathlib.Path(tmp).glob("recbole-1.2.1-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"`{' '.join(cmd[1:])}` failed: {proc.stderr.strip()[-500:]}",
                            path=RECBOLE_REQUIREMENT,
                            hint="check PyPI access, or put ml-100k/ under --data_dir")
        if sha256_file(wheels[0]) != RECBOLE_WHEEL_SHA256:
            raise DataError("recbole wheel has an unexpected sha256", path=wheels[0],
                            hint=f"expected {RECBOLE_WHEEL_SHA256}")
        with zipfile.ZipFile(wheels[0]) as z:
            files = {name: z.read(member) for name, member in RECBOLE_MEMBERS.items()}
    _atomic_write_dir(dest, files)
    return dest


def _atomic_write_dir(dest: pathlib.Path, files: dict[str, bytes]) -> None:
    """Write files into a sibling temp dir and rename it into place, so readers never see half a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    try:
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not dest.exists():
            raise


@dataclasses.dataclass(frozen=True)
class MovieLensSource:
    kind: str  # local | grouplens | recbole
    ratings: pathlib.Path
    items: pathlib.Path

    def read_ratings(self) -> pd.DataFrame:
        return read_recbole_ratings(self.ratings) if self.kind == "recbole" \
            else read_movielens_ratings(self.ratings)

    def read_titles(self) -> list[str]:
        return read_recbole_items(self.items) if self.kind == "recbole" \
            else read_movielens_items(self.items)


def resolve_movielens_source(data_dir: PathLike | None, cache_dir: PathLike,
                             timeout: float = 5.0) -> MovieLensSource:
    """Local `data_dir/ml-100k/`, else GroupLens (sha256-checked), else RecBole from PyPI.

    The RecBole copy has u.data's rows exactly (same order) but titles without years, which the
    title cleaning removes anyway.
    """
    if data_dir is not None:
        local = pathlib.Path(data_dir) / "ml-100k"
        if (local / "u.data").is_file():
            logging.info("MovieLens-100K source: local copy %s", local)
            return MovieLensSource("local", local / "u.data", local / "u.item")
    try:
        d = fetch_grouplens_ml100k(cache_dir, timeout=timeout)
        logging.info("MovieLens-100K source: GroupLens download (%s)", d)
        return MovieLensSource("grouplens", d / "u.data", d / "u.item")
    except (OSError, zipfile.BadZipFile, KeyError, DataError) as e:
        logging.warning("GroupLens ml-100k unavailable (%s); falling back to PyPI recbole", e)
    d = fetch_recbole_ml100k(cache_dir)
    logging.info("MovieLens-100K source: PyPI %s (%s)", RECBOLE_REQUIREMENT, d)
    return MovieLensSource("recbole", d / "ml-100k.inter", d / "ml-100k.item")


# ----------------------------------------------------------------------------------------------
# hetrec2011-lastfm-2k
# ----------------------------------------------------------------------------------------------

def read_hetrec_artists(path: PathLike) -> pd.DataFrame:
    """artists.dat: columns artist (int), name (str), in file order."""
    text = _read_text(path, "hetrec artists file (artists.dat)")
    df, lines = _parse_table(path, text, sep="\t", columns=("id", "name"), header=True)
    return pd.DataFrame({"artist": _to_int(df, "id", lines, path), "name": df["name"].to_numpy()})


def read_hetrec_user_artists(path: PathLike) -> pd.DataFrame:
    """user_artists.dat: columns user, artist, weight (listening counts; no time information)."""
    text = _read_text(path, "hetrec user_artists.dat")
    cols = ("userID", "artistID", "weight")
    df, lines = _parse_table(path, text, sep="\t", columns=cols, header=True)
    return pd.DataFrame({new: _to_int(df, old, lines, path)
                         for new, old in zip(("user", "artist", "weight"), cols)})


def find_hetrec_tag_timestamps(directory: PathLike) -> pathlib.Path:
    """The tag-timestamp file: the original name if present, else a `...timestamps*.dat` variant.

    The shared copy is `user_taggedartists-timestamps.RECONSTRUCTED.dat` (dates exact, times of
    day only for 3,531 May-2011 rows lost; see PROVENANCE.md).
    """
    directory = pathlib.Path(directory)
    exact = directory / "user_taggedartists-timestamps.dat"
    if exact.is_file():
        return exact
    found = sorted(directory.glob("user_taggedartists-timestamps*.dat"))
    if not found:
        raise missing_file(exact, "hetrec tag timestamps (user_taggedartists-timestamps*.dat)")
    logging.info("hetrec tag timestamps: using %s", found[0].name)
    return found[0]


def read_hetrec_tag_timestamps(path: PathLike) -> pd.DataFrame:
    """user_taggedartists-timestamps: columns user, artist, tag, timestamp (ms), in file order."""
    text = _read_text(path, "hetrec tag timestamps")
    cols = ("userID", "artistID", "tagID", "timestamp")
    df, lines = _parse_table(path, text, sep="\t", columns=cols, header=True)
    return pd.DataFrame({new: _to_int(df, old, lines, path)
                         for new, old in zip(("user", "artist", "tag", "timestamp"), cols)})


# ----------------------------------------------------------------------------------------------
# LLaRA released splits and id2name
# ----------------------------------------------------------------------------------------------

def read_id2name(path: PathLike) -> list[str]:
    """`id::name` per line, ids exactly 0..n-1 in order; returns names indexed by id."""
    text = _read_text(path, "id2name.txt")
    names: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        item, sep, name = line.partition("::")
        if not sep:
            raise DataError("expected `id::name`", path=path, line=lineno, field="name")
        try:
            item_id = int(item)
        except ValueError:
            raise DataError(f"id {item!r} is not an integer", path=path, line=lineno, field="id") from None
        if item_id != len(names):
            raise DataError(f"id {item_id} out of order (expected {len(names)})", path=path,
                            line=lineno, field="id", hint="ids must be 0..n-1, one per line, in order")
        name = " ".join(name.split())
        if not name:
            raise DataError(f"item {item_id} has an empty name", path=path, line=lineno, field="name")
        names.append(name)
    if not names:
        raise DataError("no items", path=path, hint="id2name.txt is empty")
    return names


def llara_split_path(directory: PathLike, stem: str) -> pathlib.Path:
    """`<stem>.jsonl` (lossless, no pickle) if present, else LLaRA's original `<stem>.df` pickle."""
    directory = pathlib.Path(directory)
    for suffix in (".jsonl", ".df"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    raise missing_file(directory / f"{stem}.jsonl", f"LLaRA split {stem} (.jsonl or .df)")


# What a pickled pandas DataFrame of plain columns needs, and nothing else: LLaRA ships its splits as
# `DataFrame.to_pickle` files, and an unrestricted unpickler would run any callable a hostile file names.
_FRAME_GLOBALS = frozenset({
    ("builtins", "slice"), ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("pandas._libs.internals", "_unpickle_block"), ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas.core.internals.managers", "BlockManager"),
    # pandas >= 3 pickles: public names, and its string columns
    ("pandas", "DataFrame"), ("pandas", "Index"), ("pandas", "RangeIndex"), ("pandas", "StringDtype"),
    ("pandas.arrays", "StringArray"), ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
})


def read_frame_pickle(path: PathLike) -> pd.DataFrame:
    """A `DataFrame.to_pickle` file, unpickled with only the globals a plain DataFrame needs (no code)."""
    import pickle

    class FrameUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _FRAME_GLOBALS:
                raise DataError(f"refusing to unpickle {module}.{name}: not part of a plain pandas DataFrame",
                                path=path, hint="a .df split may only hold a DataFrame; use the .jsonl copy")
            return super().find_class(module.replace("numpy.core.", "numpy._core."), name)

    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head[:1] != b"\x80":
            raise DataError("not a pickle file", path=path, hint="expected DataFrame.to_pickle output or a .jsonl split")
        df = FrameUnpickler(f).load()
    if not isinstance(df, pd.DataFrame):
        raise DataError(f"the pickle holds a {type(df).__name__}, not a DataFrame", path=path)
    return df


def read_llara_rows(path: PathLike, pad_id: int) -> list[dict]:
    """LLaRA rows (`seq` = left-aligned ids padded with `pad_id`, `len_seq`, `next`).

    Returns one dict per row: `row` (LLaRA's index), `line` (1-based line, or row for .df),
    `history` (ids, oldest first), `target`, and for MovieLens' (item, rating) pairs also
    `history_ratings` / `target_rating`.

    LLaRA writes len_seq = 1 for an empty history (every LastFM user's first row, one Steam test
    row); that quirk is accepted, any other len_seq mismatch is an error.
    """
    path = pathlib.Path(path)
    if path.suffix == ".jsonl":
        raw_rows, kind = [], "line"
        for lineno, line in enumerate(_read_text(path, "LLaRA split").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"invalid JSON ({e.msg})", path=path, line=lineno) from None
            if not isinstance(obj, dict):
                raise DataError("expected a JSON object", path=path, line=lineno)
            raw_rows.append((lineno, obj.get("row_index", len(raw_rows)), obj))
    else:
        if not path.is_file():
            raise missing_file(path, "LLaRA split")
        try:
            df = read_frame_pickle(path)
        except DataError:
            raise
        except Exception as e:  # a corrupt pickle can raise nearly anything
            raise DataError(f"cannot unpickle ({type(e).__name__}: {e})", path=path,
                            hint="use the .jsonl copy instead") from e
        kind = "row"
        raw_rows = [(pos + 1, int(idx), rec) for pos, (idx, rec)
                    in enumerate(zip(df.index, df.to_dict("records")))]
    rows = [_normalize_llara_row(obj, path, lineno, row, pad_id, kind) for lineno, row, obj in raw_rows]
    if not rows:
        raise DataError("no rows", path=path, hint="the split file is empty")
    return rows


def _normalize_llara_row(obj: dict, path, lineno: int, row: int, pad_id: int, kind: str) -> dict:
    def err(problem, field, hint=""):
        return DataError(problem, path=path, line=lineno, field=field, hint=hint, line_kind=kind)

    for key in ("seq", "len_seq", "next"):
        if key not in obj:
            raise err("missing key", key, "LLaRA rows need seq, len_seq and next")

    def split_entry(entry, field):
        # MovieLens entries are (item, rating); LastFM/Steam entries are bare ids.
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            item, rating = entry
        else:
            item, rating = entry, None
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer)):
            raise err(f"item id {item!r} is not an integer", field)
        if not 0 <= int(item) <= pad_id:
            raise err(f"unknown item id {int(item)} (catalogue has {pad_id} items, padding id {pad_id})",
                      field, "the split does not belong to this item catalogue")
        return int(item), rating

    seq = [split_entry(e, "seq") for e in list(obj["seq"])]
    items = [i for i, _ in seq]
    k = items.index(pad_id) if pad_id in items else len(items)
    if any(i != pad_id for i in items[k:]):
        raise err("padding id before a real item (seq must be left-aligned)", "seq")
    len_seq = int(obj["len_seq"])
    if len_seq != k and not (k == 0 and len_seq == 1):
        raise err(f"len_seq={len_seq} but seq holds {k} items", "len_seq")
    target, target_rating = split_entry(obj["next"], "next")
    if target == pad_id:
        raise err(f"target is the padding id {pad_id}", "next")
    out = {"row": int(row), "line": lineno, "history": items[:k], "target": target}
    if target_rating is not None:
        out["history_ratings"] = [r for _, r in seq[:k]]
        out["target_rating"] = target_rating
    return out


# ----------------------------------------------------------------------------------------------
# Steam (UCSD / McAuley)
# ----------------------------------------------------------------------------------------------

def read_steam_games(path: PathLike) -> list[dict]:
    """steam_games.json.gz: one Python-literal dict per line (single quotes, so not JSON)."""
    games = []
    for lineno, line in enumerate(_read_text(path, "steam_games.json.gz").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            game = ast.literal_eval(line)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"not a Python literal ({type(e).__name__})", path=path, line=lineno,
                            hint="each line must be one dict literal") from None
        if not isinstance(game, dict):
            raise DataError("expected a dict", path=path, line=lineno)
        games.append(game)
    if not games:
        raise DataError("no games", path=path)
    return games


# ----------------------------------------------------------------------------------------------
# Bring-your-own data
# ----------------------------------------------------------------------------------------------

def _sniff_delimiter(path: PathLike, text: str) -> str:
    """Tab or comma, decided from the header line (csv.Sniffer restricted to those two)."""
    header = text.split("\n", 1)[0]
    try:
        return csv.Sniffer().sniff(header, delimiters=",\t").delimiter
    except csv.Error:
        raise DataError("cannot tell the delimiter from the header line", path=path, line=1,
                        hint="use a header like `user,item,timestamp` (CSV) or tab-separated (TSV)") from None


def _parse_timestamps(df: pd.DataFrame, lines: np.ndarray, path: PathLike) -> np.ndarray:
    """Numbers (any epoch unit) or ISO-8601 datetimes; returned as float64 for ordering only."""
    raw = df["timestamp"].str.strip()
    numeric = pd.to_numeric(raw, errors="coerce")
    # The first row decides the kind, so the error points at the first line that disagrees.
    if pd.notna(numeric.iloc[0]):
        parsed, bad = numeric, numeric.isna().to_numpy()
    else:
        parsed = pd.to_datetime(raw, errors="coerce", format="ISO8601", utc=True)
        bad = parsed.isna().to_numpy()
    if bad.any():
        i = int(bad.argmax())
        raise DataError(f"cannot read {raw.iloc[i]!r} as a timestamp", path=path, line=int(lines[i]),
                        field="timestamp", hint="use a number (e.g. Unix seconds) or ISO-8601 "
                        "datetimes, the same kind on every line")
    if parsed.dtype.kind in "if":
        return parsed.to_numpy(np.float64)
    return (parsed - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy(np.float64)


def read_custom_interactions(path: PathLike) -> pd.DataFrame:
    """CSV or TSV with a header naming `user`, `item`, `timestamp` (other columns ignored).

    Returns columns user (str), item (str), timestamp (float64), line (int) in file order.
    """
    text = _read_text(path, "interactions file")
    sep = _sniff_delimiter(path, text)
    df, lines = _parse_table(path, text, sep=sep, columns=("user", "item", "timestamp"),
                             header=True, quoting=csv.QUOTE_MINIMAL)
    return pd.DataFrame({"user": df["user"].str.strip().to_numpy(),
                         "item": df["item"].str.strip().to_numpy(),
                         "timestamp": _parse_timestamps(df, lines, path), "line": lines})


def read_custom_items(path: PathLike) -> pd.DataFrame:
    """CSV or TSV with a header naming `item`, `title`. Returns item (str), title (str), line.

    Item keys are arbitrary strings; their dense ids are assigned by the split builder in this
    file's row order (first row -> 0). A key listed twice is an error.
    """
    text = _read_text(path, "items file")
    sep = _sniff_delimiter(path, text)
    df, lines = _parse_table(path, text, sep=sep, columns=("item", "title"), header=True,
                             quoting=csv.QUOTE_MINIMAL)
    keys = df["item"].str.strip()
    dup = keys.duplicated().to_numpy()
    if dup.any():
        i = int(dup.argmax())
        raise DataError(f"item {keys.iloc[i]!r} is listed twice", path=path, line=int(lines[i]),
                        field="item", hint="give every item exactly one line")
    titles = df["title"].map(lambda t: " ".join(t.split()))
    return pd.DataFrame({"item": keys.to_numpy(), "title": titles.to_numpy(), "line": lines})
