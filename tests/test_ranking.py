"""Ranking metrics: hand-computed cases for the protocol, and the ensemble scoring they rank by."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcf.core import ranking


def _fixed_scores(table):
    table = jnp.asarray(table, jnp.float32)

    def score(users):
        return table[jnp.asarray(users)]

    return score


def test_hand_computed_precision_recall_and_ndcg():
    # 2 users, 6 items. Scores rank items 0 > 1 > 2 > 3 > 4 > 5 for both users.
    scores = np.tile(np.arange(6, 0, -1, dtype=np.float32), (2, 1))
    # User 0 rated item 0 in training (excluded), holds out items 1 (5 stars), 3 (4 stars) and 2 (3 stars).
    # User 1 holds out item 5 (4.5 stars) and nothing else.
    train = (np.array([0]), np.array([0]))
    valid = (np.array([0, 0, 0, 1]), np.array([1, 3, 2, 5]), np.array([5.0, 4.0, 3.0, 4.5]))
    metrics = ranking.ranking_metrics(_fixed_scores(scores), 6, *train, *valid, ks=(2, 5), users_per_block=4)
    # User 0 ranks [1, 2, 3, 4, 5]: hits at ranks 1 and 3. User 1 ranks [0, 1, 2, 3, 4, 5]: item 5 at rank 6.
    assert metrics["ranking_users"] == 2
    assert metrics["precision@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["recall@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert metrics["precision@5"] == pytest.approx((2 / 5 + 0) / 2)
    assert metrics["recall@5"] == pytest.approx((2 / 2 + 0) / 2)
    ndcg0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert metrics["ndcg@5"] == pytest.approx((ndcg0 + 0) / 2)
    assert metrics["ndcg@2"] == pytest.approx((1 / (1 + 1 / math.log2(3)) + 0) / 2)


def test_training_items_are_never_ranked_and_users_without_relevant_items_are_skipped():
    # The best-scored item of user 0 is a training item that also appears (wrongly) as relevant.
    scores = np.array([[9, 1, 2, 3], [9, 8, 7, 6], [1, 2, 3, 4]], np.float32)
    train = (np.array([0, 1]), np.array([0, 0]))
    valid = (np.array([0, 0, 1, 2]), np.array([0, 3, 1, 3]), np.array([5.0, 4.0, 2.0, 3.5]))
    metrics = ranking.ranking_metrics(_fixed_scores(scores), 4, *train, *valid, ks=(1,), users_per_block=2)
    # Only user 0 has a relevant held-out item (user 1's is 2 stars, user 2's 3.5); its top unseen
    # item is 3 (score 3), which is relevant: item 0 was a training item and is never ranked.
    assert metrics["ranking_users"] == 1
    assert metrics["precision@1"] == 1.0
    assert metrics["recall@1"] == 0.5


def test_no_relevant_items_gives_nan_not_zero():
    scores = np.ones((1, 3), np.float32)
    metrics = ranking.ranking_metrics(_fixed_scores(scores), 3, np.array([0]), np.array([0]), np.array([0]),
                                      np.array([1]), np.array([2.0]), ks=(1,))
    assert metrics["ranking_users"] == 0 and math.isnan(metrics["ndcg@1"])


def test_bad_cutoffs_are_refused():
    with pytest.raises(ValueError, match="ks must be"):
        ranking.ranking_metrics(_fixed_scores(np.ones((1, 3))), 3, np.zeros(0), np.zeros(0), np.zeros(0),
                                np.zeros(0), np.zeros(0), ks=(4,))


def test_stacked_tables_score_the_mean_of_the_members():
    rng = np.random.default_rng(0)
    members = [
        {"user_embedding": rng.normal(size=(3, 2)), "item_embedding": rng.normal(size=(5, 2)),
         "user_bias": rng.normal(size=(3, 1)), "item_bias": rng.normal(size=(5, 1))}
        for _ in range(3)
    ]
    stacked = {name: jnp.asarray(np.stack([m[name] for m in members]), jnp.float32) for name in members[0]}
    users = jnp.array([2, 0], jnp.int32)
    got = np.asarray(ranking.score_block(stacked, users, (0.5, 5.0)))
    expected = np.mean([
        np.asarray(ranking.score_block({k: jnp.asarray(v, jnp.float32) for k, v in m.items()}, users, (0.5, 5.0)))
        for m in members
    ], axis=0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # The scaled sigmoid is applied per member before the mean, not to the mean logit.
    logits = np.mean([m["user_embedding"][[2, 0]] @ m["item_embedding"].T + m["user_bias"][[2, 0]]
                      + m["item_bias"][:, 0] for m in members], axis=0)
    assert not np.allclose(got, 1 / (1 + np.exp(-logits)) * 4.5 + 0.5, atol=1e-4)
