"""The README as a new user meets it: every snippet run in order, as written, in a fresh
virtualenv that holds the package alone (no test extra). .ci/run runs it:

    python3 -m venv .venv-readme && .venv-readme/bin/python .ci/readme.py

It fails on the first snippet that fails, printing what it ran and what came out. What a
snippet cannot do by itself, this script does for it, and only this:

- the README's test command (`python -m pytest ...`) is not run: CI runs the suite itself;
- `pip install` lines run in the repository root (the README is read from there); every other
  command runs in a scratch directory, where a prompts.jsonl is written first (a completion
  line and a chat line) for the `jaxpp generate --input prompts.jsonl` examples;
- `jaxpp serve` runs in the background, and the snippets after it wait for its /health;
- a block whose comment says `pip install torch` gets it first, as .ci/run installs it (the
  pinned CPU build).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the fresh virtualenv's
TORCH = "torch==2.13.0"  # as .ci/run installs it
PROMPTS = [
    {"id": 1, "prompt": "def fibonacci(n):"},
    {"id": 2, "messages": [{"role": "user", "content": "sort a list"}], "max_tokens": 16},
]


def blocks(readme: str) -> list[tuple[str, str]]:
    """The fenced bash and python blocks, in order: (language, text)."""
    return re.findall(r"```(bash|python)\n(.*?)```", readme, re.S)


def commands(text: str) -> list[str]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def run(command: list[str] | str, cwd: Path, env: dict) -> None:
    started = time.monotonic()
    print(f"$ {command if isinstance(command, str) else ' '.join(command)}", flush=True)
    done = subprocess.run(command, cwd=cwd, env=env, shell=isinstance(command, str),
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    print(f"  ({time.monotonic() - started:.0f} s)", flush=True)
    if done.returncode != 0:
        sys.exit(f"failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"jaxpp serve never answered /health (exit code {server.poll()})")


def main() -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    scratch = Path(tempfile.mkdtemp(prefix="readme-"))
    (scratch / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    server = None
    started = time.monotonic()
    try:
        for i, (language, text) in enumerate(blocks((ROOT / "README.md").read_text())):
            if language == "python":
                path = scratch / f"snippet_{i}.py"
                path.write_text(text)
                run([str(BIN / "python"), str(path)], scratch, env)
                continue
            comments = [line for line in text.splitlines() if line.lstrip().startswith("#")]
            if any("pip install torch" in line for line in comments):
                run([str(BIN / "pip"), "install", "-q", TORCH], ROOT, env)
            for command in commands(text):
                if "pytest" in command:
                    continue
                if command.startswith("jaxpp serve"):
                    print(f"$ {command} &", flush=True)
                    server = subprocess.Popen(command.split(), cwd=scratch, env=env)
                    wait_healthy("http://127.0.0.1:8000", server)
                    continue
                run(command, ROOT if command.startswith("pip ") else scratch, env)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=120)
    print(f"every README snippet ran ({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
