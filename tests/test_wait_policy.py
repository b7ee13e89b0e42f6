"""import cpbench sets OMP_WAIT_POLICY only where it takes effect, and only as asked."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _policy_after(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "CPBENCH_OMP_WAIT_POLICY")}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env=full, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("env,expected", [
    ({}, "PASSIVE"),                                   # the package default
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE"),          # the user's value wins
    ({"CPBENCH_OMP_WAIT_POLICY": "default"}, "None"),   # libgomp's own default
    ({"CPBENCH_OMP_WAIT_POLICY": "active"}, "ACTIVE"),
])
def test_policy_set_before_torch_loads(env, expected):
    assert _policy_after("import cpbench", **env) == expected


def test_not_set_when_torch_is_already_loaded():
    # libgomp has read its policy already: setting it now would only make the results record a lie
    assert _policy_after("import torch, cpbench") == "None"
