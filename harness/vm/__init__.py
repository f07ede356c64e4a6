"""QEMU: command lines, the acceleration probe, launch and shutdown."""
