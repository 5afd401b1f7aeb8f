"""The import contracts of pyproject.toml, run with import-linter on the real import graph: the
tree keeps every one, and each one fails once a deliberate bad import is added to the graph."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from importlinter import configuration
from importlinter.adapters.building import GraphBuilder
from importlinter.application import use_cases
from importlinter.application.app_config import settings

ROOT = Path(__file__).resolve().parents[1]


class Injecting(GraphBuilder):  # type: ignore[misc]
    """The real graph, plus the imports given."""

    def __init__(self, extra: list[tuple[str, str]]) -> None:
        self.extra = extra

    def build(self, **kwargs: Any) -> Any:
        graph = super().build(**kwargs)
        for importer, imported in self.extra:
            graph.add_import(importer=importer, imported=imported, line_number=1, line_contents=f"import {imported}")
        return graph


def broken(extra: list[tuple[str, str]]) -> dict[str, bool]:
    """Each contract's name, and whether it is broken, on the graph with ``extra`` imports."""
    configuration.configure()
    use_cases._register_built_in_contract_types()  # what lint-imports does before its report
    settings.configure(GRAPH_BUILDER=Injecting(extra))
    try:
        options = use_cases.read_user_options(str(ROOT / "pyproject.toml"))
        report = use_cases.create_report(options, cache_dir=None)
    finally:
        configuration.configure()
    assert not report.could_not_run
    return {c.name: not check.kept for c, check in report.get_contracts_and_checks()}


def test_the_tree_keeps_every_contract() -> None:
    """All ten contracts hold on the code as it is."""
    result = broken([])
    assert len(result) == 10 and not any(result.values()), [k for k, v in result.items() if v]


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("thinkcap.estimators.arrival", "thinkcap.proxy.state", "The pure core imports nothing"),
        ("thinkcap.sim.backend", "thinkcap.proxy.app", "The simulator does not depend on the proxy"),
        ("thinkcap.controller.queue", "thinkcap.estimators.step", "estimators and controller are independent"),
        ("thinkcap.controller.queue", "time", "The pure core reads no clock"),
        ("thinkcap.proxy.state", "thinkcap.proxy.control", "Rooms of the proxy"),  # upwards
        ("thinkcap.proxy.control", "thinkcap.proxy.admin", "Rooms of the proxy"),  # across independent rooms
        ("thinkcap.proxy.app", "thinkcap.cli.serve", "Nothing imports the command line"),
        ("thinkcap.proxy.dialects", "thinkcap.proxy.toml_reader", "The dialects are a leaf"),
        ("thinkcap.proxy.state", "redis", "Redis only in the cluster room"),
        ("thinkcap.proxy.control", "aiohttp", "aiohttp only where"),
        ("thinkcap.proxy.state", "grpc", "gRPC (and Envoy's protos) only in the extproc room"),
    ],
)
def test_each_contract_fails_on_a_deliberate_bad_import(importer: str, imported: str, contract: str) -> None:
    """One bad import breaks the contract that forbids it (a contract that could not fail
    would prove nothing)."""
    result = broken([(importer, imported)])
    names = [name for name, is_broken in result.items() if is_broken]
    assert any(name.startswith(contract) for name in names), names
