"""Shared test helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "calibration_h100.json"


@pytest.fixture(scope="session")
def reference() -> dict:
    if not REFERENCE.exists():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())
