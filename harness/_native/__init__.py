"""Cython bindings to the C core in native/: one module per C module."""
