"""The ERIM-style inspector on binaries built here: WRPKRU hidden anywhere,
XRSTOR with a memory operand, gates that are allowed, and clean binaries."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.isolation.inspect import scan

SOURCE = r"""
void hidden(void) { __asm__ volatile("movl $0xef010f90, %%eax" ::: "eax"); }
void direct(void) { __asm__ volatile(".byte 0x0f, 0x01, 0xef"); }
void restore(void *p) { __asm__ volatile("xrstor (%0)" :: "r"(p), "a"(0), "d"(0) : "memory"); }
void fences(void) { __asm__ volatile("lfence; mfence; sfence"); }
void dh_gate_enter(void) { __asm__ volatile(".byte 0x0f, 0x01, 0xef"); }
int main(void) { return 0; }
"""

HARNESS = [sys.executable, "-m", "harness.cli"]


def build(tmp_path: Path, source: str, name: str) -> str:
    (tmp_path / f"{name}.c").write_text(source)
    out = tmp_path / name
    subprocess.run(["gcc", "-O0", "-o", str(out), str(tmp_path / f"{name}.c")], check=True)
    return str(out)


def test_finds_wrpkru_anywhere_and_xrstor_but_not_gates_or_fences(tmp_path):
    prog = build(tmp_path, SOURCE, "prog")
    found = {(f.kind, f.symbol.split("+")[0]) for f in scan(prog)}
    assert found == {("WRPKRU", "hidden"), ("WRPKRU", "direct"), ("XRSTOR", "restore")}
    hidden = next(f for f in scan(prog) if f.symbol.startswith("hidden"))
    assert hidden.section == ".text"
    with open(prog, "rb") as f:  # the reported offset really holds the bytes
        f.seek(hidden.offset)
        assert f.read(3) == b"\x0f\x01\xef"


def test_a_hit_off_an_instruction_boundary_is_found():
    # mov eax, 0xef010f90 = B8 90 0F 01 EF: WRPKRU starts two bytes in
    from harness.isolation.inspect import _hits

    assert list(_hits(b"\xb8\x90\x0f\x01\xef")) == [(2, "WRPKRU")]
    assert list(_hits(b"\x0f\xae\xe8")) == []  # lfence: XRSTOR's opcode, register form


def test_cli_exit_codes_and_json(tmp_path):
    prog = build(tmp_path, SOURCE, "prog")
    clean = build(tmp_path, "int main(void) { return 0; }\n", "clean")
    r = subprocess.run([*HARNESS, "inspect", "--json", prog], capture_output=True, text=True)
    assert r.returncode == 1 and len(json.loads(r.stdout)["findings"]) == 3
    r = subprocess.run([*HARNESS, "inspect", "--gate", "direct", "--gate", "hidden",
                        "--gate", "restore", prog], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
    assert subprocess.run([*HARNESS, "inspect", clean]).returncode == 0
    junk = tmp_path / "junk.txt"
    junk.write_text("not an ELF file")
    r = subprocess.run([*HARNESS, "inspect", str(junk), clean], capture_output=True, text=True)
    assert r.returncode == 2 and "cannot read as ELF" in r.stderr


@pytest.mark.parametrize("module", ["transport", "excache", "errors", "pkey"])
def test_the_projects_own_extension_is_clean(module):
    import importlib

    path = importlib.import_module(f"harness._native.{module}").__file__
    assert scan(path) == []
