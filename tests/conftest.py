"""Every test runs against a temporary medusaforge cache, never the user's ~/.cache/medusaforge.

Converted built-in models and tokenized data go where `MEDUSAFORGE_CACHE` points (models.cache_root
reads it at each call). It is set here when pytest configures, before any fixture of any scope runs,
so module fixtures that train or tokenize (test_faults' `world`) see it too. One folder serves the
whole session: the slow SmolLM2 tests convert the model into it once, and it is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

CACHE_VARIABLE = "MEDUSAFORGE_CACHE"
TEMPORARY_CACHE = pytest.StashKey[str]()
USER_SETTING = pytest.StashKey[str | None]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[USER_SETTING] = os.environ.get(CACHE_VARIABLE)
    config.stash[TEMPORARY_CACHE] = tempfile.mkdtemp(prefix="medusaforge-test-cache-")
    os.environ[CACHE_VARIABLE] = config.stash[TEMPORARY_CACHE]


def pytest_unconfigure(config: pytest.Config) -> None:
    if TEMPORARY_CACHE not in config.stash:
        return
    shutil.rmtree(config.stash[TEMPORARY_CACHE], ignore_errors=True)
    user_setting = config.stash[USER_SETTING]
    if user_setting is None:
        os.environ.pop(CACHE_VARIABLE, None)
    else:
        os.environ[CACHE_VARIABLE] = user_setting


def point_at_temporary_cache(config: pytest.Config) -> None:
    # A test or fixture that set the variable and then deleted it (rather than restoring it) would
    # send everything after it to the user's cache; this puts it back.
    os.environ[CACHE_VARIABLE] = config.stash[TEMPORARY_CACHE]


@pytest.fixture(scope="module", autouse=True)
def temporary_cache_for_module_fixtures(pytestconfig):
    """Runs before the module's own module-scoped fixtures (autouse fixtures of a scope come first)."""
    point_at_temporary_cache(pytestconfig)


@pytest.fixture(autouse=True)
def temporary_cache_for_each_test(pytestconfig):
    point_at_temporary_cache(pytestconfig)
