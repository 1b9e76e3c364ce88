"""uvicorn's access lines lose their query string (issue 14 row 4: ``?api_key=`` was logged)."""

from __future__ import annotations

import logging

import pytest

from deploy.runtime._entry import QueryStringFilter


def test_the_access_line_keeps_the_path_and_drops_the_query(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.access")
    logger.addFilter(QueryStringFilter())
    with caplog.at_level(logging.INFO, logger="test.access"):
        # uvicorn's own call: logger.info('%s - "%s %s HTTP/%s" %d', client, method, path, version, code)
        logger.info(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/v1/models?api_key=SECRET&x=1", "1.1", 401
        )
        logger.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/health", "1.1", 200)
    assert caplog.messages == [
        '127.0.0.1:5 - "GET /v1/models?<query removed> HTTP/1.1" 401',
        '127.0.0.1:5 - "GET /health HTTP/1.1" 200',
    ]
    assert "SECRET" not in caplog.text


def test_a_real_uvicorn_access_line_has_no_query(caplog: pytest.LogCaptureFixture) -> None:
    """uvicorn's access logger with the filter serve() installs, fed by uvicorn's own protocol code."""
    from uvicorn.protocols.utils import get_path_with_query_string

    scope = {"path": "/v1/models", "query_string": b"api_key=SECRET", "root_path": ""}
    access = logging.getLogger("uvicorn.access")
    access.addFilter(QueryStringFilter())
    try:
        with caplog.at_level(logging.INFO, logger="uvicorn.access"):
            access.info('%s - "%s %s HTTP/%s" %d', "c", "GET", get_path_with_query_string(scope), "1.1", 401)  # type: ignore[arg-type]
    finally:
        access.filters.clear()
    assert "SECRET" not in caplog.text and "/v1/models?<query removed>" in caplog.text
