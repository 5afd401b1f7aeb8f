"""``thinkcap extproc`` on the command line (the processor itself behind a real Envoy is in
``tests/proxy/test_extproc.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.proxy.conftest import write_config
from thinkcap.cli import main


def test_a_forced_budget_is_refused_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Behind a gateway thinkcap sees one request per answer and cannot continue it, so
    ``budget = "forced"`` is a start-up error that says what to use instead."""
    path = write_config(tmp_path, "http://127.0.0.1:9/v1", backend='budget = "forced"')
    assert main(["extproc", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert 'budget = "forced" needs thinkcap serve' in err and '"native" or "auto"' in err
