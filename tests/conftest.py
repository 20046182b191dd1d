"""Shared fixtures: paths to the shared data and one local Ray for the whole session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


@pytest.fixture(scope="session")
def museum() -> Path:
    """The museum-landmarks benchmark folder (skips when absent)."""
    if not (DATA / "gnd.json").exists():
        pytest.skip("museum-landmarks data not available")
    return DATA


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray (2 CPUs, no dashboard) shared by every test that needs one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}})
    yield ray
