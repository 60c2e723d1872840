"""The ``remote_data`` marker and the ``--remote-data`` option.

Tests that talk to real services carry ``@pytest.mark.remote_data`` and are skipped unless
pytest runs with ``--remote-data`` (the astropy convention, without needing pytest-remotedata).
"""

import pytest


def pytest_addoption(parser):
    parser.addoption("--remote-data", action="store_true", default=False,
                     help="run tests that reach real remote services (SkyView, MAST, CDS)")


def pytest_configure(config):
    config.addinivalue_line("markers", "remote_data: test needs internet access to real services")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--remote-data"):
        return
    skip = pytest.mark.skip(reason="needs --remote-data")
    for item in items:
        if "remote_data" in item.keywords:
            item.add_marker(skip)
