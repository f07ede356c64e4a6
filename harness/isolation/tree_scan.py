"""`harness inspect --tree DIR...`: ERIM's scan of a distribution (ERIM,
USENIX Security '19, §5.3: Debian 8, 56,030 objects, 174 with WRPKRU and
541 with XRSTOR, almost all of them inside other instructions).

Every ELF object under the directories (symlinks not followed, each file
once) is scanned as `harness inspect` scans one, at every byte offset. Each
occurrence is then placed by a linear disassembly (capstone) from the
nearest symbol before it (at most ANCHOR_MAX bytes back: x86 decoding falls
back into step within a few instructions): *at an instruction boundary*, a
WRPKRU or XRSTOR the code really executes, or *inside* another instruction
(a byte pattern that only a jump into the middle could run). A WRPKRU at a
boundary is *safe* as ERIM would accept it when it is followed, within
CHECK_WINDOW instructions, by its check: a compare (or a test, against 0)
of EAX, the value PKRU was set to or read back with RDPKRU, and a
conditional jump."""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from harness.isolation.inspect import pattern_hits
from harness.progress import Progress, silent

ANCHOR_MAX = 4096  # bytes decoded before a hit, at most
EM_X86_64 = 62
CHECK_WINDOW = 4
ELF_MAGIC = b"\x7fELF"


@dataclass
class Hit:
    kind: str         # WRPKRU or XRSTOR
    address: int
    section: str
    symbol: str       # the function it falls in, "+offset"; "?" if none is known
    boundary: bool    # at an instruction boundary (else inside another instruction)
    safe: bool        # a WRPKRU at a boundary followed by its check


@dataclass
class ObjectReport:
    path: str
    hits: list[Hit] = field(default_factory=list)


SHDR = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym
SHF_EXECINSTR, SHT_NOBITS, SHT_SYMTAB, SHT_DYNSYM = 0x4, 8, 2, 11
STT_FUNC, STT_GNU_IFUNC = 2, 10


def _sections(mm: mmap.mmap) -> list[tuple]:
    """The section headers of a little-endian x86-64 ELF object, read with
    struct (pyelftools' parser costs a millisecond an object, and a tree has
    thousands); [] for any other object."""
    if mm[4] != 2 or mm[5] != 1 or struct.unpack_from("<H", mm, 18)[0] != EM_X86_64:
        return []
    shoff, = struct.unpack_from("<Q", mm, 40)
    shentsize, shnum = struct.unpack_from("<HH", mm, 58)
    if shentsize != SHDR.size or shoff + shnum * SHDR.size > len(mm):
        return []
    return [SHDR.unpack_from(mm, shoff + i * SHDR.size) for i in range(shnum)]


def _cstr(mm: mmap.mmap, at: int) -> str:
    return mm[at:mm.find(b"\0", at)].decode(errors="replace")


def _symbols(mm: mmap.mmap, secs: list[tuple]) -> tuple[list[int], list[tuple[int, int, int]]]:
    """Start addresses (sorted) of every function symbol, from .symtab and
    .dynsym alike (a stripped library keeps its exports), each with (string
    table offset, name offset, size); names are read only when shown."""
    seen: dict[int, tuple[int, int, int]] = {}
    for _name, typ, _flags, _addr, off, size, link, _info, _align, entsize in secs:
        if typ in (SHT_SYMTAB, SHT_DYNSYM) and entsize == SYM.size and link < len(secs):
            strtab = secs[link][4]
            for st_name, info, _other, _shndx, value, sym_size in SYM.iter_unpack(
                    mm[off:off + size - size % SYM.size]):
                if value and info & 0xF in (STT_FUNC, STT_GNU_IFUNC):
                    seen.setdefault(value, (strtab, st_name, sym_size))
    starts = sorted(seen)
    return starts, [seen[a] for a in starts]


def _place(md, code: memoryview, base: int, at: int, anchor: int) -> tuple[bool, bool]:
    """(at a boundary, followed by its check) for the pattern at `at`, by
    decoding from `anchor` (both addresses; code starts at base)."""
    after: list[tuple[str, str]] = []
    boundary = False
    end = min(len(code), at - base + 64)
    for addr, _size, mnemonic, operands in md.disasm_lite(bytes(code[anchor - base:end]),
                                                          anchor):
        if boundary:
            after.append((mnemonic, operands))
            if len(after) >= CHECK_WINDOW:
                break
        elif addr == at:
            boundary = True
        elif addr > at:
            break
    safe = any(m in ("cmp", "test") and "eax" in ops and i + 1 < len(after) and
               after[i + 1][0].startswith("j") and after[i + 1][0] != "jmp"
               for i, (m, ops) in enumerate(after))
    return boundary, safe


def scan_object(path: str) -> ObjectReport:
    """Every WRPKRU and XRSTOR pattern in one ELF object, placed."""
    import capstone

    rep = ObjectReport(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        secs = _sections(mm)
        shstr = secs[struct.unpack_from("<H", mm, 62)[0]][4] if secs else 0
        starts: list[int] | None = None
        md = None
        for name, typ, flags, base, off, size, *_ in secs:
            if not flags & SHF_EXECINSTR or typ == SHT_NOBITS or off + size > len(mm):
                continue
            code = memoryview(mm)[off:off + size]
            try:
                for hoff, kind in pattern_hits(mm, off, off + size):
                    if starts is None:
                        starts, syms = _symbols(mm, secs)
                        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
                        md.skipdata = True  # data in a code section does not end the sweep
                    at = base + hoff - off
                    i = bisect.bisect_right(starts, at) - 1
                    known = i >= 0 and starts[i] >= base
                    anchor = max(starts[i] if known else base, at - ANCHOR_MAX)
                    boundary, checked = _place(md, code, base, at, anchor)
                    symbol = "?"  # none, or past the end of the one before it
                    if known and at - starts[i] < syms[i][2]:
                        symbol = f"{_cstr(mm, syms[i][0] + syms[i][1])}+{at - starts[i]:#x}"
                    rep.hits.append(Hit(kind, at, _cstr(mm, shstr + name), symbol, boundary,
                                        kind == "WRPKRU" and boundary and checked))
            finally:
                code.release()
    return rep


def elf_files(dirs: Iterable[str]) -> Iterator[str]:
    """Regular files under dirs that start with the ELF magic, each once."""
    seen: set[tuple[int, int]] = set()
    for d in dirs:
        for root, _subdirs, files in os.walk(d):
            for name in files:
                p = os.path.join(root, name)
                try:
                    st = os.lstat(p)
                    if not os.path.isfile(p) or os.path.islink(p) or st.st_size < 64 or \
                            (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                    with open(p, "rb") as f:
                        if f.read(4) != ELF_MAGIC:
                            continue
                except OSError:
                    continue
                yield p


def scan_tree(dirs: list[str], progress: Progress | None = None) -> dict:
    """ERIM's summary of every ELF object under dirs, and the objects with
    hits. Objects that cannot be parsed are counted, not fatal."""
    say = progress or silent
    for d in dirs:
        if not os.path.isdir(d):
            from harness.errors import HarnessError

            raise HarnessError(f"inspect --tree: {d} is not a directory")
    say(f"finding the ELF objects under {', '.join(dirs)}")
    paths = list(elf_files(dirs))
    reports, unreadable = [], []
    for n, p in enumerate(paths, 1):
        if n % 250 == 0 or n == len(paths):
            say(f"scanned {n} of {len(paths)} objects")
        try:
            r = scan_object(p)
        except (OSError, ValueError, IndexError, struct.error) as exc:
            unreadable.append(f"{p}: {exc}")
            continue
        if r.hits:
            reports.append(r)

    def count(kind: str) -> dict:
        hits = [h for r in reports for h in r.hits if h.kind == kind]
        out = {"objects": sum(1 for r in reports if any(h.kind == kind for h in r.hits)),
               "occurrences": len(hits),
               "at_boundary": sum(h.boundary for h in hits),
               "inside": sum(not h.boundary for h in hits)}
        if kind == "WRPKRU":
            out["safe"] = sum(h.safe for h in hits)
        return out
    return {"objects": len(paths) - len(unreadable), "unreadable": unreadable,
            "wrpkru": count("WRPKRU"), "xrstor": count("XRSTOR"),
            "files": [{"path": r.path, "hits": [asdict(h) for h in r.hits]} for r in reports]}
