"""Builds the C core with its native tests under AddressSanitizer and
UndefinedBehaviorSanitizer, with warnings as errors, and runs them."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-Wshadow",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


# The interposer's own C (its arena and raw allocator) without its exported
# mmap wrappers, which would interpose on the sanitizers themselves; the
# memory node's store over the transport.
TRANSPORT = sorted((ROOT / "native/transport").glob("*.c"))
SOURCES = {"transport": TRANSPORT,
           "interpose": [ROOT / "native/interpose/arena.c", ROOT / "native/interpose/raw.c"],
           "mnode": [*TRANSPORT, ROOT / "native/excache/mnode.c"]}


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_native(tmp_path, name):
    sources = [ROOT / "native/error.c", *SOURCES[name]]
    exe = tmp_path / f"test_{name}"
    build = subprocess.run(
        ["gcc", *FLAGS, f"-I{ROOT / 'native/include'}",
         *sorted({f"-I{p.parent}" for p in SOURCES[name]}),
         str(Path(__file__).parent / f"test_{name}.c"), *map(str, sources), "-lpthread",
         "-o", str(exe)], capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("0 failed")
