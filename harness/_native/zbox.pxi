# Included by pkey.pyx: native/zbox, Debian's zlib inside a compartment,
# each compression through a gate (the second real library of `harness
# explore`). In the pkey module for the reason sqlbox.pxi gives.


cdef extern from "dh_zbox.h" nogil:
    ctypedef struct dh_zbox:
        pass
    int dh_zbox_open(dh_comp *lib, int private_stack, int level, size_t shared_bytes,
                     dh_zbox **out)
    void dh_zbox_close(dh_zbox *b)
    int dh_zbox_compress(dh_zbox *b, const void *data, size_t len, const uint8_t **out,
                         size_t *out_len)
    void *dh_zbox_heap(const dh_zbox *b)
    size_t dh_zbox_heap_used(const dh_zbox *b)


cdef class ZBox:
    """A zlib deflate stream inside `lib`: its state and every allocation in
    lib's heap, each compress() a gate into lib from the calling thread's
    compartment. Its output is what zlib.compress(data, level) gives."""

    cdef dh_zbox *_b
    cdef readonly Compartment lib  # kept alive as long as the box
    cdef readonly size_t shared
    cdef readonly int level

    def __cinit__(self, Compartment lib not None, bint private_stack=False, int level=6,
                  size_t shared=1 << 20):
        if not -1 <= level <= 9:
            raise HarnessError(f"zlib level must be -1 (zlib's default) to 9, got {level}")
        self.lib, self.shared, self.level = lib, shared, level
        rc = dh_zbox_open(lib._c, private_stack, level, shared, &self._b)
        if rc == DH_ENOMEM:
            raise HarnessError(f"zlib in compartment {lib.name}: its heap "
                               f"({dh_comp_heap_size(lib._c)} bytes) is too small for a deflate stream "
                               "(about 300 KiB at level 6): give it a larger heap")
        check(rc, f"zlib in compartment {lib.name}")

    def __dealloc__(self):
        self.close()

    def close(self) -> None:
        if self._b is not NULL:
            dh_zbox_close(self._b)
            self._b = NULL

    def compress(self, const unsigned char[::1] data not None) -> bytes:
        """data as one zlib stream, compressed inside the compartment."""
        if self._b is NULL:
            raise HarnessError("this zlib box is closed")
        cdef const uint8_t *out
        cdef size_t n
        rc = dh_zbox_compress(self._b, &data[0] if len(data) else NULL, len(data), &out, &n)
        if rc == DH_ETOOBIG:
            raise HarnessError(f"zlib in {self.lib.name}: {len(data)} bytes and their stream "
                               f"do not fit the shared buffer ({self.shared} bytes): open the "
                               "box with a larger shared=")
        check(rc, f"zlib in {self.lib.name}")
        return out[:n]

    @property
    def heap_address(self) -> int:
        if self._b is NULL:
            raise HarnessError("this zlib box is closed")
        return <size_t>dh_zbox_heap(self._b)

    @property
    def heap_used(self) -> int:
        """Bytes zlib holds in its compartment's heap now."""
        if self._b is NULL:
            raise HarnessError("this zlib box is closed")
        return dh_zbox_heap_used(self._b)
