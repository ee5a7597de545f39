"""Schemathesis against the app's own OpenAPI schema: no 5xx, answers conform to the schema.

Kept small (30 examples per operation). The run endpoints are fuzzed with a server token set
and none sent, so they answer 401 and never start training.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.settings import Settings

pytestmark = pytest.mark.slow

_tmp = Path(tempfile.mkdtemp(prefix="foldplan-fuzz-"))
app = create_app(Settings(db=f"sqlite:///{_tmp / 'fuzz.db'}", run_dir=_tmp / "runs",
                          api_token="fuzz-token", plan_time_limit_s=1, plan_time_cap_s=1,
                          plan_grace_s=3))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)
# Plans run the planner (up to the 1 s cap each): examples + random fuzzing only, without the
# coverage phase's hundreds of boundary cases (those run on the cheap operations above).
plans_schema = schemathesis.openapi.from_asgi("/openapi.json", app)
plans_schema.config.phases.coverage.enabled = False
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]


# No shrinking: a failure is reported with the example as found, which keeps the run short.
_SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                 phases=[Phase.explicit, Phase.generate])


@schema.exclude(method="POST", path="/v1/plans").parametrize()
@settings(max_examples=30, **_SETTINGS)
def test_api_never_fails_on_generated_input(case):
    case.call_and_validate(checks=CHECKS)


@plans_schema.include(method="POST", path="/v1/plans").parametrize()
@settings(max_examples=10, **_SETTINGS)
def test_plans_never_fail_on_generated_input(case):
    """Fewer examples: each one may run the planner for up to its (capped) time limit."""
    case.call_and_validate(checks=CHECKS)
