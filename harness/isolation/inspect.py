"""`harness inspect FILE...`: ERIM's binary inspection.

A process that isolates compartments with protection keys is only as safe
as its guarantee that nothing but its gates can change PKRU. ERIM's rule: in
every executable section, at *every byte offset* (x86 instructions can be
decoded from the middle of others), find

  WRPKRU  0F 01 EF
  XRSTOR  0F AE /5 with a memory operand (ModRM reg = 5, mod != 3)

Each occurrence that is not inside a registered gate is a finding, reported
with its section, address and enclosing symbol. Exit status: 0 clean,
1 findings, 2 a file could not be read."""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from harness.errors import HarnessError

WRPKRU = b"\x0f\x01\xef"
XRSTOR = b"\x0f\xae"
# The harness's own gate code (none yet) is recognised by these prefixes.
DEFAULT_GATES = ("dh_gate_",)


class InspectError(HarnessError):
    """A file that could not be read as ELF."""


@dataclass
class Finding:
    file: str
    section: str
    address: int   # virtual address of the first byte
    offset: int    # offset in the file
    kind: str      # "WRPKRU" or "XRSTOR"
    symbol: str    # enclosing function+offset, or "?" when stripped

    def line(self) -> str:
        return (f"{self.file}: {self.kind} at {self.address:#x} (file offset {self.offset:#x}) "
                f"in {self.section}, {self.symbol}")


def pattern_hits(data: bytes | mmap.mmap, start: int = 0, end: int | None = None
                 ) -> Iterator[tuple[int, str]]:
    """(offset, kind) of every WRPKRU and XRSTOR pattern in data[start:end],
    found with the buffer's own find (a mapped file is not copied)."""
    end = len(data) if end is None else end
    i = data.find(WRPKRU, start, end)
    while i >= 0:
        yield i, "WRPKRU"
        i = data.find(WRPKRU, i + 1, end)
    i = data.find(XRSTOR, start, end)
    while i >= 0:
        if i + 2 < end:
            modrm = data[i + 2]
            if (modrm >> 3) & 7 == 5 and modrm >> 6 != 3:
                yield i, "XRSTOR"
        i = data.find(XRSTOR, i + 1, end)


def _functions(elf: ELFFile) -> list[tuple[int, int, str]]:
    out = []
    for sec in elf.iter_sections():
        if isinstance(sec, SymbolTableSection):
            for sym in sec.iter_symbols():
                if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"] and sym.name:
                    out.append((sym["st_value"], sym["st_size"], sym.name))
    return sorted(set(out))


def _symbol(funcs: list[tuple[int, int, str]], addr: int) -> tuple[str, str]:
    """(display, name) of the function containing addr."""
    best = None
    for start, size, name in funcs:
        if start <= addr < start + max(size, 1):
            best = (start, name)
        elif start > addr:
            break
    if best is None:
        return "?", ""
    return f"{best[1]}+{addr - best[0]:#x}", best[1]


def scan(path: str, gates: Iterable[str] = DEFAULT_GATES) -> list[Finding]:
    gates = tuple(gates)
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            funcs = _functions(elf)
            findings = []
            for sec in elf.iter_sections():
                if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or sec["sh_type"] == "SHT_NOBITS":
                    continue
                data = sec.data()
                for off, kind in pattern_hits(data):
                    addr = sec["sh_addr"] + off
                    shown, name = _symbol(funcs, addr)
                    if name and name.startswith(gates):
                        continue  # a registered gate
                    findings.append(Finding(path, sec.name, addr, sec["sh_offset"] + off, kind,
                                            shown))
            return findings
    except (OSError, ELFError) as exc:
        raise InspectError(f"{path}: cannot read as ELF: {exc}") from exc


def inspect_files(paths: list[str], gates: Iterable[str] = DEFAULT_GATES
                  ) -> tuple[list[Finding], list[str]]:
    """Findings over all files, and the errors of the files that could not be read."""
    findings, errors = [], []
    for p in paths:
        try:
            findings += scan(p, gates)
        except InspectError as exc:
            errors.append(str(exc))
    return findings, errors


def as_dicts(findings: list[Finding]) -> list[dict]:
    return [asdict(f) for f in findings]
