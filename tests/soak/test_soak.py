"""The kill -9 soak in its short form (5 kills per run kind); `python tests/soak/soak.py --kills=20` is
the full one, its result committed in results/reliability/soak.json."""
import pytest

from soak import setup, soak


@pytest.mark.parametrize("kind", ["sasrec", "stage2"])
def test_kill9_soak_resumes_to_the_uninterrupted_result(tmp_path_factory, kind):
    root = tmp_path_factory.getbasetemp() / "soak"
    cmds = setup(root)
    s = soak(kind, cmds[kind], root, kills=5, seed=1)
    assert s["kills"] == 5 and s["failed_restarts"] == 0, s
    assert s["corrupt_checkpoints"] == [], s
    assert all(s.get("early_finishes_equal", [])), s
    # The run killed 5 times ends with the same parameters, test metrics and logged trajectory.
    assert s["final_equal"] and s["metrics_equal"], s
    # SIGTERM (preemption): saved, exit 0, and the resumed run ends where the reference did.
    assert s["sigterm_exit_code"] == 0 and s["sigterm_saved"], s
    assert s["sigterm_final_equal"] and s["sigterm_metrics_equal"], s
