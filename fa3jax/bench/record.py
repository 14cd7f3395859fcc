"""The markdown section of a run (device, date, commit, command, table) and its appending to RESULTS.md."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .env import REPO_ROOT

def default_results_md() -> Path:
    """benchmarks/RESULTS.md of the checkout we run in (cwd), else of the tree this module lives in."""
    here = Path.cwd() / "benchmarks"
    return (here if here.is_dir() else REPO_ROOT / "benchmarks") / "RESULTS.md"


def markdown_section(table: str, env: dict, suite: str) -> str:
    return (
        f"\n## {suite}: {env['device_kind']} -- {env['date']}\n\n"
        f"- device: {env['device_kind']} ({env['platform']}), jax {env['jax']}, fa3jax {env['fa3jax']}, "
        f"flash-attn3-jax {env['flash_attn3_jax'] or 'not installed'}\n"
        f"- commit: {env['commit'] or 'unknown'}\n"
        f"- command: `{env['command']}`\n\n"
        f"{table}\n"
    )


def record_markdown(table: str, env: dict, suite: str, path: Optional[Path] = None) -> Path:
    """Append a section (device, date, commit, command, table) to ``benchmarks/RESULTS.md``."""
    path = Path(path) if path else default_results_md()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(markdown_section(table, env, suite))
    return path
