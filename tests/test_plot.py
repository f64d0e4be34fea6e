import json
import os

import pytest

from rsllm_jax.report.plot import plot, read_metrics


def test_plot_writes_png_and_resumed_steps_override(tmp_path):
    p = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5, "val/hr": 0.2}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    s = read_metrics(str(p))
    assert s["loss"] == ([1.0, 2.0], [3.0, 1.5])
    out = plot(s, str(tmp_path / "c.png"), "t")
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_line_names_file_and_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(str(p))


def test_cli_writes_curves_png(tmp_path):
    import subprocess
    import sys

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "loss": 1}\n')
    out = subprocess.run([sys.executable, "-m", "rsllm_jax.report.plot", f"--workdir={tmp_path}"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert open(tmp_path / "curves.png", "rb").read(4) == b"\x89PNG"


def test_learning_curves_put_runs_on_windows_seen(tmp_path):
    import json as _json

    import pytest

    from rsllm_jax.report.plot import learning_curves

    runs = {}
    for name, batch in (("old", 8), ("new", 16)):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(_json.dumps({"train": {"batch_size": batch}}))
        (d / "metrics.jsonl").write_text("".join(_json.dumps({"step": s, "val/accuracy": s / 100}) + "\n"
                                                 for s in (32, 64)))
        runs[name] = str(d)
    out = learning_curves(runs, "val/accuracy", str(tmp_path / "lc.png"), refs={"SASRec": 0.38})
    assert os.path.getsize(out) > 1000
    with pytest.raises(ValueError, match="no 'val/hit_ratio_at_1' rows.*eval_every_steps"):
        learning_curves(runs, "val/hit_ratio_at_1", str(tmp_path / "x.png"))
