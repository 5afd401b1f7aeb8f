"""Per-type answer statistics: answer length and used share."""

from __future__ import annotations

import pytest

from thinkcap import estimators


def test_answer_length_and_used_share_follow_their_weighted_means() -> None:
    """The first answer replaces the initial value; each later one moves the mean by ``weight``;
    a share is clipped to [floor, 1] and a zero limit counts as the whole cap."""
    length = estimators.AnswerLength(["a", "b"], weight=0.25)
    assert length.get() == {"a": 0.0, "b": 0.0}
    for i, tokens in enumerate([40, 80, 0]):
        length.update("a", tokens, now=float(i))
    assert length.get() == {"a": pytest.approx((40 + 0.25 * 40) * 0.75), "b": 0.0}
    assert (length.count("a"), length.count("b")) == (3, 0)
    share = estimators.UsedShare(["a"], weight=1.0, floor=0.1)
    assert share.get() == {"a": 1.0}
    share.update("a", used=1, limit=100, now=0.0)
    assert share.get() == {"a": 0.1}
    share.update("a", used=500, limit=100, now=1.0)
    assert share.get() == {"a": 1.0}
    share.update("a", used=3, limit=0, now=2.0)
    assert share.get() == {"a": 1.0}
    with pytest.raises(ValueError, match="unknown type"):
        share.update("zzz", used=1, limit=2, now=3.0)
    with pytest.raises(ValueError, match="used"):
        share.update("a", used=-1, limit=2, now=3.0)
