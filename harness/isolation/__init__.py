"""Isolation: the binary inspector (ERIM's rules); compartments and gates
come next."""
