"""One interactive shell (bash, zsh or fish) under a real terminal, driven by pexpect and
synchronised on prompt markers, never on sleeps: the cd hooks' tests type into it as a person
does (tests/test_shell_hooks.py, tests/test_attack_r11.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import require_tool

pexpect = pytest.importorskip("pexpect")

ARGS = {"bash": ["--norc", "--noprofile", "-i"], "zsh": ["-f", "-i"], "fish": ["--no-config", "-i"]}


class PromptShell:
    """``kind`` started without the user's config, its prompt set to ``prompt``."""

    def __init__(self, kind: str, prompt: str, cwd: Path, env: dict):
        self.kind, self.prompt = kind, prompt
        self.p = pexpect.spawn(require_tool(kind), ARGS[kind], cwd=str(cwd), env=env, encoding="utf-8", timeout=60,
                               dimensions=(40, 250), codec_errors="replace")
        if kind == "bash":
            self.p.sendline(f"PS1='{prompt} '; PROMPT_COMMAND=")
        elif kind == "zsh":
            self.p.sendline(f"PROMPT='{prompt} '; unsetopt zle 2>/dev/null")
        else:
            self.p.sendline(f"function fish_prompt; echo -n '{prompt} '; end; set -g fish_greeting")
        self.sync()

    def sync(self) -> str:
        """Wait until the shell is idle at a prompt; returns what it printed before it."""
        token = "SYNC" + os.urandom(4).hex()
        self.p.sendline(f"echo {token[:6]}''{token[6:]}")
        self.p.expect_exact(token)
        before = self.p.before
        self.p.expect_exact(self.prompt)
        return before

    def run(self, line: str) -> str:
        """Type a line, wait until it is done; returns its output (with the echoed line)."""
        self.p.sendline(line)
        return self.sync()

    def close(self) -> None:
        if self.p.isalive():
            self.p.sendline("exit")
        self.p.close(force=True)
