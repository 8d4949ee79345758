"""Fail closed: a ``broker serve`` with an unknown ``BROKER_*`` variable, or a key
setting it cannot use, exits at start with an error naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import api.settings
from api.app import create_app
from api.settings import Settings, SettingsRefused
from tests.support.broker_process import BROKER_BIN, BrokerProcess
from tests.support.redis_server import free_port
from tests.support.tokens import SECRET, KeyPair

RSA_PEM = KeyPair.rsa().public_pem.decode()
JWKS_URL = "https://idp.test/.well-known/jwks.json"  # (never fetched: the start is refused)
START_TIMEOUT_SECONDS = 30
REPO_ROOT = Path(__file__).resolve().parents[2]


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run([str(BROKER_BIN), "serve", "--port", str(free_port())], env)


def _uvicorn_factory(
    env: dict[str, str], options: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``uvicorn --factory api.app:create_app``, as the README says to run it bare."""
    factory = ["--factory", "api.app:create_app", "--port", str(free_port()), *options]
    return _run([sys.executable, "-m", "uvicorn", *factory], env)


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end (bounded), with ``env`` as its only BROKER_ variables."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("BROKER_")}
    return subprocess.run(
        command,
        env=clean | env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_SECONDS,
        check=False,
    )


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"BROKER_JWT_SECRT": SECRET}, "BROKER_JWT_SECRT"),
        ({"BROKER_PUBLIC_TOPIC": "news"}, "BROKER_PUBLIC_TOPIC"),
        ({"broker_cors_origin": "https://a.test"}, "broker_cors_origin"),
        ({"BROKER_JWT_SECRET": ""}, "BROKER_JWT_SECRET"),
        ({"BROKER_JWT_SECRET": "   "}, "BROKER_JWT_SECRET"),
        ({"BROKER_JWT_SECRET": "too-short"}, "BROKER_JWT_SECRET"),
        ({"BROKER_JWT_PUBLIC_KEY": "/nonexistent/key.pem"}, "BROKER_JWT_PUBLIC_KEY"),
        ({"BROKER_JWT_PUBLIC_KEY": RSA_PEM.replace("A", "!", 3)}, "BROKER_JWT_PUBLIC_KEY"),
        ({"BROKER_JWT_PUBLIC_KEY": ""}, "BROKER_JWT_PUBLIC_KEY"),
        ({"BROKER_JWT_JWKS_URL": "file:///etc/passwd"}, "BROKER_JWT_JWKS_URL"),
        ({"BROKER_JWT_JWKS_URL": "jwks.example.com/keys"}, "BROKER_JWT_JWKS_URL"),
        ({"BROKER_JWT_SECRET": SECRET, "BROKER_JWT_AUDIENCE": ""}, "BROKER_JWT_AUDIENCE"),
        ({"BROKER_JWT_SECRET": SECRET, "BROKER_JWT_PUBLIC_KEY": RSA_PEM}, "BROKER_JWT_SECRET"),
        ({"BROKER_JWT_JWKS_URL": "https://idp.test:abc/jwks"}, "BROKER_JWT_JWKS_URL"),
        ({"BROKER_JWT_JWKS_URL": "https://idp test/jwks"}, "BROKER_JWT_JWKS_URL"),
        ({"BROKER_JWT_SECRET": RSA_PEM}, "BROKER_JWT_SECRET"),
        # Settings that mean authorization is wanted, with the key's variable lost:
        ({"BROKER_JWT_AUDIENCE": "broker"}, "BROKER_JWT_AUDIENCE"),
        ({"BROKER_JWT_ISSUER": "https://idp.test"}, "BROKER_JWT_ISSUER"),
        ({"BROKER_PUBLIC_TOPICS": "news"}, "BROKER_PUBLIC_TOPICS"),
        ({"BROKER_JWT_LEEWAY_SECONDS": "30"}, "BROKER_JWT_LEEWAY_SECONDS"),
        ({"BROKER_JWT_SECRET": SECRET, "BROKER_JWT_LEEWAY_SECONDS": "-1"}, "LEEWAY"),
        # A key set trusted for ever while fetches fail, or a bound that bounds nothing:
        ({"BROKER_JWT_JWKS_URL": JWKS_URL, "BROKER_JWT_JWKS_MAX_STALE_SECONDS": "5"}, "STALE"),
        ({"BROKER_JWT_JWKS_URL": JWKS_URL, "BROKER_JWT_JWKS_MAX_STALE_SECONDS": "inf"}, "STALE"),
        ({"BROKER_JWT_JWKS_URL": JWKS_URL, "BROKER_JWT_JWKS_MAX_STALE_SECONDS": "1e9"}, "STALE"),
        ({"BROKER_JWT_JWKS_URL": JWKS_URL, "BROKER_JWT_JWKS_MAX_STALE_SECONDS": "x"}, "STALE"),
        ({"BROKER_JWT_JWKS_MAX_STALE_SECONDS": "600"}, "BROKER_JWT_JWKS_MAX_STALE_SECONDS"),
        ({"BROKER_JWT_SECRET": SECRET, "BROKER_JWT_JWKS_MAX_STALE_SECONDS": "600"}, "STALE"),
        ({"BROKER_CORS_ORIGINS": "*"}, "BROKER_CORS_ORIGINS"),
        ({"BROKER_CORS_ORIGINS": "https://a.test/app"}, "BROKER_CORS_ORIGINS"),
        ({"BROKER_ALLOWED_HOSTS": "https://events.test"}, "BROKER_ALLOWED_HOSTS"),
        ({"BROKER_ALLOWED_HOSTS": "events.test:8000"}, "BROKER_ALLOWED_HOSTS"),
        ({"BROKER_ALLOWED_HOSTS": "*"}, "BROKER_ALLOWED_HOSTS"),
        ({"BROKER_ALLOWED_HOST": "events.test"}, "BROKER_ALLOWED_HOST"),
        # An empty host listened on every interface, in silence:
        ({"BROKER_HOST": ""}, "BROKER_HOST"),
        # Huge values were a traceback at start, or a broker failing every request:
        ({"BROKER_HEAD_TIMEOUT_SECONDS": "1e308"}, "BROKER_HEAD_TIMEOUT_SECONDS"),
        ({"BROKER_PUBLISH_TIMEOUT_SECONDS": "1e308"}, "BROKER_PUBLISH_TIMEOUT_SECONDS"),
        ({"BROKER_RETENTION_SECONDS": "1e308"}, "BROKER_RETENTION_SECONDS"),
        ({"BROKER_IDEMPOTENCY_SECONDS": "1" + "0" * 20}, "BROKER_IDEMPOTENCY_SECONDS"),
        ({"BROKER_TOPIC_POLICIES": '[{"pattern": "*", "ttl_seconds": 1e17}]'}, "POLICIES"),
        ({"BROKER_WORKERS": "1000000"}, "BROKER_WORKERS"),
        # A Redis URL the store cannot use was a traceback naming no setting:
        ({"BROKER_REDIS_URL": "http://redis.test"}, "BROKER_REDIS_URL"),
        ({"BROKER_REDIS_URL": "127.0.0.1:6379"}, "BROKER_REDIS_URL"),
        ({"BROKER_REDIS_URL": " "}, "BROKER_REDIS_URL"),
        # Empty (a secret that rendered nothing) gave each instance an embedded store:
        ({"BROKER_REDIS_URL": ""}, "BROKER_REDIS_URL"),
        ({"BROKER_REDIS_URL": "redis://127.0.0.1:6379/0?bogus=1"}, "BROKER_REDIS_URL"),
        ({"BROKER_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:abc/0"}, "BROKER_REDIS_URL"),
        # Streams whose reconnects the head limit refuses (431: an EventSource stops):
        ({"BROKER_MAX_TOPICS_PER_SUBSCRIPTION": "80"}, "BROKER_MAX_HEAD_BYTES"),
        ({"BROKER_MAX_HEAD_BYTES": "8192"}, "BROKER_MAX_TOPICS_PER_SUBSCRIPTION"),
        # A time of "inf" turned off what it bounds (heartbeats, the end at exp):
        ({"BROKER_HEARTBEAT_SECONDS": "inf"}, "BROKER_HEARTBEAT_SECONDS"),
        ({"BROKER_BODY_TIMEOUT_SECONDS": "Infinity"}, "BROKER_BODY_TIMEOUT_SECONDS"),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, dict) else None,
)
def test_a_setting_it_cannot_use_stops_the_broker(env: dict[str, str], named: str) -> None:
    result = _serve(env)
    assert result.returncode != 0, result.stderr
    assert named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert SECRET not in result.stderr, "the secret is in the error"


def test_an_idempotency_window_an_ingests_pause_outlasts_stops_the_broker() -> None:
    """A streaming ingest may pause BROKER_BODY_TIMEOUT_SECONDS between lines: one that
    paused past BROKER_IDEMPOTENCY_SECONDS began a new ingest record at its next line,
    and its resend stored its first lines twice. Refused at start, naming both."""
    result = _serve({"BROKER_IDEMPOTENCY_SECONDS": "59", "BROKER_BODY_TIMEOUT_SECONDS": "30"})
    assert result.returncode != 0, result.stderr
    assert "BROKER_IDEMPOTENCY_SECONDS=59" in result.stderr, result.stderr
    assert "BROKER_BODY_TIMEOUT_SECONDS=30" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # Twice the pause is enough (and the defaults, an hour and 30 s, are).
    Settings(idempotency_seconds=60, body_timeout_seconds=30)
    Settings()


def test_an_unreadable_key_file_stops_the_broker(tmp_path: Path) -> None:
    key_file = tmp_path / "public.pem"
    key_file.write_text(RSA_PEM)
    key_file.chmod(0)
    if os.access(key_file, os.R_OK):  # root reads anything: make it a directory instead
        key_file.chmod(0o600)
        key_file.unlink()
        key_file.mkdir()
    result = _serve({"BROKER_JWT_PUBLIC_KEY": str(key_file)})
    assert result.returncode != 0
    assert "BROKER_JWT_PUBLIC_KEY" in result.stderr and "cannot read" in result.stderr


def test_the_command_line_clients_variables_are_known_and_ignored() -> None:
    env = {"BROKER_URL": "http://127.0.0.1:1", "BROKER_TOKEN": "for-the-cli"}
    process = BrokerProcess(env=env).start()
    try:
        assert process.process is not None and process.process.poll() is None
    finally:
        process.close()


def test_create_app_refuses_an_unknown_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``uvicorn --factory api.app:create_app`` reads the environment the same way."""
    monkeypatch.setenv("BROKER_JWT_AUDIENCES", "x")
    with pytest.raises(SettingsRefused, match="BROKER_JWT_AUDIENCES"):
        create_app()


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"BROKER_JWT_SECRT": SECRET}, "invalid settings: unknown setting BROKER_JWT_SECRT"),
        ({"BROKER_PORT": "eighty"}, "invalid settings: BROKER_PORT: Input should be"),
        (
            {"BROKER_JWT_SECRET": SECRET, "BROKER_CORS_ORIGINS": "*"},
            "invalid settings: BROKER_CORS",
        ),
        ({"BROKER_TOPIC_POLICIES": "[{"}, "BROKER_TOPIC_POLICIES is not readable"),
    ],
    ids=["mistyped-variable", "bad-value", "bad-security-value", "unreadable-json"],
)
def test_uvicorn_with_the_factory_refuses_bad_settings_in_one_line(
    env: dict[str, str], said: str
) -> None:
    """It printed pydantic's traceback (the variable named by its field, ``port``, in
    the middle of it) where ``broker serve`` says one line naming the variable."""
    result = _uvicorn_factory(env)
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"broker: {said}"), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "pydantic" not in result.stderr.lower(), result.stderr
    assert "Uvicorn running" not in result.stderr, "it started, settings refused or not"
    assert SECRET not in result.stderr, "the secret is in the error"


def test_uvicorn_with_workers_stops_on_bad_settings_rather_than_restarting_them() -> None:
    """``uvicorn --factory api.app:create_app --workers 2``: each worker reads the
    settings, and one that exits is started again by uvicorn's supervisor, for ever (the
    refusal printed again every half second), unless its exit status is uvicorn's for a
    worker that cannot start (3). So it stops, said once per worker."""
    env = {"BROKER_PUBLISH_TIMEOUT_SECONDS": "-1"}
    try:
        result = _uvicorn_factory(env, ("--workers", "2"))
    except subprocess.TimeoutExpired as running:
        said = (running.stderr or b"").decode(errors="replace")
        refusals = said.count("BROKER_PUBLISH_TIMEOUT_SECONDS")
        raise AssertionError(f"still running, refused {refusals} times: {said[-600:]}") from None
    # (uvicorn's supervisor itself then exits with status 0: its own, not the workers')
    refusals = [line for line in result.stderr.splitlines() if line.startswith("broker: ")]
    assert 1 <= len(refusals) <= 2, result.stderr
    assert "BROKER_PUBLISH_TIMEOUT_SECONDS" in refusals[0], result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_create_app_keeps_the_traceback_of_anything_but_a_settings_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug reading the settings is no refusal to start: it is not hidden in one line."""

    def broken_settings() -> Settings:
        raise RuntimeError("a bug, not a setting")

    monkeypatch.setattr(api.settings, "Settings", broken_settings)
    with pytest.raises(RuntimeError, match="a bug, not a setting"):
        create_app()


@pytest.mark.parametrize(
    ("mistake", "secret_setting", "secret"),
    [
        ({"BROKER_CORS_ORIGN": "https://a.test"}, "BROKER_JWT_SECRET", SECRET),
        ({"BROKER_RETENTON_MAXLEN": "5"}, "BROKER_REDIS_URL", "redis://:hunter2-s3cret@db:6379"),
    ],
)
def test_a_settings_error_does_not_print_the_secrets(
    monkeypatch: pytest.MonkeyPatch, mistake: dict[str, str], secret_setting: str, secret: str
) -> None:
    """Started as ``uvicorn --factory api.app:create_app``, a mistyped variable printed
    pydantic's error, with the settings it was given: half the JWT secret (or the
    password in the Redis URL) went to the log."""
    for name, value in {**mistake, secret_setting: secret}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsRefused) as raised:
        create_app()
    shown = str(raised.value)
    assert next(iter(mistake)) in shown.upper()
    for part in (secret[:8], secret[-8:], "hunter2"):
        assert part not in shown, shown


def test_the_log_level_is_taken_in_any_case() -> None:
    """``BROKER_LOG_LEVEL=INFO`` was refused (only lower case was known)."""
    assert Settings(log_level="INFO").log_level == "info"
    assert Settings(log_level=" Debug ").log_level == "debug"
