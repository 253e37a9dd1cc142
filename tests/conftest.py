"""Every test runs against a temporary medusaforge cache, never the user's ~/.cache/medusaforge.

Converted built-in models and tokenized data go where `MEDUSAFORGE_CACHE` points (models.cache_root
reads it at each call). A session fixture sets it before any other fixture runs (pytest sets up
session fixtures before module ones, autouse first), so module fixtures that train or tokenize
(test_faults' `world`) see it too. One folder serves the whole session: the slow SmolLM2 tests
convert the model into it once. It lives under pytest's own temporary folder and is removed at the
end; a run killed before then leaves it where pytest's retention removes old runs.
"""

from __future__ import annotations

import os
import shutil

import pytest

CACHE_VARIABLE = "MEDUSAFORGE_CACHE"


@pytest.fixture(scope="session", autouse=True)
def temporary_cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("medusaforge-cache", numbered=False)
    user_setting = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = str(directory)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
    if user_setting is None:
        os.environ.pop(CACHE_VARIABLE, None)
    else:
        os.environ[CACHE_VARIABLE] = user_setting


# A test or fixture that set the variable and then deleted it rather than restoring it (as
# test_distributed's module fixture does) would send everything after it to the user's cache; these
# put it back before each module's fixtures and before each test.
@pytest.fixture(scope="module", autouse=True)
def temporary_cache_for_module_fixtures(temporary_cache):
    os.environ[CACHE_VARIABLE] = str(temporary_cache)


@pytest.fixture(autouse=True)
def temporary_cache_for_each_test(temporary_cache):
    os.environ[CACHE_VARIABLE] = str(temporary_cache)
