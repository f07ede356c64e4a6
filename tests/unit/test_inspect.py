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
    from harness.isolation.inspect import pattern_hits

    assert list(pattern_hits(b"\xb8\x90\x0f\x01\xef")) == [(2, "WRPKRU")]
    assert list(pattern_hits(b"\x0f\xae\xe8")) == []  # lfence: XRSTOR's opcode, register form


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


CHECKED = r"""
static unsigned rd(void) {
    unsigned a;
    __asm__ volatile(".byte 0x0f,0x01,0xee" : "=a"(a) : "c"(0) : "edx");
    return a;
}
void checked(unsigned v) {
    do __asm__ volatile(".byte 0x0f,0x01,0xef" :: "a"(v), "c"(0), "d"(0)); while (rd() != v);
}
int main(void) { return 0; }
"""


def test_tree_scan_places_each_hit_and_tells_a_checked_wrpkru(tmp_path):
    from harness.isolation.tree_scan import scan_tree

    (tmp_path / "sub").mkdir()
    build(tmp_path, SOURCE, "mixed")
    build(tmp_path / "sub", CHECKED, "checked")
    (tmp_path / "sub" / "linked").symlink_to(tmp_path / "mixed")  # not scanned twice
    (tmp_path / "notes.txt").write_text("not an ELF object")
    out = scan_tree([str(tmp_path)])
    assert out["objects"] == 2 and out["unreadable"] == []
    hits = {(Path(f["path"]).name, h["symbol"].split("+")[0]): h
            for f in out["files"] for h in f["hits"]}
    assert not hits[("mixed", "hidden")]["boundary"]  # inside a mov's immediate
    assert hits[("mixed", "direct")]["boundary"] and not hits[("mixed", "direct")]["safe"]
    assert hits[("mixed", "restore")]["kind"] == "XRSTOR" and hits[("mixed", "restore")]["boundary"]
    assert hits[("checked", "checked")]["boundary"] and hits[("checked", "checked")]["safe"]
    assert out["wrpkru"] == {"objects": 2, "occurrences": 4, "at_boundary": 3, "inside": 1,
                             "safe": 1}
    assert out["xrstor"]["occurrences"] == 1


def test_tree_scan_of_the_distribution_finds_the_loader_and_pkey_set():
    r = subprocess.run([*HARNESS, "inspect", "--tree", "/usr/lib/x86_64-linux-gnu", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    by = {Path(f["path"]).name: f["hits"] for f in out["files"]}
    assert any(h["kind"] == "XRSTOR" and h["boundary"] for h in by["ld-linux-x86-64.so.2"])
    pkey_set = [h for h in by["libc.so.6"] if h["symbol"].startswith("pkey_set+")]
    assert pkey_set and pkey_set[0]["kind"] == "WRPKRU" and pkey_set[0]["boundary"]
    assert not pkey_set[0]["safe"]  # glibc writes PKRU and does not check it
    assert out["objects"] > 100 and out["wrpkru"]["objects"] >= 1
    assert out["xrstor"]["occurrences"] == out["xrstor"]["at_boundary"] + \
        out["xrstor"]["inside"]
    r = subprocess.run([*HARNESS, "inspect", "--tree", "/nonexistent"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and "/nonexistent is not a directory" in r.stderr


def test_the_projects_own_wrpkrus_are_all_checked():
    from harness._native import pkey
    from harness.isolation.tree_scan import scan_object

    hits = [h for h in scan_object(pkey.__file__).hits if h.kind == "WRPKRU"]
    assert hits and all(h.boundary and h.safe and h.symbol.startswith("dh_gate_") for h in hits)
