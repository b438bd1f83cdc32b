"""Suite-wide rules: a skipped test fails the run.

Every test here must run on a fresh clone with ``pip install -e '.[test]'``: the golden fixtures
of the original code live in ``tests/fixtures/`` and every optional package the tests use is in
the ``test`` extra, so a skip can only mean that something the suite checks went missing.
"""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"FAILED: {len(skipped)} test(s) skipped; every test must run "
                            "(see tests/conftest.py)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
