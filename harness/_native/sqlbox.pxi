# Included by pkey.pyx: native/sqlbox, Debian's SQLite inside a compartment,
# every call through a gate (FlexOS's SQLite experiment). In the pkey module
# because the gates' state (the current compartment, the mprotect registry)
# is the C core's, and each binding links a copy of the core of its own.


cdef extern from "dh_sqlbox.h" nogil:
    ctypedef struct dh_sqlbox:
        pass
    int dh_sqlbox_open(dh_comp *lib, int private_stack, size_t shared_bytes, dh_sqlbox **out,
                       char *err, size_t errlen)
    void dh_sqlbox_close(dh_sqlbox *b)
    int dh_sqlbox_exec(dh_sqlbox *b, const char *sql, size_t len, const char **rows,
                       size_t *rows_len)
    const char *dh_sqlbox_error(const dh_sqlbox *b)
    int dh_sqlbox_bench_insert(dh_sqlbox *b, size_t n, uint64_t *ns)
    void *dh_sqlbox_heap(const dh_sqlbox *b)
    size_t dh_sqlbox_heap_used(const dh_sqlbox *b)


class SQLError(HarnessError):
    """SQLite, inside its compartment, refused a statement."""


cdef class SQLiteBox:
    """An in-memory SQLite database inside `lib`: its memory is lib's heap and
    each call is a gate into lib from the calling thread's compartment (enter
    the application's compartment first, or the calls return to the shared
    view, where every heap is open)."""

    cdef dh_sqlbox *_b
    cdef readonly Compartment lib  # kept alive as long as the box
    cdef readonly size_t shared

    def __cinit__(self, Compartment lib not None, bint private_stack=False,
                  size_t shared=1 << 20):
        cdef char err[512]
        self.lib, self.shared = lib, shared
        rc = dh_sqlbox_open(lib._c, private_stack, shared, &self._b, err, sizeof(err))
        if rc and err[0]:
            raise HarnessError(f"SQLite in compartment {lib.name} ({lib.backend}): "
                               f"{err.decode()}")
        check(rc, f"SQLite in compartment {lib.name}")

    def __dealloc__(self):
        self.close()

    def close(self) -> None:
        if self._b is not NULL:
            dh_sqlbox_close(self._b)
            self._b = NULL

    cdef dh_sqlbox *_open(self) except NULL:
        if self._b is NULL:
            raise HarnessError("this SQLite box is closed")
        return self._b

    def execute(self, str sql) -> list:
        """Runs sql's statements through one gate; the rows of their results as
        tuples of str (None for NULL)."""
        cdef dh_sqlbox *b = self._open()
        cdef bytes text = sql.encode()
        cdef const char *rows
        cdef size_t n
        rc = dh_sqlbox_exec(b, text, len(text), &rows, &n)
        if rc == DH_EIO:
            raise SQLError(f"SQLite in {self.lib.name}: {dh_sqlbox_error(b).decode()}")
        if rc == DH_ETOOBIG:
            raise HarnessError(f"SQLite in {self.lib.name}: the statement or its result is "
                               f"larger than the shared buffer ({self.shared} bytes): open "
                               "the box with a larger shared=, or select fewer rows")
        check(rc, f"SQLite in {self.lib.name}")
        out = []
        for row in rows[:n].split(b"\x1e")[:-1]:
            out.append(tuple(None if v == b"\0" else v.decode() for v in row.split(b"\x1f")))
        return out

    def bench_insert(self, size_t n) -> float:
        """FlexOS's workload: n INSERTs into a fresh table t, each its own
        statement through its own gate, the loop in C; seconds for the n."""
        cdef dh_sqlbox *b = self._open()
        cdef uint64_t ns = 0
        with nogil:
            rc = dh_sqlbox_bench_insert(b, n, &ns)
        if rc == DH_EIO:
            raise SQLError(f"SQLite in {self.lib.name}: {dh_sqlbox_error(b).decode()}")
        check(rc, f"SQLite in {self.lib.name}")
        return ns / 1e9

    @property
    def heap_address(self) -> int:
        return <size_t>dh_sqlbox_heap(self._open())

    @property
    def heap_used(self) -> int:
        """Bytes SQLite holds in its compartment's heap now."""
        return dh_sqlbox_heap_used(self._open())
