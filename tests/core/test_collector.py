"""The long-running processes keep what they loaded at start out of full collections."""

from __future__ import annotations

import os
import subprocess
import sys

from core.collector import YOUNGEST_THRESHOLD


def test_the_web_process_freezes_what_it_loaded_and_collects_its_youngest_generation_less_often() -> None:
    probe = (
        "import gc; import core.asgi; "
        "print(gc.get_freeze_count(), gc.get_threshold()[0], len(gc.get_objects(generation=2)))"
    )
    answer = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert answer.returncode == 0, answer.stderr
    frozen, youngest, oldest = (int(n) for n in answer.stdout.split())
    assert frozen > 50_000  # Django, the apps, the workflows: out of every full collection
    assert youngest == YOUNGEST_THRESHOLD
    assert oldest < frozen / 10  # what a full collection still walks
