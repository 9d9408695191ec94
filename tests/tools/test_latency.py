"""Side-by-side latency: models timed in interleaved rounds, each figure its least disturbed round."""

from __future__ import annotations

import pytest

from cnnlab.tools import latency


def test_models_are_timed_in_interleaved_rounds_and_keep_their_lowest_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "ROUNDS", 3)
    calls: list[tuple[str, int]] = []
    # Each round's median, in the order the rounds are timed: "a" is disturbed in its first round, "b" in its last.
    medians = iter([9.0, 2.0, 1.0, 2.0, 1.5, 7.0] * len(latency.BATCHES))
    monkeypatch.setattr(latency, "median_ms", lambda call, repeats: (call(), next(medians))[1])

    def model(name: str) -> latency.Timed:
        return lambda batch: lambda: calls.append((name, batch))

    figures = latency.side_by_side({"a": model("a"), "b": model("b")})
    assert figures == {"a": {1: 1.0, 256: 1.0}, "b": {1: 2.0, 256: 2.0}}
    assert [name for name, batch in calls if batch == 256] == ["a", "b"] * 3
