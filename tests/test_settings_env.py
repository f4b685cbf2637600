"""Settings come from the environment; a bad value stops start-up naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

from config.env import check_url, env_bool, env_int, parse_database_url
from tests.procs import ROOT, child_env


def test_env_bool_and_int_read_good_values(monkeypatch):
    monkeypatch.setenv("X_FLAG", "yes")
    monkeypatch.setenv("X_NUM", "42")
    assert env_bool("X_FLAG") is True
    assert env_int("X_NUM", 1) == 42
    assert env_int("X_MISSING", 7) == 7


@pytest.mark.parametrize(
    ("reader", "value"),
    [(lambda: env_bool("X_BAD"), "maybe"), (lambda: env_int("X_BAD", 1, minimum=0), "-3")],
)
def test_bad_values_name_the_variable(monkeypatch, reader, value):
    monkeypatch.setenv("X_BAD", value)
    with pytest.raises(ImproperlyConfigured, match="X_BAD"):
        reader()


def test_database_url_postgres_and_sqlite():
    pg = parse_database_url("DATABASE_URL", "postgres://u:p%40ss@db.local:6543/app?sslmode=require")
    assert (pg.engine, pg.name, pg.user, pg.password, pg.host, pg.port) == (
        "django.db.backends.postgresql",
        "app",
        "u",
        "p@ss",
        "db.local",
        "6543",
    )
    assert pg.options == {"sslmode": "require"}
    lite = parse_database_url("DATABASE_URL", "sqlite:////tmp/x.sqlite3")
    assert lite.name == "/tmp/x.sqlite3"


def test_bad_database_url_does_not_leak_the_password():
    with pytest.raises(ImproperlyConfigured) as exc:
        parse_database_url("DATABASE_URL", "mysql://root:hunter2@db/app")
    assert "DATABASE_URL" in str(exc.value)
    assert "hunter2" not in str(exc.value)


def test_redis_url_scheme_is_checked():
    with pytest.raises(ImproperlyConfigured, match="REDIS_URL"):
        check_url("REDIS_URL", "http://localhost:6379", {"redis", "rediss"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DATABASE_URL", "mysql://x@y/z"),
        ("REDIS_URL", "localhost:6379"),
        ("CELERY_BROKER_URL", "sqs://nope"),
        ("DEBUG", "sometimes"),
        ("GATEWAY_CONFIG_POLL_INTERVAL", "abc"),
        ("GATEWAY_LOG_FLUSH_INTERVAL", "0"),
    ],
)
def test_start_up_fails_with_a_message_naming_the_variable(tmp_path, name, value):
    proc = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=child_env(**{name: value, "VAR_DIR": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert name in proc.stderr
    assert "ImproperlyConfigured" in proc.stderr


def test_secret_key_is_generated_once_into_var(tmp_path):
    code = "from django.conf import settings; print(settings.SECRET_KEY)"
    env = child_env(
        VAR_DIR=str(tmp_path), SECRET_KEY=None, DJANGO_SETTINGS_MODULE="config.settings"
    )
    run = [sys.executable, "-c", f"import django; django.setup(); {code}"]
    first = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    second = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert len(key) >= 50
    assert second.stdout.strip() == key
    assert (tmp_path / "secret_key").read_text().strip() == key


def test_env_choice(monkeypatch):
    from config.env import env_choice

    monkeypatch.delenv("X_CHOICE", raising=False)
    assert env_choice("X_CHOICE", "a", ("a", "b")) == "a"
    monkeypatch.setenv("X_CHOICE", " B ")
    assert env_choice("X_CHOICE", "a", ("a", "b")) == "b"
    monkeypatch.setenv("X_CHOICE", "c")
    with pytest.raises(ImproperlyConfigured, match="X_CHOICE must be one of a, b"):
        env_choice("X_CHOICE", "a", ("a", "b"))
