"""Shared fixtures: paths to the shared data and one local Ray for the whole session; the suite's file order."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with end-to-end (``slow``) tests first, each file's tests kept together and in order.

    ``make test`` runs the suite on two workers by file (``-n 2 --dist loadfile``): starting the long files first
    lets the short ones fill the end instead of one long file running alone at the tail (longest-first scheduling).
    """
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: collection order within each group


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
