"""The node agent's start-up budget, checked the way CPython's test_site
checks what start-up imports: a guest runs the agent under `python -S`
(harness.nodes.runners), and in a TCG guest every module costs ~20 times
what it costs on the host, so the heavy ones wait until a request needs them."""

import subprocess
import sys
from pathlib import Path

import harness

ROOT = Path(harness.__file__).resolve().parent.parent

# Up to READY, a pnode or mnode agent loads none of these (a package counts
# with its submodules); the snode loads DBOS, its job.
HEAVY = {
    "logging": "~0.25 s in a guest; the agent's log() prints to stderr",
    "typing": "~60 ms in a guest; role.py's annotations are strings",
    "dataclasses": "the agent's spec classes are plain classes",
    "base64": "EXEC imports it when it runs a command",
    "subprocess": "EXEC and the pnode's tasks import it when they run one",
    "sqlite3": "DBOS's, for the snode only",
    "harness.dbos": "seconds in a guest; the pnode's task worker imports it after READY",
    "harness.nodes.cluster": "the controller's machinery",
    "harness.topology": "the controller's machinery",
    "harness.vm": "the controller's machinery",
    "asyncio": "the VM layer's (QMP)",
    "qemu": "the VM layer's (QMP)",
    "pexpect": "the VM layer's (consoles)",
}


def loaded_at_startup(*modules: str) -> set[str]:
    """sys.modules after importing `modules` as a guest does: no site.py
    (and, here, nothing from the environment either)."""
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}]; import {', '.join(modules)}; "
            "print(*sys.modules)")
    r = subprocess.run([sys.executable, "-S", "-I", "-c", code], capture_output=True,
                       text=True, timeout=60, check=True)
    return set(r.stdout.split())


def heavy_in(loaded: set[str]) -> dict[str, str]:
    return {m: why for m, why in HEAVY.items()
            if any(name == m or name.startswith(m + ".") for name in loaded)}


def test_the_agent_starts_without_heavy_modules():
    loaded = loaded_at_startup("harness.nodes.agent", "harness.nodes.pnode",
                               "harness.nodes.mnode")
    assert "harness.nodes.agent" in loaded and "harness._native.transport" in loaded
    assert heavy_in(loaded) == {}

