"""A tracking URL with credentials works, and its password is never printed (issue 32: `cotune run`, `compare`,
`review` and `--tracking-uri` printed ``cannot reach the MLflow tracking server at http://user:secret@...``, and
such a URL could not pass the reachability check, which read the credentials as part of the host)."""

from __future__ import annotations

import base64
import http.server
import logging
import socket
import threading

import pytest

from experiments.tracking import TrackingError, check_tracking_uri, describe_store, redact

SECRET = "s3cr@t/pw"


@pytest.mark.parametrize("uri, shown", [
    ("http://bob:s3cret@127.0.0.1:5000", "http://bob:***@127.0.0.1:5000"),
    (f"https://bob:{SECRET}@mlflow.example:443/path", "https://bob:***@mlflow.example:443/path"),
    ("postgresql+psycopg://bob:s3cret@db:5432/optuna", "postgresql+psycopg://bob:***@db:5432/optuna"),
    ("postgresql+psycopg://optuna@db-host/optuna", "postgresql+psycopg://optuna@db-host/optuna"),
    ("sqlite:///runs/a@b/mlflow.db", "sqlite:///runs/a@b/mlflow.db"),
    (f"request to http://bob:{SECRET}@h:1/api failed; retried http://amy:x@h:2/api",
     "request to http://bob:***@h:1/api failed; retried http://amy:***@h:2/api"),
])
def test_redact_hides_every_password_even_with_at_signs_and_slashes(uri, shown):
    assert redact(uri) == shown


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_named_without_its_password():
    uri = f"http://bob:{SECRET}@127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server") as err:
        check_tracking_uri(uri, timeout=2)
    assert SECRET not in str(err.value) and "bob:***@127.0.0.1" in str(err.value)
    assert SECRET not in describe_store(uri)


class _BasicAuthHealth(http.server.BaseHTTPRequestHandler):
    """Answers /health 200 only to the right Basic credentials, 401 otherwise (what a proxy in front of MLflow does)."""

    expected = "Basic " + base64.b64encode(f"bob:{SECRET}".encode()).decode()
    seen: list[str | None] = []

    def do_GET(self):  # noqa: N802 - the stdlib's name
        self.seen.append(self.headers.get("Authorization"))
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"")

    def log_message(self, *args):
        pass


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_logged(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own listing fails here: do not back off
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://bob:{SECRET}@127.0.0.1:{server.server_address[1]}"
        with caplog.at_level(logging.WARNING):
            check_tracking_uri(uri, timeout=5)  # /health lets it in; MLflow's own listing then fails: a warning
        assert _BasicAuthHealth.seen[0] == _BasicAuthHealth.expected
        assert SECRET not in caplog.text
        with pytest.raises(TrackingError, match="refused the request") as err:  # a wrong password: refused, hidden
            check_tracking_uri(f"http://bob:wrong-{SECRET}@127.0.0.1:{server.server_address[1]}", timeout=5)
        assert SECRET not in str(err.value)
    finally:
        server.shutdown()
