"""The classifier chain: explicit type, rules, naive Bayes, default; a bounded prefix."""

from __future__ import annotations

from typing import Any

import pytest

from thinkcap.controller import TaskType
from thinkcap.proxy.classify import CLASSIFY_CHARS, Classifier, NaiveBayes, UnknownTypeError, prompt_text
from thinkcap.proxy.model_file import TypeConfig


def tc(name: str, **kw: Any) -> TypeConfig:
    task = TaskType(
        name=name,
        prior=0.5,
        accuracy_base=0.1,
        accuracy_gain=0.5,
        accuracy_rate=0.01,
        overhead_s=0.1,
        per_token_s=0.01,
        min_tokens=0,
        max_tokens=100,
    )
    return TypeConfig(task=task, **kw)


MATH = ("solve the equation for x", "integrate this function", "compute the sum of the series", "find the derivative")
CODE = ("write a python function", "fix this bug in my code", "refactor the class", "write unit tests for the module")


def test_naive_bayes_learns_from_examples_and_reports_cross_validation() -> None:
    """Trained on a few examples per type it sorts new prompts; leave-one-out accuracy is reported."""
    nb = NaiveBayes({"math": MATH, "code": CODE})
    assert nb.predict("please solve for y") == "math"
    assert nb.predict("a python class with a bug") == "code"
    assert nb.predict("completely unseen words") is None
    cv = nb.leave_one_out()
    assert cv is not None and 0.5 <= cv <= 1.0


def test_leave_one_out_can_fail() -> None:
    """Examples that share nothing with their own type score zero in cross-validation."""
    nb = NaiveBayes({"a": ("alpha beta", "gamma delta"), "b": ("alpha", "gamma")})
    assert nb.leave_one_out() == 0.0


def test_classifier_chain_order_and_errors() -> None:
    """Rules beat the classifier; no evidence falls to the default; bad regexes and types are errors."""
    c = Classifier(
        [tc("math", keywords=("lemma",), examples=MATH), tc("code", patterns=(r"```",), examples=CODE)], "code"
    )
    assert (c.classify("a LEMMA about code").type, c.classify("a LEMMA").source) == ("math", "rule")
    assert c.classify("```x``` solve the equation").source == "rule"
    assert c.classify("solve the series").source == "classifier"
    assert c.classify("zzz").type == "code" and c.classify("zzz").source == "default"
    assert c.classify("lemmas").source != "rule"  # keywords match whole words
    with pytest.raises(UnknownTypeError, match="math, code"):
        c.explicit("poetry")
    with pytest.raises(ValueError, match="not a valid regex"):
        Classifier([tc("math", patterns=("(",))], "math")
    assert Classifier([tc("math")], "math").cv_accuracy is None


def test_prompt_text_reads_chat_parts_and_completions() -> None:
    """The last user message (string or parts) or the completions prompt is classified."""
    body = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]},
        ]
    }
    assert prompt_text(body) == "a"
    assert prompt_text({"prompt": ["p", "q"]}) == "p q" and prompt_text({"messages": "nonsense"}) == ""


def test_classification_reads_a_bounded_prefix_of_the_prompt() -> None:
    """A keyword past the first CLASSIFY_CHARS characters is not seen: a huge prompt costs what a long one does."""
    c = Classifier([tc("math", keywords=("prove",)), tc("chat")], "chat")
    filler = "word " * (CLASSIFY_CHARS // 5)
    assert c.classify("prove " + filler).type == "math"
    assert c.classify(filler + " prove").type == "chat"
