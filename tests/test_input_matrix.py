"""The malformed-input matrix for a user's own data (dataset=custom): every case either stops with a
DataError naming the file, line and field, or loads to a documented result (docs/reliability.md)."""
import pytest

from rsllm_jax.data import splits
from rsllm_jax.data.errors import DataError

N_ITEMS = 40


def _inter(n_users=8, length=8, items=N_ITEMS):
    return "user,item,timestamp\n" + "".join(f"u{u},i{(3 * u + t) % items},{100 + t}\n"
                                              for u in range(n_users) for t in range(length))


def _items(**changed):
    titles = {f"i{i}": f"Item {i}" for i in range(N_ITEMS)}
    titles.update(changed)
    return "item,title\n" + "".join(f"{k},{v}\n" for k, v in titles.items())


def _load(tmp_path, inter=None, items=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    pi, pt = tmp_path / "inter.csv", tmp_path / "items.csv"
    for p, v, default in ((pi, inter, _inter()), (pt, items, _items())):
        p.write_bytes(v if isinstance(v, bytes) else (default if v is None else v).encode())
    return splits.load_split("custom", custom_interactions=str(pi), custom_items=str(pt),
                             cache_dir=str(tmp_path / "cache")), pi, pt


GOOD = _inter()
ERRORS = {  # case -> (interactions, items, which file, line, field, words in the message)
    "header missing": ("\n".join(GOOD.splitlines()[1:]) + "\n", None, "inter", 1, "user", "header has no column"),
    "header renamed": (GOOD.replace("timestamp", "time", 1), None, "inter", 1, "timestamp", "header has no column"),
    "empty file": ("", None, "inter", 1, None, "cannot tell the delimiter"),
    "header only": ("user,item,timestamp\n", None, "inter", None, None, "no data rows"),
    "non-numeric timestamp": (GOOD.replace(",101\n", ",abc\n", 1), None, "inter", 3, "timestamp", "as a timestamp"),
    "unknown item id": (GOOD + "u1,zzz,200\n", None, "inter", 66, "item", "no title in the items file"),
    "item without a title": (None, _items(i3=""), "items", 5, "title", "missing value"),
    "binary interactions": (bytes(range(256)) * 20, None, "inter", 2, None, "not valid utf-8"),
    "binary items (NUL bytes)": (None, b"\x00\x01PK\x03\x04" * 100, "items", 1, None, "NUL character"),
    "latin-1 items file": (None, _items(i3="Caf\xe9").encode("latin-1"), "items", 5, None, "not valid utf-8"),
    "item listed twice": (None, _items() + "i3,Again\n", "items", N_ITEMS + 2, "item", "listed twice"),
    "catalogue too small for 20 candidates": (_inter(items=12), None, "items", None, "num_candidates",
                                              "cannot draw 19 negatives"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_stops_naming_file_line_and_field(tmp_path, case):
    inter, items, which, line, field, words = ERRORS[case]
    with pytest.raises(DataError) as e:
        _load(tmp_path, inter, items)
    path = tmp_path / ("inter.csv" if which == "inter" else "items.csv")
    assert e.value.path == str(path) and e.value.line == line and e.value.field == field, str(e.value)
    assert words in str(e.value) and str(path) in str(e.value)


def _same_split(a, b):
    return (a.train, a.val, a.test, a.titles) == (b.train, b.val, b.test, b.titles)


def test_documented_results(tmp_path):
    base, _, _ = _load(tmp_path / "base")
    # CRLF line endings and a UTF-8 byte-order mark: the same split.
    crlf, _, _ = _load(tmp_path / "crlf", GOOD.replace("\n", "\r\n").encode(), _items().replace("\n", "\r\n").encode())
    bom, _, _ = _load(tmp_path / "bom", b"\xef\xbb\xbf" + GOOD.encode(), b"\xef\xbb\xbf" + _items().encode())
    assert _same_split(crlf, base) and _same_split(bom, base)
    # Duplicated rows: a user's repeat of an item keeps its first interaction (counted in the manifest).
    lines = GOOD.splitlines()
    dup, _, _ = _load(tmp_path / "dup", "\n".join(lines + lines[1:5]) + "\n")
    assert _same_split(dup, base) and dup.manifest["filtered"]["repeat_interactions"] == 4
    # Negative timestamps (before 1970) are times like any other: the same order, the same split.
    neg, _, _ = _load(tmp_path / "neg", GOOD.replace(",10", ",-10").replace(",-10", ",-20"))
    assert neg.num_items == base.num_items and len(neg.train) == len(base.train)
    # Titles: whitespace (tabs, newlines in quoted fields) collapses to single spaces; quotes, emoji and
    # 10,000 characters are kept as given.
    ids = {t: i for i, t in enumerate(base.titles)}
    for case, raw, title in [("tab", '"A\tB"', "A B"), ("newline", '"line1\nline2"', "line1 line2"),
                             ("quotes", '"He said ""hi"""', 'He said "hi"'), ("emoji", "Café 🎬 ★", "Café 🎬 ★"),
                             ("long", "x" * 10000, "x" * 10000)]:
        s, _, _ = _load(tmp_path / case, None, _items(i3=raw))
        assert s.titles[ids["Item 3"]] == title, case
