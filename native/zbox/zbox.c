/* zlib in a compartment. See dh_zbox.h. */
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "dh_error.h"
#include "dh_box.h"
#include "dh_zbox.h"

/* Inside the compartment: the allocator and the stream. */
struct state {
    dh_heap *heap;
    z_stream zs;
    int ready;
};

/* What crosses a gate: outside every compartment, so both sides reach it. */
struct call {
    struct state *st; /* where the gate's code finds its state (it lies in the callee) */
    dh_comp *lib;
    int level;
    int rc;
    size_t in_len, out_len, out_cap;
    uint8_t *in, *out; /* the rest of the shared buffer: input, then output */
    size_t used;
};

struct dh_zbox {
    dh_box box;
    struct call *call; /* box.shared */
};

static voidpf z_alloc(voidpf opaque, uInt items, uInt size)
{
    size_t n = (size_t)items * size;
    return n / (size ? size : 1) == items ? dh_heap_alloc(opaque, n) : NULL;
}

static void z_free(voidpf opaque, voidpf p) { dh_heap_free(opaque, p); }

static uint64_t in_open(void *arg)
{
    struct call *c = arg;
    dh_heap *h = dh_heap_init(dh_comp_heap(c->lib), dh_comp_heap_size(c->lib));
    struct state *st = h ? dh_heap_alloc(h, sizeof *st) : NULL;
    c->st = st;
    if (!st) {
        c->rc = DH_ENOMEM;
        return 0;
    }
    memset(st, 0, sizeof *st);
    st->heap = h;
    st->zs.zalloc = z_alloc;
    st->zs.zfree = z_free;
    st->zs.opaque = h;
    st->ready = deflateInit(&st->zs, c->level) == Z_OK;
    c->rc = st->ready ? 0 : DH_ENOMEM;
    return 0;
}

static uint64_t in_compress(void *arg)
{
    struct call *c = arg;
    z_stream *zs = &c->st->zs;
    deflateReset(zs);
    zs->next_in = c->in;
    zs->avail_in = (uInt)c->in_len;
    zs->next_out = c->out;
    zs->avail_out = (uInt)c->out_cap;
    int z = deflate(zs, Z_FINISH);
    c->out_len = c->out_cap - zs->avail_out;
    c->rc = z == Z_STREAM_END ? 0 : z == Z_OK || z == Z_BUF_ERROR ? DH_ETOOBIG : DH_EIO;
    return 0;
}

static uint64_t in_close(void *arg)
{
    struct call *c = arg;
    if (c->st && c->st->ready)
        deflateEnd(&c->st->zs);
    return 0;
}

static uint64_t in_used(void *arg)
{
    struct call *c = arg;
    c->used = dh_heap_used(c->st->heap);
    return 0;
}

int dh_zbox_open(dh_comp *lib, int private_stack, int level, size_t shared_bytes,
                 dh_zbox **out)
{
    if (!lib || level < -1 || level > 9 || shared_bytes < sizeof(struct call) + 64)
        return DH_EINVAL;
    dh_zbox *b = calloc(1, sizeof *b);
    if (!b)
        return DH_ENOMEM;
    if (dh_box_open(&b->box, lib, private_stack, shared_bytes)) {
        free(b);
        return DH_ENOMEM;
    }
    b->call = b->box.shared;
    b->call->lib = lib;
    b->call->level = level;
    b->call->in = (uint8_t *)(b->call + 1);
    dh_box_call(&b->box, in_open, b->call);
    if (b->call->rc) {
        int rc = b->call->rc;
        dh_zbox_close(b);
        return rc;
    }
    *out = b;
    return 0;
}

void dh_zbox_close(dh_zbox *b)
{
    if (!b)
        return;
    dh_box_close(&b->box, in_close);
    free(b);
}

int dh_zbox_compress(dh_zbox *b, const void *in, size_t len, const uint8_t **out,
                     size_t *out_len)
{
    struct call *c = b->call;
    size_t room = b->box.shared_bytes - sizeof *c;
    if (len >= room || len > UINT32_MAX)
        return DH_ETOOBIG;
    memcpy(c->in, in, len);
    c->in_len = len;
    c->out = c->in + len;
    c->out_cap = room - len;
    if (c->out_cap > UINT32_MAX)
        c->out_cap = UINT32_MAX;
    dh_box_call(&b->box, in_compress, c);
    *out = c->out;
    *out_len = c->out_len;
    return c->rc;
}

void *dh_zbox_heap(const dh_zbox *b) { return dh_comp_heap(b->box.lib); }

size_t dh_zbox_heap_used(const dh_zbox *b)
{
    dh_box_call(&b->box, in_used, b->call);
    return b->call->used;
}
