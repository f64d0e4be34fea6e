"""The export contract (`python -m rsllm_jax.data export`), checked the way an outside tool would."""
import json
import os
import subprocess
import sys



def _run(*args, env_data_dir=None):
    env = dict(os.environ)
    env.pop("RSLLM_DATA_DIR", None)
    if env_data_dir:
        env["RSLLM_DATA_DIR"] = str(env_data_dir)
    return subprocess.run([sys.executable, "-m", "rsllm_jax.data", "export", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_export_movielens(data_dir, split_cache_dir, tmp_path):
    out = tmp_path / "ml"
    proc = _run("--dataset=movielens", f"--out={out}", f"--data_dir={data_dir}", "--seed=0",
                f"--cache_dir={split_cache_dir}")
    assert proc.returncode == 0, proc.stderr
    assert "val 94" in proc.stdout and "test 95" in proc.stdout and "items 1682" in proc.stdout
    assert {p.name for p in out.iterdir()} >= {"train.jsonl", "val.jsonl", "test.jsonl", "items.tsv"}
    titles = {}
    for line in (out / "items.tsv").read_text(encoding="utf-8").splitlines():
        item_id, title = line.split("\t")
        titles[int(item_id)] = title
    assert sorted(titles) == list(range(1682)) and titles[0] == "Toy Story"
    assert titles[63] == "The Shawshank Redemption"
    splits = {name: _read_jsonl(out / f"{name}.jsonl") for name in ("train", "val", "test")}
    assert (len(splits["val"]), len(splits["test"])) == (94, 95)
    for name, recs in splits.items():
        keys = {"user", "history", "target"} | ({"candidates"} if name != "train" else set())
        for r in recs:
            assert set(r) == keys and isinstance(r["user"], str)
            ids = r["history"] + [r["target"]] + r.get("candidates", [])
            assert all(isinstance(i, int) and i in titles for i in ids)
            if name != "train":
                assert len(set(r["candidates"])) == 20 and r["target"] in r["candidates"]
    # First LLaRA val row (user 260), ids = u.item movieID - 1.
    assert splits["val"][0]["history"][:3] == [880, 269, 361] and splits["val"][0]["target"] == 321
    # Same seed through the environment variable -> identical files.
    out2 = tmp_path / "ml2"
    proc = _run("--dataset=movielens", f"--out={out2}", f"--cache_dir={split_cache_dir}",
                env_data_dir=data_dir)
    assert proc.returncode == 0, proc.stderr
    for name in ("val.jsonl", "test.jsonl", "items.tsv"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def test_export_custom_and_errors(tmp_path):
    inter, items = tmp_path / "inter.tsv", tmp_path / "items.csv"
    rows = ["user\titem\ttimestamp"] + [f"u{u}\tit{(u * 3 + t) % 25}\t{t}" for u in range(20) for t in range(6)]
    inter.write_text("\n".join(rows) + "\n")
    items.write_text("item,title\n" + "".join(f"it{i},Title {i}\n" for i in range(25)))
    out = tmp_path / "out"
    proc = _run("--dataset=custom", f"--out={out}", f"--interactions={inter}", f"--items={items}",
                f"--cache_dir={tmp_path / 'cache'}", "--seed=7")
    assert proc.returncode == 0, proc.stderr
    assert "custom: train" in proc.stdout and "filtered" in proc.stdout
    val = _read_jsonl(out / "val.jsonl")
    assert len(val) == 2 and all(len(r["candidates"]) == 20 for r in val)
    assert json.loads((out / "manifest.json").read_text())["seed"] == 7

    items.write_text("item,title\nit0,Only one\n")
    proc = _run("--dataset=custom", f"--out={out}", f"--interactions={inter}", f"--items={items}",
                f"--cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 2
    assert str(inter) in proc.stderr and "line 3" in proc.stderr and "'item'" in proc.stderr

    proc = _run("--dataset=nope", f"--out={out}")
    assert proc.returncode != 0 and "dataset" in proc.stderr
    proc = _run(f"--out={out}")
    assert proc.returncode != 0 and "--dataset" in proc.stderr
