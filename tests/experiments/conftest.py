"""Fixtures for experiment tests (the helpers themselves are in ``helpers.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.experiments.helpers import mlflow_server


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking server with a sqlite backend, shared by a test module."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as url:
        yield url
