"""Builds the C core (native/) as a static library and the Cython bindings
over it. Warnings are errors in the C core; the Cython-generated C is
compiled without -Werror since its warnings are not ours to fix."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

NATIVE = Path("native")
CORE_FLAGS = ["-std=c11", "-D_GNU_SOURCE", "-O2", "-g", "-Wall", "-Wextra",
              "-Werror", "-Wshadow", "-Wstrict-prototypes", "-fno-strict-aliasing"]


def sources(*dirs: str) -> list[str]:
    return sorted(str(p) for d in dirs for p in (NATIVE / d).glob("*.c"))


CORE = ("dh", {
    "sources": [str(NATIVE / "error.c"), *sources("transport", "excache", "pkey")],
    "include_dirs": [str(NATIVE / "include"), str(NATIVE / "transport")],
    "cflags": CORE_FLAGS,
})


def ext(name: str) -> Extension:
    return Extension(f"harness._native.{name}", [f"harness/_native/{name}.pyx"],
                     include_dirs=[str(NATIVE / "include")],
                     libraries=["dh", "pthread"],
                     extra_compile_args=["-O2", "-D_GNU_SOURCE"])


setup(
    libraries=[CORE],
    ext_modules=cythonize([ext("errors"), ext("transport"), ext("excache"), ext("pkey")],
                          compiler_directives={"language_level": "3"}),
)
