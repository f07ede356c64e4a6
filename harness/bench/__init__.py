"""Benchmarks. Every one measures its floor in the same run and reports the
ratio to it: an absolute time is only quoted beside its floor."""
