"""Builds the C core (native/) as a static library and the Cython bindings
over it. Warnings are errors in the C core; the Cython-generated C is
compiled without -Werror since its warnings are not ours to fix."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = Path("native")
CORE_FLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-Wall", "-Wextra",
              "-Werror", "-Wshadow", "-Wstrict-prototypes", "-fno-strict-aliasing"]


def sources(*dirs: str) -> list[str]:
    return sorted(str(p) for d in dirs for p in (NATIVE / d).glob("*.c"))


CORE = ("dh", {
    "sources": [str(NATIVE / "error.c"),
                *sources("transport", "excache", "pkey", "sqlbox", "zbox")],
    "include_dirs": [str(NATIVE / "include"), str(NATIVE / "transport")],
    "cflags": CORE_FLAGS,
})


# The same core again inside the LD_PRELOAD interposer: hidden symbols, and
# its mapping and allocation calls bound to the interposer's raw ones (the
# interposer undoes this for the calls it exports), so the interposer never
# serves its own memory from the program's remote heap.
RAW = ["mmap", "munmap", "madvise", "mprotect"]
ALLOC = ["malloc", "calloc", "free", "aligned_alloc"]
INTERPOSER = Extension(
    "harness._native.dh_interpose",
    [str(NATIVE / "error.c"),
     *(str(NATIVE / "transport" / f"{m}.c") for m in ("crc32c", "frame", "link", "shm", "stream")),
     *(s for s in sources("excache") if not s.endswith("floor.c")),  # benchmarks only
     *sources("interpose")],
    include_dirs=[*CORE[1]["include_dirs"], str(NATIVE / "interpose")],
    define_macros=[*((n, f"dh_sys_{n}") for n in RAW), *((n, f"dh_raw_{n}") for n in ALLOC)],
    libraries=["pthread", "dl"],
    extra_compile_args=[*CORE_FLAGS, "-fvisibility=hidden"])


# The floor of `harness bench dbosfs`: a FUSE file system that stores
# nothing, loaded with ctypes (libfuse3-dev, which scripts/setup.sh installs).
FUSE_NULL = Extension(
    "harness._native.dh_fuse_null", sources("fusenull"),
    include_dirs=["/usr/include/fuse3"], libraries=["fuse3"],
    extra_compile_args=[*CORE_FLAGS, "-fvisibility=hidden"])

# `harness mount --db`: the DBOS file system's FUSE mount of a local
# database, in C (libfuse3-dev and libsqlite3-dev), loaded with ctypes.
DBOSFS = Extension(
    "harness._native.dh_dbosfs", sources("dbosfs"),
    include_dirs=["/usr/include/fuse3"], libraries=["fuse3", "sqlite3"],
    extra_compile_args=[*CORE_FLAGS, "-fvisibility=hidden"])


class BuildExt(build_ext):
    """The interposer compiles the core's sources with other macros: its
    objects go to a directory of their own, or a later build_clib would
    archive them into libdh.a (they name the interposer's raw functions)."""

    def build_extension(self, ext: Extension) -> None:
        if ext is not INTERPOSER:
            return super().build_extension(ext)
        temp, self.build_temp = self.build_temp, str(Path(self.build_temp) / "interpose")
        try:
            return super().build_extension(ext)
        finally:
            self.build_temp = temp


# A binding links libdh.a, which build_ext does not see change: it relinks
# when a core source or header is newer than the binding.
CORE_FILES = [*CORE[1]["sources"], *(str(p) for p in NATIVE.glob("**/*.h"))]


def ext(name: str, libs: tuple[str, ...] = ()) -> Extension:
    return Extension(f"harness._native.{name}", [f"harness/_native/{name}.pyx"],
                     depends=CORE_FILES, include_dirs=[str(NATIVE / "include")],
                     libraries=["dh", "pthread", *libs],
                     extra_compile_args=["-O2", "-D_GNU_SOURCE"])


# The pkey binding holds SQLite's and zlib's compartments too (native/sqlbox
# and native/zbox, in the core; Debian's libsqlite3-dev and zlib1g-dev): their
# gates need the pkey state of the same copy of the core, and only this
# binding links the two libraries.
PKEY = ext("pkey", libs=("sqlite3", "z"))


setup(
    libraries=[CORE],
    cmdclass={"build_ext": BuildExt},
    ext_modules=[*cythonize([ext("errors"), ext("transport"), ext("excache"), PKEY],
                            compiler_directives={"language_level": "3"}), INTERPOSER, FUSE_NULL,
                 DBOSFS],
)
