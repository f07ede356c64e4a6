"""A Python script run in a guest by `harness boot`, for the VM tests."""

import json
import subprocess
import sys
from pathlib import Path

HARNESS = [sys.executable, "-m", "harness.cli"]


def run_script(tmp_path: Path, source: str, name: str = "check.py") -> str:
    """Runs source with the project's Python in a guest; its stdout (the
    process must exit 0)."""
    script = tmp_path / name
    script.write_text(source)
    r = subprocess.run([*HARNESS, "boot", "--", sys.executable, str(script)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout


def tagged_json(out: str, tag: str) -> dict:
    """The JSON the script printed after `tag `."""
    return json.loads(out.split(f"{tag} ", 1)[1])
