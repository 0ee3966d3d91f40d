"""The seed's flat API holds, and importing the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_flat_imports_of_the_seed_api() -> None:
    from pool_managerd import (
        devicemasks,
        drain,
        health,
        hetero_split,
        preflight,
        preload,
        registry,
        supervision,
    )

    assert callable(health.assess)
    assert callable(registry.Registry)
    assert callable(preload.plan_preload) and callable(preload.ready_gate)
    assert callable(drain.at_deadline)
    assert callable(supervision.on_failure)
    assert callable(devicemasks.resolve_mask)
    assert callable(hetero_split.plan_split)
    assert callable(preflight.preflight)


def test_unknown_attribute_is_an_attribute_error() -> None:
    import pool_managerd

    try:
        pool_managerd.nonexistent  # noqa: B018
    except AttributeError as exc:
        assert "nonexistent" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


@pytest.mark.adapter  # runs a process: dearer than its folder
def test_importing_the_package_loads_no_heavy_dependency() -> None:
    # The fake engine imports the package; it must not pull in nats, transitions or pydantic.
    code = (
        "import sys, pool_managerd; print(sorted(m for m in ('nats', 'transitions', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
