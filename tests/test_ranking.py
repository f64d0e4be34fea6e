import numpy as np
import jax.numpy as jnp

from rsllm_jax.eval import ranking


def test_candidate_hit_at_1():
    cands = jnp.array([[5, 6, 7], [1, 2, 3]])
    scores = jnp.array([[0.1, 0.9, 0.2], [3.0, 2.0, 1.0]])
    hits = ranking.candidate_hit_at_1(scores, cands, jnp.array([6, 2]))
    np.testing.assert_array_equal(hits, [1.0, 0.0])


def test_target_rank_excludes_history_but_not_target():
    scores = jnp.array([[0.5, 0.9, 0.1, 0.7]])
    # Item 1 (score 0.9) is in the history: excluded. Item 3 (0.7) still beats the target 0 (0.5).
    assert int(ranking.target_rank(scores, jnp.array([0]), exclude=jnp.array([[1, 4, 4]]))[0]) == 1
    assert int(ranking.target_rank(scores, jnp.array([0]))[0]) == 2
    # The target itself appearing in `exclude` is never masked.
    assert int(ranking.target_rank(scores, jnp.array([1]), exclude=jnp.array([[1, 4, 4]]))[0]) == 0


def test_hr_ndcg():
    hit, ndcg = ranking.hr_ndcg_at_k(jnp.array([0, 1, 9, 10]), 10)
    np.testing.assert_array_equal(hit, [1, 1, 1, 0])
    np.testing.assert_allclose(ndcg, [1.0, 1 / np.log2(3), 1 / np.log2(11), 0.0], rtol=1e-6)
    assert ranking.mean_of([1.0, 0.0, 5.0], [True, True, False]) == 0.5
