"""zlib (Debian's libz) in a compartment, on the host: the none and
mprotect backends give zlib's own output, its state lives in the
compartment's heap, the application faults on it, and the errors a user
can cause. zlib has no process-wide state, so this runs in the test
process. The mpk backend is tested in a guest (tests/vm/test_sqlbox_vm.py)."""

import zlib

import pytest

from harness._native import pkey
from harness.errors import HarnessError, IsolationFault
from harness.isolation.compartments import Domain, parse


@pytest.fixture(params=["none", "mprotect"])
def domain(request):
    d = Domain(parse({"compartments": [
        {"name": "app", "backend": request.param},
        {"name": "zlib", "backend": request.param, "heap": "2MiB"}]}, "<test>"))
    d.enter("app")
    yield d
    d.close()


def test_zlib_in_a_compartment_compresses_as_zlib_does(domain):
    data = [b"", b"x", bytes(range(256)) * 40, b"record 7: page fault node " * 300]
    for level in (1, 6, 9):
        box = pkey.ZBox(domain["zlib"], level=level)
        assert [box.compress(d) for d in data] == [zlib.compress(d, level) for d in data]
        assert box.heap_used > 256 << 10  # the deflate state is in the compartment's heap
        box.close()
    box = pkey.ZBox(domain["zlib"])
    if domain["zlib"].backend == "mprotect":  # outside a gate the application cannot touch it
        with pytest.raises(IsolationFault, match=r"'app' \(mprotect\) touched the memory of "
                                                 r"'zlib'.*SEGV_ACCERR"):
            domain.probe("app", "zlib")
    else:
        domain.probe("app", "zlib")  # no isolation: the access works
    box.close()


def test_the_errors_a_user_can_cause_say_what_to_do(domain):
    with pytest.raises(HarnessError, match=r"level must be -1 .* to 9, got 10"):
        pkey.ZBox(domain["zlib"], level=10)
    small = pkey.Compartment("tiny", "none", 64 << 10)
    with pytest.raises(HarnessError, match=r"too small for a deflate stream.*larger heap"):
        pkey.ZBox(small)
    box = pkey.ZBox(domain["zlib"], shared=64 << 10)
    with pytest.raises(HarnessError, match=r"do not fit the shared buffer \(65536 bytes\)"):
        box.compress(bytes(100 << 10))
    assert box.compress(b"still") == zlib.compress(b"still", 6)
    box.close()
    with pytest.raises(HarnessError, match="this zlib box is closed"):
        box.compress(b"x")
