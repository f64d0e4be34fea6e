"""Kill -9 soak: a tiny SASRec run and a tiny stage-2 run, SIGKILLed at random moments and restarted.

    python tests/soak/soak.py --kills=20 --out=results/reliability/soak.json

Each kind of run (`sasrec`, `stage2`) is first run once uninterrupted (the reference). Then the same
command, in a fresh workdir, is started, killed with SIGKILL after a random delay (uniform over the
reference's wall time, so kills land in start-up, compilation, training steps and checkpoint saves:
both runs checkpoint every epoch / step), and started again, until it has been killed `--kills` times;
then it runs to the end. Counted: kills, kills that left a partial (uncommitted) checkpoint behind,
restarts that failed, corrupt committed checkpoints (a step directory that does not restore), and
whether the final parameters, test metrics and metrics.jsonl equal the reference's. Last, SIGTERM
(a preemption notice) must save and exit 0, and the run resume from that save to the same end.

CI runs `tests/soak/test_soak.py` (5 kills per kind); this command is the full soak.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

TESTS = pathlib.Path(__file__).resolve().parents[1]
REPO = TESTS.parent
for p in (str(TESTS), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

TIMING_KEYS = ("tokens_per_s", "samples_per_s")  # wall-clock rates: not part of the trajectory


def setup(root: pathlib.Path) -> dict[str, list[str]]:
    """The tiny dataset, tiny LLM and SASRec table; -> the command line of each run kind."""
    from synthetic_data import write_custom_dataset
    from tiny_llm import save_tiny_llm

    root.mkdir(parents=True, exist_ok=True)
    inter, items = write_custom_dataset(root / "data")
    model_dir = save_tiny_llm(root / "tiny-llama")
    data = ["--config.data.dataset=custom", f"--config.data.custom_interactions={inter}",
            f"--config.data.custom_items={items}", f"--config.data.cache_dir={root / 'cache'}"]
    py = [sys.executable, "-m", "rsllm_jax.main"]
    sasrec = py + ["--config=configs/tiny.py", *data, "--config.sasrec.epochs=6", "--config.sasrec.patience=100",
                   "--config.log_every_steps=1", "--config.sasrec.keep_checkpoints=2"]
    base_sasrec = root / "sasrec-base"
    if not (base_sasrec / "item_embeddings.npy").exists():
        _run(sasrec + [f"--workdir={base_sasrec}"], base_sasrec)
    stage2 = py + ["--config=configs/tiny.py:stage2", *data, f"--config.llm.model={model_dir}",
                   f"--config.stage2.sasrec_dir={base_sasrec}", "--config.stage2.stage1_dir=none",
                   "--config.train.max_train_samples=160", "--config.train.checkpoint_every_steps=1",
                   "--config.train.val_samples=4", "--config.eval.max_rows=4", "--config.lora.dropout=0.1",
                   "--config.log_every_steps=1"]
    return {"sasrec": sasrec, "stage2": stage2}


def _env() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _run(cmd: list[str], workdir: pathlib.Path) -> float:
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(workdir / "soak.log", "ab") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO).returncode
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; log: {workdir / 'soak.log'}")
    return time.time() - t0


def _ckpt_dirs(workdir: pathlib.Path) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """(committed step directories, partial ones) under the run's checkpoint folders."""
    committed, partial = [], []
    for sub in ("checkpoints", "best"):
        d = workdir / sub
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_dir() and p.name.isdigit():
                committed.append(p)
            elif "tmp" in p.name:
                partial.append(p)
    return committed, partial


def _corrupt(workdir: pathlib.Path) -> list[str]:
    """Committed checkpoint steps that do not read back: no commit marker, or a state or meta item that
    orbax cannot restore in full (every array is read)."""
    import orbax.checkpoint as ocp

    bad = []
    for p in _ckpt_dirs(workdir)[0]:
        try:
            if not (p / "commit_success.txt").exists():
                raise FileNotFoundError("no commit_success.txt")
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.restore(p / "state")
            json.loads((p / "meta" / "metadata").read_text()) if (p / "meta" / "metadata").exists() else None
        except Exception as e:  # noqa: BLE001 -- any failure to read back is corruption here
            bad.append(f"{p}: {type(e).__name__}: {str(e)[:200]}")
    return bad


def _trajectory(workdir: pathlib.Path) -> list[dict]:
    rows = []
    with open(workdir / "metrics.jsonl") as f:
        for line in f:
            r = json.loads(line)
            rows.append({k: v for k, v in r.items() if k not in TIMING_KEYS})
    return rows


def _final(kind: str, workdir: pathlib.Path):
    import numpy as np

    res = json.loads((workdir / "results.json").read_text())
    test = {k: v for k, v in res["test"].items() if not k.endswith("wall_time_s")}  # timing, not state
    if kind == "sasrec":
        params = {"item_embeddings": np.load(workdir / "item_embeddings.npy")}
    else:
        from rsllm_jax.checkpoint.run_dirs import restore_trainable
        import jax

        params = {"/".join(str(k) for k in path): np.asarray(v)
                  for path, v in jax.tree_util.tree_flatten_with_path(restore_trainable(str(workdir)))[0]}
    return test, params


def _same(a, b) -> bool:
    import numpy as np

    (ta, pa), (tb, pb) = a, b
    if set(pa) != set(pb):
        return False
    return ta == tb and all(np.allclose(pa[k], pb[k], rtol=1e-5, atol=1e-6) for k in pa)


def soak(kind: str, cmd: list[str], root: pathlib.Path, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    ref = root / f"{kind}-reference"
    if not (ref / "results.json").exists():
        _run(cmd + [f"--workdir={ref}"], ref)
    t_ref = json.loads((ref / "results.json").read_text()).get("wall_time_s") or 10.0
    reference = _final(kind, ref)

    w, t = root / f"{kind}-soaked", root / f"{kind}-sigterm"
    for d in (w, t):  # every soak starts from nothing (the reference is reused)
        subprocess.run(["rm", "-rf", str(d)], check=True)
    w.mkdir(parents=True)
    stats = dict(kind=kind, kills=0, kills_during_save=0, restarts=0, failed_restarts=0, finished_early=0,
                 reference_wall_s=round(float(t_ref), 1))
    log = open(w / "soak.log", "ab")
    while stats["kills"] < kills:
        delay = rng.uniform(0.5, float(t_ref) + 6.0)  # + start-up, which wall_time_s leaves out
        proc = subprocess.Popen(cmd + [f"--workdir={w}"], stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
        try:
            rc = proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stats["kills"] += 1
            stats["kills_during_save"] += bool(_ckpt_dirs(w)[1])
            stats["restarts"] += 1
            continue
        if rc != 0:
            stats["failed_restarts"] += 1
            break
        # It finished before the kill: the soak goes on from scratch so every kill hits unfinished work.
        stats["finished_early"] += 1
        final = _final(kind, w)
        stats.setdefault("early_finishes_equal", []).append(_same(final, reference))
        for p in sorted(w.iterdir()):
            if p.name != "soak.log":
                subprocess.run(["rm", "-rf", str(p)], check=True)
    stats["corrupt_checkpoints"] = _corrupt(w)
    t0 = time.time()
    _run(cmd + [f"--workdir={w}"], w)  # to the end
    stats["last_run_s"] = round(time.time() - t0, 1)
    stats["final_equal"] = _same(_final(kind, w), reference)
    stats["metrics_equal"] = _trajectory(w) == _trajectory(ref)

    # SIGTERM: a preemption notice. The run must save, exit 0, and resume to the same end.
    proc = subprocess.Popen(cmd + [f"--workdir={t}"], stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    deadline = time.time() + 600
    while time.time() < deadline and not _trained_steps(t):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stats["sigterm_exit_code"] = proc.wait()
    stats["sigterm_saved"] = bool(_ckpt_dirs(t)[0]) and not (t / "results.json").exists()
    _run(cmd + [f"--workdir={t}"], t)
    stats["sigterm_final_equal"] = _same(_final(kind, t), reference)
    stats["sigterm_metrics_equal"] = _trajectory(t) == _trajectory(ref)
    stats["sigterm_resumed_equal"] = stats["sigterm_final_equal"] and stats["sigterm_metrics_equal"]
    log.close()
    return stats


def _trained_steps(workdir: pathlib.Path) -> int:
    try:
        return sum(1 for line in open(workdir / "metrics.jsonl") if '"loss"' in line)
    except OSError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--kinds", default="sasrec,stage2")
    p.add_argument("--root", default="runs/soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    a = p.parse_args()
    root = pathlib.Path(a.root).resolve()
    cmds = setup(root)
    out = dict(kills_per_kind=a.kills, seed=a.seed, runs=[])
    for kind in a.kinds.split(","):
        s = soak(kind, cmds[kind], root, a.kills, a.seed)
        out["runs"].append(s)
        print(json.dumps(s), flush=True)
    if a.out:
        pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
