"""FMS's `--capture_expectation` option for its model test suites (as FMS's tests/conftest.py).

Run `pytest tests/models --capture_expectation` once to (re)write the expectation files under
tests/resources/expectations after an intended change of the weights or the output; the
capturing run fails on purpose, and the next plain run checks against what it wrote.
"""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--capture_expectation",
        action="store_true",
        default=False,
        help="write the expected outputs and weight keys of FMS's model test suites",
    )


@pytest.fixture(scope="session")
def capture_expectation(request) -> bool:
    # getoption's default covers a run started above tests/models, where this file's option
    # is registered too late to be parsed
    return bool(request.config.getoption("--capture_expectation", default=False))
