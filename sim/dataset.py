"""The labelled set shipped for ``thinkcap calibrate`` (``examples/calibration.jsonl``),
generated here so that it is reproducible and needs no download.

Two types whose accuracy rises with the token cap because a truncated answer is wrong:
``count`` ("count from 1 to N, one number per line", N from 3 to 30; graded by the number N
appearing, so an answer cut off before it fails) and ``add`` (sums of two or three one-digit
numbers, the number only; graded numerically, the last number in the answer).
"""

from __future__ import annotations

import json
import random
from typing import Any

COUNT_TO = (3, 5, 8, 12, 16, 20, 25, 30)
COUNT_PHRASES = (
    "Count from 1 to {n}, one number per line.",
    "Please count from 1 up to {n}, writing each number on its own line.",
    "List the whole numbers from 1 to {n}, one per line.",
)
ADD_PHRASE = "What is {expr}? Answer with the number only."


def items(seed: int = 0) -> list[dict[str, Any]]:
    """The set, in a fixed order."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for n in COUNT_TO:
        for phrase in COUNT_PHRASES:
            answer = rf"(^|\D){n}(\D|$)"  # n itself, not a longer number that holds it
            out.append({"type": "count", "prompt": phrase.format(n=n), "answer": answer, "grader": "regex"})
    for k in range(24):
        terms = [rng.randint(1, 9) for _ in range(2 if k < 16 else 3)]
        out.append({"type": "add", "prompt": ADD_PHRASE.format(expr=" + ".join(map(str, terms))),
                    "answer": str(sum(terms)), "grader": {"kind": "numeric", "tolerance": 0}})  # fmt: skip
    return out


def jsonl(seed: int = 0) -> str:
    """The set as JSON lines."""
    return "".join(json.dumps(row) + "\n" for row in items(seed))


if __name__ == "__main__":
    print(jsonl(), end="")
