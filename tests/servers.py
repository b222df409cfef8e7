"""Real server processes for tests that need one (embedded boot, browser tests)."""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "PYTEST_CURRENT_TEST", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    }
    env.update({"DJANGO_SETTINGS_MODULE": "core.settings", "PYTHONUNBUFFERED": "1"})
    env.update(overrides)
    return env


def database_url() -> str:
    """The test database, as the processes a test starts are told where it is."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def seed_demo_for_servers(password: str = "runwarden") -> None:
    """What ``manage.py seed_demo`` gives a server process, written by the test itself: the demo
    tenants, users and sandbox, with the passwords hashed as a server checks them. The tests'
    settings hash with MD5, which a server (Django's default hashers) refuses, and a
    ``seed_demo`` process hashing with PBKDF2 took 4-5 s per browser test; the PBKDF2 hash is
    made once a session instead."""
    from django.contrib.auth import get_user_model

    from demo.seeding import DEMO_USERS, seed_demo_tenants_and_users

    seed_demo_tenants_and_users(password=password)
    usernames = [username for username, _, _ in DEMO_USERS]
    get_user_model().objects.filter(username__in=usernames).update(password=_server_password_hash(password))


@functools.cache
def _server_password_hash(password: str) -> str:
    from django.contrib.auth.hashers import PBKDF2PasswordHasher

    hasher = PBKDF2PasswordHasher()  # the first of Django's default PASSWORD_HASHERS
    return hasher.encode(password, hasher.salt())


def wait_for_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout}s")
        time.sleep(0.2)


@contextmanager
def running_process(
    args: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a process in its own group; always stop it (by pid), or pytest would hang."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)


@contextmanager
def console_server(env: dict[str, str], log_path: Path, workers: int = 1) -> Iterator[str]:
    """``manage.py serve`` on a free port; yields its base URL once /healthz answers."""
    port = free_port()
    args = [sys.executable, "manage.py", "serve", "--port", str(port), "--workers", str(workers)]
    with running_process(args, env, log_path):
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(url + "/healthz")
        except TimeoutError:
            raise AssertionError(log_path.read_text()) from None
        yield url
