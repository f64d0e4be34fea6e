"""A small bring-your-own dataset written to disk: users walk a fixed item cycle, so a sequential
model can learn it, and titles are distinct words a tiny tokenizer can spell."""
import pathlib

import numpy as np

WORDS = ["Toy", "Heat", "Alien", "Matrix", "Star", "Fargo", "Casablanca", "Story", "Wars", "Answer"]


def write_custom_dataset(root: pathlib.Path, num_users: int = 60, num_items: int = 30, length: int = 14,
                         seed: int = 0) -> tuple[str, str]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    inter = root / "interactions.csv"
    items = root / "items.csv"
    with open(items, "w") as f:
        f.write("item,title\n")
        for i in range(num_items):
            f.write(f"i{i},{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]} {i}\n")
    with open(inter, "w") as f:
        f.write("user,item,timestamp\n")
        for u in range(num_users):
            start = int(rng.integers(num_items))
            for t in range(length):
                f.write(f"u{u},i{(start + 2 * t) % num_items},{1000 + t}\n")
    return str(inter), str(items)


def use_custom_dataset(c, root: pathlib.Path):
    """Point config `c` at a freshly written synthetic custom dataset (and a split cache) under `root`."""
    inter, items = write_custom_dataset(root / "data")
    c.data.dataset = "custom"
    c.data.custom_interactions, c.data.custom_items = inter, items
    c.data.cache_dir = str(root / "cache")
    return c
