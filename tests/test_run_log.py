"""metrics.jsonl on resume, and SIGTERM as a preemption notice."""
import json
import os
import signal

from rsllm_jax.train.preemption import Preempted, Preemption
from rsllm_jax.train.run_log import MetricsLog


def test_resume_drops_rows_past_the_restored_step_and_a_cut_line(tmp_path):
    log = MetricsLog(str(tmp_path))
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"note": "no step: kept"})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # the kill cut this write
    MetricsLog(str(tmp_path), resume_step=2)  # the checkpoint the restart restores is step 2
    rows = [json.loads(line) for line in open(log.path)]
    assert rows == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"note": "no step: kept"}]
    # Without a resume step (or on a fresh run at step 0 with nothing logged) nothing is touched.
    MetricsLog(str(tmp_path))
    assert len(open(log.path).readlines()) == 3
    MetricsLog(str(tmp_path), resume_step=0)
    assert [json.loads(line) for line in open(log.path)] == [{"note": "no step: kept"}]


def test_sigterm_inside_sets_the_flag_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with Preemption() as p:
        assert not p.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested()
    assert signal.getsignal(signal.SIGTERM) is before
    e = Preempted("stage2", 7)
    assert e.step == 7 and "after step 7" in str(e) and "resumes" in str(e)
