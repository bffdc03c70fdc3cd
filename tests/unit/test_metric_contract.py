"""The metric contract (app/metrics.CONTRACT) is what the server exports and what docs/operations.md
documents, in both directions; deploy/checks/ holds the dashboard, alerts and autoscaler to the same
contract (tests/deployment/)."""

from __future__ import annotations

import re
from pathlib import Path

from app.metrics import CONTRACT, Metrics

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
_ROW = re.compile(r"^\| `(paligemma_\w+)` \| (\w+) \| ([^|]*) \|", re.M)


def _exported(spec) -> str:
    return spec.samples[0] if spec.kind == "counter" else spec.name


def test_the_server_exports_exactly_the_contract():
    text = Metrics().render().decode()
    declared = dict(re.findall(r"(?m)^# TYPE (paligemma_\w+) (\w+)$", text))
    assert declared == {_exported(spec): spec.kind for spec in CONTRACT}


def test_the_docs_document_exactly_the_contract_with_types_and_labels():
    documented = {name: (kind, re.findall(r"`(\w+)`", labels))
                  for name, kind, labels in _ROW.findall(OPERATIONS.read_text())}
    contract = {_exported(spec): (spec.kind, list(spec.labels)) for spec in CONTRACT}
    assert documented == contract
