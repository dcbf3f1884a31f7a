"""Shared fixtures.

The suite runs with no network except loopback (tests/network_guard.py) and
builds the ``tiny`` profile once per run (cached under artifacts/tiny, reused
by later runs while its inputs are unchanged).
"""

import pytest
import torch

# No network in the test run except loopback.
pytest_plugins = ["network_guard"]


@pytest.fixture(scope="session")
def tiny_build():
    """The tiny profile's corpus, manifests and published base recognizer (ProfilePaths)."""
    from sbtemplate.build import build

    torch.set_flush_denormal(True)
    return build("tiny", progress=False)
