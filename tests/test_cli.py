"""The `claudepool` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAKE_CLAUDE


def claudepool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "claudepool", *args], capture_output=True, text=True, timeout=60)


def test_check_passes_on_a_protocol_faithful_cli() -> None:
    done = claudepool("check", "--claude", str(FAKE_CLAUDE))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"ok: {FAKE_CLAUDE} is ready in ")
    assert "resets in" in done.stdout


def test_check_fails_on_a_cli_that_runs_marked_prompts_as_commands(tmp_path: Path) -> None:
    wrapper = tmp_path / "claude"
    wrapper.write_text(f"#!/bin/sh\nFAKE_CLAUDE_FAULTS=ignore_text_not_typed exec {FAKE_CLAUDE} \"$@\"\n")
    wrapper.chmod(0o755)
    done = claudepool("check", "--claude", str(wrapper))
    assert done.returncode == 1
    assert "ran the prompt as /model" in done.stderr


def test_check_fails_clearly_on_a_missing_binary() -> None:
    done = claudepool("check", "--claude", "/nonexistent/claude")
    assert done.returncode == 1
    assert "cannot execute '/nonexistent/claude'" in done.stderr


@pytest.mark.real_cli
def test_check_passes_on_the_real_cli(real_claude: str) -> None:
    done = claudepool("check", "--claude", real_claude)
    assert done.returncode == 0, done.stderr
    assert "PSS" in done.stdout


def test_version() -> None:
    done = claudepool("version")
    assert done.returncode == 0
    assert done.stdout.strip() == "0.1.0"
