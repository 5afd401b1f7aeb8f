"""Sort a request into a task type: explicit type, then rules, then a small classifier, then default.

The classifier is multinomial naive Bayes over lower-cased word unigrams and bigrams, trained
at start-up from the ``examples`` of each ``[[types]]`` entry (pure numpy, nothing
downloaded). Its leave-one-out accuracy on those examples is reported at start-up.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from thinkcap.proxy.model_file import TypeConfig

WORD = re.compile(r"[a-z0-9_]+|[^\sa-z0-9_]")
#: Laplace smoothing of the naive Bayes word counts.
SMOOTHING = 0.5


class UnknownTypeError(ValueError):
    """An explicit type that is not configured (answered with 400)."""


def features(text: str) -> list[str]:
    """Lower-cased word unigrams and bigrams."""
    words = WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in itertools.pairwise(words)]


@dataclass(frozen=True)
class Decision:
    """The chosen type and what decided it: ``explicit``, ``rule``, ``classifier`` or ``default``."""

    type: str
    source: str


class NaiveBayes:
    """Multinomial naive Bayes over :func:`features`; uniform class prior."""

    def __init__(self, examples: Mapping[str, Sequence[str]]) -> None:
        self.names = [n for n, ex in examples.items() if ex]
        vocab: dict[str, int] = {}
        docs = [(k, features(t)) for k, n in enumerate(self.names) for t in examples[n]]
        for _, feats in docs:
            for f in feats:
                vocab.setdefault(f, len(vocab))
        self.vocab = vocab
        self.counts: NDArray[np.float64] = np.zeros((len(self.names), len(vocab)))
        for k, feats in docs:
            for f in feats:
                self.counts[k, vocab[f]] += 1
        self.docs = docs
        self.log_p = self._log_p(self.counts)

    @staticmethod
    def _log_p(counts: NDArray[np.float64]) -> NDArray[np.float64]:
        smoothed = counts + SMOOTHING
        out: NDArray[np.float64] = np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))
        return out

    def _scores(self, feats: Iterable[str], log_p: NDArray[np.float64]) -> NDArray[np.float64] | None:
        idx = [self.vocab[f] for f in feats if f in self.vocab]
        if not idx:
            return None
        out: NDArray[np.float64] = log_p[:, idx].sum(axis=1)
        return out

    def predict(self, text: str) -> str | None:
        """The most likely type, or ``None`` when no feature of ``text`` was seen in training."""
        scores = self._scores(features(text), self.log_p)
        return None if scores is None else self.names[int(np.argmax(scores))]

    def leave_one_out(self) -> float | None:
        """Accuracy when each example is classified by a model trained on all the others."""
        if len(self.names) < 2 or not self.docs:
            return None
        hits = 0
        for k, feats in self.docs:
            counts = self.counts.copy()
            for f in feats:
                counts[k, self.vocab[f]] -= 1
            scores = self._scores(feats, self._log_p(counts))
            hits += scores is not None and int(np.argmax(scores)) == k
        return hits / len(self.docs)


class Classifier:
    """The classification chain of DESIGN.md section 4, step 2."""

    def __init__(self, types: Sequence[TypeConfig], default_type: str) -> None:
        self.names = [t.task.name for t in types]
        if default_type not in self.names:
            raise ValueError(f"default_type {default_type!r} is not one of {self.names}")
        self.default_type = default_type
        self.rules: list[tuple[str, re.Pattern[str]]] = []
        for t in types:
            for kw in t.keywords:
                self.rules.append((t.task.name, re.compile(r"(?<!\w)" + re.escape(kw) + r"(?!\w)", re.IGNORECASE)))
            for pat in t.patterns:
                try:
                    self.rules.append((t.task.name, re.compile(pat)))
                except re.error as exc:
                    raise ValueError(f"type {t.task.name!r}: pattern {pat!r} is not a valid regex: {exc}") from None
        examples = {t.task.name: t.examples for t in types}
        trained = [n for n, ex in examples.items() if ex]
        self.model = NaiveBayes(examples) if len(trained) >= 2 else None
        self.cv_accuracy = self.model.leave_one_out() if self.model is not None else None

    def explicit(self, name: Any) -> Decision:
        """An explicitly requested type; unknown or malformed names raise :class:`UnknownTypeError`."""
        if not isinstance(name, str) or name not in self.names:
            raise UnknownTypeError(f"unknown task type {name!r}; configured types: {', '.join(self.names)}")
        return Decision(name, "explicit")

    def classify(self, text: str) -> Decision:
        """Rules, then the classifier, then the default type, on the first :data:`CLASSIFY_CHARS`
        characters of ``text`` (so a huge prompt costs no more than a long one)."""
        text = text[:CLASSIFY_CHARS]
        for name, rule in self.rules:
            if rule.search(text):
                return Decision(name, "rule")
        if self.model is not None:
            guess = self.model.predict(text)
            if guess is not None:
                return Decision(guess, "classifier")
        return Decision(self.default_type, "default")


#: Characters of a prompt that classification reads.
CLASSIFY_CHARS = 16 * 1024


def prompt_text(body: Mapping[str, Any]) -> str:
    """The text to classify: the last user message (chat) or the prompt (completions)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(
                        p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
                return ""
        return ""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    return ""
