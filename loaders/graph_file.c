/* The .vkg reader (docs/graph-format.md). The file is untrusted: every offset, size, count and id is
 * checked before it is used, all arithmetic on file values is overflow-checked, and records are read
 * byte by byte (little-endian, no pointer casts), so any malformed image ends in
 * VKG_ERROR_INVALID_GRAPH with a message naming the source, the section and the record at fault. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "graph/ir.h"
#include "runtime/internal.h"

enum {
    HEADER_SIZE = 64,
    ENTRY_SIZE = 32,
    TENSOR_RECORD = 88,
    NODE_HEADER = 24,
    ATTR_HEADER = 12,
    MAX_SECTIONS = 64,
    MAX_ARITY = 64, /* inputs, outputs, attributes per node; elements per list attribute */
    MAX_STRING_LEN = 4096,
    FLAG_REQUIRED = 1,
    KIND_STRINGS = 1,
    KIND_TENSORS = 2,
    KIND_NODES = 3,
    KIND_GRAPH_IO = 4,
    KIND_METADATA = 5,
    KIND_WEIGHTS = 6,
    KIND_COUNT = 7
};
#define MAX_RECORDS (1u << 20) /* strings, tensors, nodes */

/* The fuzz target accepts any stored CRC, so mutated inputs reach the checks behind the CRCs. */
#ifdef FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION
#define CRC_ENFORCED 0
#else
#define CRC_ENFORCED 1
#endif

/* ---- CRC-32 (IEEE, as zlib) ---- */

static uint32_t crc_table[256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* crc is the running value (0 to start), as zlib.crc32(data, crc). */
uint32_t vkg_crc32(uint32_t crc, const void *data, size_t n)
{
    pthread_once(&crc_once, crc_init);
    const uint8_t *p = data;
    crc = ~crc;
    for (size_t i = 0; i < n; i++) crc = crc_table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

/* ---- little-endian reads (the image may be unaligned and the host need not be little-endian) ---- */

static uint32_t rd32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32; }
static int64_t rdi64(const uint8_t *p)
{
    int64_t v;
    uint64_t u = rd64(p);
    memcpy(&v, &u, sizeof v); /* two's complement reinterpretation without implementation-defined casts */
    return v;
}
static double rdf64(const uint8_t *p)
{
    double d;
    uint64_t u = rd64(p);
    memcpy(&d, &u, sizeof d);
    return d;
}

/* ---- arena: every parsed record and string lives in a chain of chunks owned by the graph ---- */

typedef struct chunk {
    struct chunk *next;
    size_t cap, used;
    max_align_t data[];
} chunk;

enum { CHUNK_MIN = 64 * 1024 };

/* Returns zeroed memory owned by the arena chain *head (freed by arena_free), or NULL when out of
 * memory or when count * size overflows. */
static void *arena_alloc(void **head, size_t count, size_t size)
{
    size_t n;
    if (__builtin_mul_overflow(count, size, &n) || n > SIZE_MAX - 2 * sizeof(max_align_t)) return NULL;
    n = (n + sizeof(max_align_t) - 1) / sizeof(max_align_t) * sizeof(max_align_t);
    chunk *c = *head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > CHUNK_MIN ? n : CHUNK_MIN;
        chunk *nc = calloc(1, sizeof(chunk) + cap);
        if (!nc) return NULL;
        nc->cap = cap;
        /* A big allocation gets its own chunk behind the current one, so the current one keeps its
         * free space for the small records that follow. */
        if (c && n > CHUNK_MIN) {
            nc->next = c->next;
            c->next = nc;
        } else {
            nc->next = c;
            *head = nc;
        }
        c = nc;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

static void arena_free(void *head)
{
    for (chunk *c = head; c;) {
        chunk *next = c->next;
        free(c);
        c = next;
    }
}

/* ---- parser state ---- */

typedef struct section {
    uint32_t kind, flags, index;
    uint64_t offset, size;
    uint32_t crc;
} section;

typedef struct parser {
    vkg_graph *g;
    const uint8_t *p; /* the image */
    size_t size;
    section sec[MAX_SECTIONS];
    uint32_t n_sec;
    const section *known[KIND_COUNT]; /* by kind, NULL when absent */
    uint32_t n_strings;
    const char **strings;
    uint32_t *string_len;
} parser;

static const char *kind_name(uint32_t kind)
{
    switch (kind) {
    case KIND_STRINGS: return "STRINGS";
    case KIND_TENSORS: return "TENSORS";
    case KIND_NODES: return "NODES";
    case KIND_GRAPH_IO: return "GRAPH_IO";
    case KIND_METADATA: return "METADATA";
    case KIND_WEIGHTS: return "WEIGHTS";
    }
    return "unknown";
}

static const char *role_name(uint32_t role)
{
    switch (role) {
    case VKG_ROLE_INTERMEDIATE: return "intermediate";
    case VKG_ROLE_INPUT: return "input";
    case VKG_ROLE_OUTPUT: return "output";
    case VKG_ROLE_CONSTANT: return "constant";
    }
    return "unknown";
}

/* Every loader message starts "<source>: <where>: ". */
static vkg_status bad(const parser *ps, const char *where, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static vkg_status bad(const parser *ps, const char *where, const char *fmt, ...)
{
    char msg[1536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: %s: %s", ps->g->source, where, msg);
}

static vkg_status oom(const parser *ps, const char *what)
{
    return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory while reading %s", ps->g->source, what);
}

#define ALLOC(ps, count, type) ((type *)arena_alloc(&(ps)->g->arena, (count), sizeof(type)))

/* ---- duplicate detection over NUL-terminated names (open addressing, FNV-1a) ---- */

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 0x100000001b3ull;
    return h;
}

/* Sets *dup_a < *dup_b to the first pair of equal names (in order of the later one), or *dup_b =
 * VKG_IR_NONE when all are distinct. Names are get(ctx, i). The table is temporary (freed here). */
static vkg_status find_duplicate(const parser *ps, uint32_t n, const char *(*get)(const void *ctx, uint32_t i),
                                 const void *ctx, uint32_t *dup_a, uint32_t *dup_b)
{
    *dup_b = VKG_IR_NONE;
    if (n < 2) return VKG_SUCCESS;
    size_t cap = 16;
    while (cap < (size_t)n * 2) cap *= 2;
    uint32_t *slots = malloc(cap * sizeof *slots);
    if (!slots) return oom(ps, "names");
    memset(slots, 0xFF, cap * sizeof *slots);
    for (uint32_t i = 0; i < n; i++) {
        const char *s = get(ctx, i);
        size_t h = (size_t)fnv1a(s) & (cap - 1);
        while (slots[h] != VKG_IR_NONE) {
            if (strcmp(get(ctx, slots[h]), s) == 0) {
                *dup_a = slots[h];
                *dup_b = i;
                free(slots);
                return VKG_SUCCESS;
            }
            h = (h + 1) & (cap - 1);
        }
        slots[h] = i;
    }
    free(slots);
    return VKG_SUCCESS;
}

static const char *tensor_name_at(const void *ctx, uint32_t i) { return ((const vkg_graph *)ctx)->tensors[i].name; }
static const char *node_name_at(const void *ctx, uint32_t i) { return ((const vkg_graph *)ctx)->nodes[i].name; }
static const char *meta_key_at(const void *ctx, uint32_t i) { return ((const vkg_graph *)ctx)->meta_keys[i]; }

/* ---- header and section table ---- */

static vkg_status parse_header(parser *ps)
{
    const uint8_t *p = ps->p;
    if (ps->size < HEADER_SIZE)
        return bad(ps, "header", "truncated header: the image is %zu bytes, a header needs %d", ps->size, HEADER_SIZE);
    if (memcmp(p, "VKGRAPH\0", 8) != 0) return bad(ps, "header", "bad magic: not a .vkg file (expected \"VKGRAPH\\0\")");
    uint32_t major = rd32(p + 8), minor = rd32(p + 12);
    /* Before the CRC: a file of another major version may have another header layout. */
    if (major != 1)
        return bad(ps, "header", "format version %u.%u is not supported (this reader reads major version 1)", major, minor);
    uint32_t hcrc = rd32(p + 60), want = vkg_crc32(0, p, 60);
    if (CRC_ENFORCED && hcrc != want) return bad(ps, "header", "header_crc mismatch: stored 0x%08x, computed 0x%08x", hcrc, want);
    for (int i = 40; i < 60; i++)
        if (p[i]) return bad(ps, "header", "reserved byte %d is 0x%02x, expected 0", i, p[i]);
    ps->g->version_major = major;
    ps->g->version_minor = minor;

    uint64_t file_size = rd64(p + 16), table_off = rd64(p + 24);
    uint32_t count = rd32(p + 32), tcrc = rd32(p + 36);
    if (table_off != HEADER_SIZE)
        return bad(ps, "header", "section_table_offset is %llu, expected %d", (unsigned long long)table_off, HEADER_SIZE);
    if (count < 1 || count > MAX_SECTIONS)
        return bad(ps, "header", "section_count is %u, expected 1..%d", count, MAX_SECTIONS);
    size_t table_end = HEADER_SIZE + (size_t)count * ENTRY_SIZE;
    if (ps->size < table_end)
        return bad(ps, "section table", "truncated inside the section table: %u entries need %zu bytes, the image is %zu",
                   count, table_end, ps->size);
    uint32_t tw = vkg_crc32(0, p + HEADER_SIZE, (size_t)count * ENTRY_SIZE);
    if (CRC_ENFORCED && tcrc != tw) return bad(ps, "section table", "table_crc mismatch: stored 0x%08x, computed 0x%08x", tcrc, tw);

    ps->n_sec = count;
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *e = p + HEADER_SIZE + (size_t)i * ENTRY_SIZE;
        ps->sec[i] = (section){.kind = rd32(e), .flags = rd32(e + 4), .index = i, .offset = rd64(e + 8),
                               .size = rd64(e + 16), .crc = rd32(e + 24)};
        if (rd32(e + 28)) return bad(ps, "section table", "entry %u (%s): reserved field is not 0", i, kind_name(ps->sec[i].kind));
    }

    if (file_size != ps->size) {
        if (file_size > ps->size) {
            /* Name what the cut removed: the first section that no longer fits. */
            for (uint32_t i = 0; i < count; i++) {
                const section *s = &ps->sec[i];
                uint64_t end;
                if (!__builtin_add_overflow(s->offset, s->size, &end) && end > ps->size)
                    return bad(ps, kind_name(s->kind),
                               "truncated: the image is %zu bytes but file_size says %llu; section %u (%s, kind %u) at "
                               "offset %llu + %llu bytes extends past the end",
                               ps->size, (unsigned long long)file_size, i, kind_name(s->kind), s->kind,
                               (unsigned long long)s->offset, (unsigned long long)s->size);
            }
            return bad(ps, "header", "truncated: the image is %zu bytes but file_size says %llu", ps->size,
                       (unsigned long long)file_size);
        }
        return bad(ps, "header", "file_size says %llu bytes but the image is %zu bytes (trailing data)",
                   (unsigned long long)file_size, ps->size);
    }
    return VKG_SUCCESS;
}

static vkg_status check_sections(parser *ps)
{
    size_t table_end = HEADER_SIZE + (size_t)ps->n_sec * ENTRY_SIZE;
    section *order[MAX_SECTIONS];
    for (uint32_t i = 0; i < ps->n_sec; i++) {
        section *s = &ps->sec[i];
        char where[64];
        snprintf(where, sizeof where, "section %u (%s, kind %u)", i, kind_name(s->kind), s->kind);
        uint64_t end;
        if (__builtin_add_overflow(s->offset, s->size, &end) || end > ps->size)
            return bad(ps, where, "offset %llu + size %llu lies outside the file (file_size %zu)",
                       (unsigned long long)s->offset, (unsigned long long)s->size, ps->size);
        if (s->offset < table_end)
            return bad(ps, where, "offset %llu overlaps the header and section table (which end at %zu)",
                       (unsigned long long)s->offset, table_end);
        uint64_t align = s->kind == KIND_WEIGHTS ? 64 : 8;
        if (s->offset % align)
            return bad(ps, where, "offset %llu is not a multiple of %llu", (unsigned long long)s->offset,
                       (unsigned long long)align);
        if (s->kind >= 1 && s->kind < KIND_COUNT) {
            if (ps->known[s->kind])
                return bad(ps, where, "kind %s appears twice (also section %u); expected at most once", kind_name(s->kind),
                           ps->known[s->kind]->index);
            ps->known[s->kind] = s;
        } else if (s->flags & FLAG_REQUIRED) {
            return bad(ps, where,
                       "unknown section kind %u is marked REQUIRED: the file needs a newer reader (this one knows "
                       "kinds 1-6)",
                       s->kind);
        }
        /* Insertion sort by offset: at most 64 entries. */
        uint32_t j = i;
        while (j > 0 && order[j - 1]->offset > s->offset) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = s;
    }
    for (uint32_t i = 1; i < ps->n_sec; i++) {
        const section *a = order[i - 1], *b = order[i];
        if (a->offset + a->size > b->offset)
            return bad(ps, "section table",
                       "section %u (%s) at [%llu, %llu) overlaps section %u (%s) at [%llu, %llu)", a->index,
                       kind_name(a->kind), (unsigned long long)a->offset, (unsigned long long)(a->offset + a->size),
                       b->index, kind_name(b->kind), (unsigned long long)b->offset,
                       (unsigned long long)(b->offset + b->size));
    }
    for (uint32_t k = KIND_STRINGS; k <= KIND_GRAPH_IO; k++)
        if (!ps->known[k]) return bad(ps, "section table", "required section %s (kind %u) is missing", kind_name(k), k);
    for (uint32_t i = 0; i < ps->n_sec; i++) {
        const section *s = &ps->sec[i];
        uint32_t c = vkg_crc32(0, ps->p + s->offset, (size_t)s->size);
        if (CRC_ENFORCED && c != s->crc)
            return bad(ps, kind_name(s->kind), "section %u CRC mismatch: stored 0x%08x, computed 0x%08x", i, s->crc, c);
    }
    return VKG_SUCCESS;
}

/* Records may be followed by at most 7 zero bytes, for writers that pad each section to 8 bytes. */
static vkg_status check_tail(const parser *ps, const char *where, const uint8_t *cur, const uint8_t *end)
{
    size_t left = (size_t)(end - cur);
    bool zero = left < 8;
    for (size_t i = 0; zero && i < left; i++) zero = cur[i] == 0;
    if (!zero) return bad(ps, where, "%zu unexpected bytes after the last record", left);
    return VKG_SUCCESS;
}

/* ---- STRINGS ---- */

static vkg_status parse_strings(parser *ps)
{
    const section *s = ps->known[KIND_STRINGS];
    const uint8_t *p = ps->p + s->offset;
    size_t size = (size_t)s->size;
    if (size < 4) return bad(ps, "STRINGS", "section is %zu bytes, too small for its count", size);
    uint32_t count = rd32(p);
    if (count > MAX_RECORDS) return bad(ps, "STRINGS", "count %u exceeds the limit of %u strings", count, MAX_RECORDS);
    size_t table = 4 + ((size_t)count + 1) * 4;
    if (table > size)
        return bad(ps, "STRINGS", "%u strings need an offset array of %zu bytes, the section is %zu", count, table, size);
    const uint8_t *bytes = p + table;
    size_t n_bytes = size - table;
    if (rd32(p + 4) != 0) return bad(ps, "STRINGS", "offsets[0] is %u, expected 0", rd32(p + 4));
    uint32_t last = rd32(p + 4 + (size_t)count * 4);
    if (last > n_bytes)
        return bad(ps, "STRINGS", "offsets[%u] = %u points past the end of the string bytes (%zu bytes)", count, last, n_bytes);
    ps->n_strings = count;
    ps->strings = ALLOC(ps, count ? count : 1, const char *);
    ps->string_len = ALLOC(ps, count ? count : 1, uint32_t);
    char *copy = ALLOC(ps, (size_t)last + count, char); /* each string plus its NUL */
    if (!ps->strings || !ps->string_len || !copy) return oom(ps, "STRINGS");
    for (uint32_t i = 0; i < count; i++) {
        uint32_t a = rd32(p + 4 + (size_t)i * 4), b = rd32(p + 8 + (size_t)i * 4);
        if (b < a) return bad(ps, "STRINGS", "offsets[%u] = %u is less than offsets[%u] = %u: offsets must not decrease", i + 1, b, i, a);
        if (b > last)
            return bad(ps, "STRINGS", "string %u: offsets[%u] = %u points past the end of the string bytes (%u)", i, i + 1, b, last);
        if (b - a > MAX_STRING_LEN) return bad(ps, "STRINGS", "string %u is %u bytes, at most %d", i, b - a, MAX_STRING_LEN);
        if (memchr(bytes + a, 0, b - a))
            return bad(ps, "STRINGS", "string %u holds a NUL byte (strings are not NUL-terminated in the file)", i);
        memcpy(copy, bytes + a, b - a);
        copy[b - a] = '\0';
        ps->strings[i] = copy;
        ps->string_len[i] = b - a;
        copy += b - a + 1;
    }
    return check_tail(ps, "STRINGS", bytes + last, p + size);
}

/* Resolves a string id read from `where`; `field` names it in the message. */
static vkg_status get_string(const parser *ps, const char *where, const char *field, uint64_t id, const char **out)
{
    if (id >= ps->n_strings)
        return bad(ps, where, "%s is string id %llu, but the string table has %u strings", field, (unsigned long long)id,
                   ps->n_strings);
    *out = ps->strings[id];
    return VKG_SUCCESS;
}

/* ---- TENSORS ---- */

static vkg_status parse_tensors(parser *ps)
{
    vkg_graph *g = ps->g;
    const section *s = ps->known[KIND_TENSORS], *w = ps->known[KIND_WEIGHTS];
    const uint8_t *p = ps->p + s->offset;
    size_t size = (size_t)s->size;
    if (size < 4) return bad(ps, "TENSORS", "section is %zu bytes, too small for its count", size);
    uint32_t count = rd32(p);
    if (count > MAX_RECORDS) return bad(ps, "TENSORS", "count %u exceeds the limit of %u tensors", count, MAX_RECORDS);
    if ((size - 4) / TENSOR_RECORD < count)
        return bad(ps, "TENSORS", "%u records of %d bytes do not fit in the section's %zu bytes", count, TENSOR_RECORD, size);
    g->n_tensors = count;
    g->tensors = ALLOC(ps, count ? count : 1, vkg_ir_tensor);
    if (!g->tensors) return oom(ps, "TENSORS");
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *r = p + 4 + (size_t)i * TENSOR_RECORD;
        vkg_ir_tensor *t = &g->tensors[i];
        char where[96];
        snprintf(where, sizeof where, "TENSORS: tensor %u", i);
        uint32_t name_id = rd32(r);
        VKG_TRY(get_string(ps, where, "name", name_id, &t->name));
        if (!t->name[0]) return bad(ps, where, "name is empty; tensor names must be non-empty");
        /* From here on messages name the tensor too. */
        snprintf(where, sizeof where, "TENSORS: tensor %u \"%.40s\"", i, t->name);
        uint8_t dtype = r[4], role = r[5], rank = r[6];
        if (vkg_dtype_size((vkg_dtype)dtype) == 0)
            return bad(ps, where, "dtype %u is not valid (0 f32, 1 f16, 2 bf16, 3 i32, 4 u8)", dtype);
        if (role > VKG_ROLE_CONSTANT)
            return bad(ps, where, "role %u is not valid (0 intermediate, 1 input, 2 output, 3 constant)", role);
        if (rank > VKG_IR_MAX_RANK) return bad(ps, where, "rank %u exceeds the maximum of %d", rank, VKG_IR_MAX_RANK);
        if (r[7]) return bad(ps, where, "reserved byte is %u, expected 0", r[7]);
        t->dtype = (vkg_dtype)dtype;
        t->role = (vkg_tensor_role)role;
        t->rank = rank;
        t->producer = VKG_IR_NONE;
        uint64_t data_offset = rd64(r + 8), data_size = rd64(r + 16);
        /* Bytes of the fixed dims, checked against 2^63 as the format requires. */
        uint64_t bytes = vkg_dtype_size(t->dtype);
        bool symbolic = false;
        for (uint32_t d = 0; d < VKG_IR_MAX_RANK; d++) {
            int64_t v = rdi64(r + 24 + (size_t)d * 8);
            if (d >= rank) {
                if (v != 0) return bad(ps, where, "dims[%u] = %lld beyond rank %u, expected 0", d, (long long)v, rank);
                continue;
            }
            if (v >= 0) {
                t->dims[d] = v;
                if (__builtin_mul_overflow(bytes, (uint64_t)v, &bytes) || bytes > (uint64_t)INT64_MAX)
                    return bad(ps, where, "shape overflows: the product of its dims times %u bytes exceeds 2^63 at dims[%u] = %lld",
                               vkg_dtype_size(t->dtype), d, (long long)v);
                continue;
            }
            symbolic = true;
            t->dims[d] = -1;
            uint64_t sid = (uint64_t)(-(v + 1)); /* v + 1 >= INT64_MIN + 1, so the negation cannot overflow */
            char field[48];
            snprintf(field, sizeof field, "symbolic dims[%u]", d);
            VKG_TRY(get_string(ps, where, field, sid, &t->sym[d]));
            if (!t->sym[d][0] && t->role != VKG_ROLE_INTERMEDIATE && t->role != VKG_ROLE_OUTPUT)
                return bad(ps, where,
                           "dims[%u] is symbolic with an empty name; only intermediate and output tensors may have "
                           "inferred dims",
                           d);
        }
        if (t->role != VKG_ROLE_CONSTANT) {
            if (data_offset || data_size)
                return bad(ps, where, "a tensor of role %s has data_offset %llu and data_size %llu, expected 0 and 0", role_name(role),
                           (unsigned long long)data_offset, (unsigned long long)data_size);
            continue;
        }
        if (symbolic) return bad(ps, where, "a constant must have only fixed dims");
        if (data_size != bytes)
            return bad(ps, where, "data_size is %llu, expected %llu (product of dims x %u bytes of %s)",
                       (unsigned long long)data_size, (unsigned long long)bytes, vkg_dtype_size(t->dtype),
                       vkg_dtype_name(t->dtype));
        if (data_offset % 64) return bad(ps, where, "data_offset %llu is not a multiple of 64", (unsigned long long)data_offset);
        t->data_size = data_size;
        if (data_size == 0 && !w) continue;
        if (!w) return bad(ps, where, "a constant with %llu bytes of data, but the file has no WEIGHTS section", (unsigned long long)data_size);
        uint64_t end;
        if (__builtin_add_overflow(data_offset, data_size, &end) || end > w->size)
            return bad(ps, where, "data [%llu, +%llu) lies past the end of WEIGHTS (%llu bytes)", (unsigned long long)data_offset,
                       (unsigned long long)data_size, (unsigned long long)w->size);
        t->data = ps->p + w->offset + data_offset;
    }
    VKG_TRY(check_tail(ps, "TENSORS", p + 4 + (size_t)count * TENSOR_RECORD, p + size));
    uint32_t a, b;
    VKG_TRY(find_duplicate(ps, count, tensor_name_at, g, &a, &b));
    if (b != VKG_IR_NONE) return bad(ps, "TENSORS", "tensors %u and %u are both named \"%s\"; names must be unique", a, b, g->tensors[b].name);
    return VKG_SUCCESS;
}

/* ---- NODES ---- */

static vkg_status parse_attr(parser *ps, const char *where, const uint8_t **cur, const uint8_t *end, uint32_t k, vkg_ir_attr *a)
{
    const uint8_t *c = *cur;
    if ((size_t)(end - c) < ATTR_HEADER) return bad(ps, where, "attribute %u header runs past the end of the section", k);
    char field[48];
    snprintf(field, sizeof field, "attribute %u name", k);
    VKG_TRY(get_string(ps, where, field, rd32(c), &a->name));
    uint32_t type = rd32(c + 4), count = rd32(c + 8);
    c += ATTR_HEADER;
    if (type < VKG_ATTR_INT || type > VKG_ATTR_FLOATS)
        return bad(ps, where, "attribute \"%s\" has type %u, expected 1 INT, 2 FLOAT, 3 STRING, 4 INTS or 5 FLOATS", a->name, type);
    a->type = (vkg_attr_type)type;
    bool list = type == VKG_ATTR_INTS || type == VKG_ATTR_FLOATS;
    if (!list && count != 1) return bad(ps, where, "attribute \"%s\" is a scalar with count %u, expected 1", a->name, count);
    if (list && count > MAX_ARITY) return bad(ps, where, "attribute \"%s\" has %u elements, at most %d", a->name, count, MAX_ARITY);
    a->count = count;
    size_t need = type == VKG_ATTR_STRING ? 4 : (size_t)count * 8;
    if ((size_t)(end - c) < need) return bad(ps, where, "attribute \"%s\" payload runs past the end of the section", a->name);
    switch (a->type) {
    case VKG_ATTR_INT: a->i = rdi64(c); break;
    case VKG_ATTR_FLOAT: a->f = rdf64(c); break;
    case VKG_ATTR_STRING: VKG_TRY(get_string(ps, where, "a STRING attribute value", rd32(c), &a->s)); break;
    case VKG_ATTR_INTS: {
        int64_t *v = ALLOC(ps, count ? count : 1, int64_t);
        if (!v) return oom(ps, "NODES");
        for (uint32_t e = 0; e < count; e++) v[e] = rdi64(c + (size_t)e * 8);
        a->ints = v;
        break;
    }
    case VKG_ATTR_FLOATS: {
        double *v = ALLOC(ps, count ? count : 1, double);
        if (!v) return oom(ps, "NODES");
        for (uint32_t e = 0; e < count; e++) v[e] = rdf64(c + (size_t)e * 8);
        a->floats = v;
        break;
    }
    }
    *cur = c + need;
    return VKG_SUCCESS;
}

static vkg_status parse_nodes(parser *ps)
{
    vkg_graph *g = ps->g;
    const section *s = ps->known[KIND_NODES];
    const uint8_t *p = ps->p + s->offset, *end = p + s->size;
    if (s->size < 4) return bad(ps, "NODES", "section is %llu bytes, too small for its count", (unsigned long long)s->size);
    uint32_t count = rd32(p);
    if (count > MAX_RECORDS) return bad(ps, "NODES", "count %u exceeds the limit of %u nodes", count, MAX_RECORDS);
    if ((s->size - 4) / NODE_HEADER < count)
        return bad(ps, "NODES", "%u nodes of at least %d bytes do not fit in the section's %llu bytes", count, NODE_HEADER,
                   (unsigned long long)s->size);
    g->n_nodes = count;
    g->nodes = ALLOC(ps, count ? count : 1, vkg_ir_node);
    if (!g->nodes) return oom(ps, "NODES");
    const uint8_t *c = p + 4;
    for (uint32_t i = 0; i < count; i++) {
        vkg_ir_node *n = &g->nodes[i];
        char where[112];
        snprintf(where, sizeof where, "NODES: node %u", i);
        if ((size_t)(end - c) < NODE_HEADER) return bad(ps, where, "record header runs past the end of the section");
        VKG_TRY(get_string(ps, where, "name", rd32(c + 4), &n->name));
        if (!n->name[0]) return bad(ps, where, "name is empty; node names must be non-empty");
        snprintf(where, sizeof where, "NODES: node %u \"%.40s\"", i, n->name);
        VKG_TRY(get_string(ps, where, "op", rd32(c), &n->op));
        n->n_inputs = rd32(c + 8);
        n->n_outputs = rd32(c + 12);
        n->n_attrs = rd32(c + 16);
        if (n->n_inputs > MAX_ARITY || n->n_outputs > MAX_ARITY || n->n_attrs > MAX_ARITY)
            return bad(ps, where, "%u inputs, %u outputs, %u attributes: each must be at most %d", n->n_inputs, n->n_outputs,
                       n->n_attrs, MAX_ARITY);
        if (rd32(c + 20)) return bad(ps, where, "reserved field is %u, expected 0", rd32(c + 20));
        c += NODE_HEADER;
        size_t ids = ((size_t)n->n_inputs + n->n_outputs) * 4;
        if ((size_t)(end - c) < ids) return bad(ps, where, "input and output ids run past the end of the section");
        uint32_t *io = ALLOC(ps, n->n_inputs + n->n_outputs + 1, uint32_t);
        vkg_ir_attr *attrs = ALLOC(ps, n->n_attrs ? n->n_attrs : 1, vkg_ir_attr);
        if (!io || !attrs) return oom(ps, "NODES");
        for (uint32_t k = 0; k < n->n_inputs + n->n_outputs; k++) {
            uint32_t id = rd32(c + (size_t)k * 4);
            bool is_in = k < n->n_inputs;
            uint32_t slot = is_in ? k : k - n->n_inputs;
            if (id == VKG_IR_NONE && !is_in) return bad(ps, where, "output %u is NONE; only inputs may be absent", slot);
            if (id != VKG_IR_NONE && id >= g->n_tensors)
                return bad(ps, where, "%s %u is tensor id %u, but there are only %u tensors (dangling id)",
                           is_in ? "input" : "output", slot, id, g->n_tensors);
            io[k] = id;
        }
        n->inputs = io;
        n->outputs = io + n->n_inputs;
        c += ids;
        for (uint32_t k = 0; k < n->n_attrs; k++) {
            VKG_TRY(parse_attr(ps, where, &c, end, k, &attrs[k]));
            for (uint32_t j = 0; j < k; j++)
                if (strcmp(attrs[j].name, attrs[k].name) == 0)
                    return bad(ps, where, "attribute \"%s\" appears twice (attributes %u and %u)", attrs[k].name, j, k);
        }
        n->attrs = attrs;
    }
    VKG_TRY(check_tail(ps, "NODES", c, end));
    uint32_t a, b;
    VKG_TRY(find_duplicate(ps, count, node_name_at, g, &a, &b));
    if (b != VKG_IR_NONE) return bad(ps, "NODES", "nodes %u and %u are both named \"%s\"; names must be unique", a, b, g->nodes[b].name);
    return VKG_SUCCESS;
}

/* ---- GRAPH_IO and METADATA ---- */

static vkg_status parse_io_list(parser *ps, const uint8_t **cur, const uint8_t *end, bool outputs, uint32_t *n_out, uint32_t **ids_out)
{
    vkg_graph *g = ps->g;
    const char *what = outputs ? "outputs" : "inputs";
    vkg_tensor_role want = outputs ? VKG_ROLE_OUTPUT : VKG_ROLE_INPUT;
    const uint8_t *c = *cur;
    if ((size_t)(end - c) < 4) return bad(ps, "GRAPH_IO", "n_%s runs past the end of the section", what);
    uint32_t n = rd32(c);
    c += 4;
    if ((size_t)(end - c) / 4 < n) return bad(ps, "GRAPH_IO", "%u %s ids run past the end of the section", n, what);
    uint32_t *ids = ALLOC(ps, n ? n : 1, uint32_t);
    if (!ids) return oom(ps, "GRAPH_IO");
    for (uint32_t i = 0; i < n; i++) {
        uint32_t id = rd32(c + (size_t)i * 4);
        if (id >= g->n_tensors)
            return bad(ps, "GRAPH_IO", "%s[%u] is tensor id %u, but there are only %u tensors", what, i, id, g->n_tensors);
        const vkg_ir_tensor *t = &g->tensors[id];
        if (t->role != want)
            return bad(ps, "GRAPH_IO", "%s[%u] is tensor \"%s\" of role %s, expected role %s", what, i, t->name,
                       role_name(t->role), role_name(want));
        for (uint32_t j = 0; j < i; j++)
            if (ids[j] == id) return bad(ps, "GRAPH_IO", "tensor \"%s\" is listed twice in %s", t->name, what);
        ids[i] = id;
    }
    *n_out = n;
    *ids_out = ids;
    *cur = c + (size_t)n * 4;
    return VKG_SUCCESS;
}

static vkg_status parse_graph_io(parser *ps)
{
    vkg_graph *g = ps->g;
    const section *s = ps->known[KIND_GRAPH_IO];
    const uint8_t *c = ps->p + s->offset, *end = c + s->size;
    VKG_TRY(parse_io_list(ps, &c, end, false, &g->n_inputs, &g->inputs));
    VKG_TRY(parse_io_list(ps, &c, end, true, &g->n_outputs, &g->outputs));
    VKG_TRY(check_tail(ps, "GRAPH_IO", c, end));
    /* The reverse direction: every tensor of role input/output is listed. Lists hold distinct ids of
     * the right role, so equal counts suffice. */
    uint32_t n_in = 0, n_out = 0, last_in = 0, last_out = 0;
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        if (g->tensors[i].role == VKG_ROLE_INPUT) n_in++, last_in = i;
        if (g->tensors[i].role == VKG_ROLE_OUTPUT) n_out++, last_out = i;
    }
    for (int k = 0; k < 2; k++) {
        uint32_t have = k ? n_out : n_in, listed = k ? g->n_outputs : g->n_inputs;
        if (have == listed) continue;
        const uint32_t *ids = k ? g->outputs : g->inputs;
        uint32_t missing = k ? last_out : last_in;
        vkg_tensor_role role = k ? VKG_ROLE_OUTPUT : VKG_ROLE_INPUT;
        for (uint32_t i = 0; i < g->n_tensors; i++) {
            if (g->tensors[i].role != role) continue;
            bool found = false;
            for (uint32_t j = 0; j < listed && !found; j++) found = ids[j] == i;
            if (!found) {
                missing = i;
                break;
            }
        }
        return bad(ps, "GRAPH_IO", "tensor \"%s\" has role %s but is not listed in the graph's %s", g->tensors[missing].name,
                   role_name(role), k ? "outputs" : "inputs");
    }
    return VKG_SUCCESS;
}

static vkg_status parse_metadata(parser *ps)
{
    vkg_graph *g = ps->g;
    const section *s = ps->known[KIND_METADATA];
    if (!s) return VKG_SUCCESS;
    const uint8_t *p = ps->p + s->offset;
    if (s->size < 4) return bad(ps, "METADATA", "section is %llu bytes, too small for its count", (unsigned long long)s->size);
    uint32_t count = rd32(p);
    if ((s->size - 4) / 8 < count)
        return bad(ps, "METADATA", "%u key/value pairs do not fit in the section's %llu bytes", count, (unsigned long long)s->size);
    g->n_meta = count;
    g->meta_keys = ALLOC(ps, count ? count : 1, const char *);
    g->meta_values = ALLOC(ps, count ? count : 1, const char *);
    if (!g->meta_keys || !g->meta_values) return oom(ps, "METADATA");
    for (uint32_t i = 0; i < count; i++) {
        char where[48];
        snprintf(where, sizeof where, "METADATA: pair %u", i);
        VKG_TRY(get_string(ps, where, "key", rd32(p + 4 + (size_t)i * 8), &g->meta_keys[i]));
        VKG_TRY(get_string(ps, where, "value", rd32(p + 8 + (size_t)i * 8), &g->meta_values[i]));
    }
    VKG_TRY(check_tail(ps, "METADATA", p + 4 + (size_t)count * 8, p + s->size));
    uint32_t a, b;
    VKG_TRY(find_duplicate(ps, count, meta_key_at, g, &a, &b));
    if (b != VKG_IR_NONE) return bad(ps, "METADATA", "key \"%s\" appears twice (pairs %u and %u); keys must be unique", g->meta_keys[b], a, b);
    return VKG_SUCCESS;
}

/* ---- graph semantics and topological order ---- */

static vkg_status check_producers(parser *ps)
{
    vkg_graph *g = ps->g;
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        const vkg_ir_node *n = &g->nodes[i];
        for (uint32_t k = 0; k < n->n_outputs; k++) {
            vkg_ir_tensor *t = &g->tensors[n->outputs[k]];
            char where[112];
            snprintf(where, sizeof where, "NODES: node %u \"%.40s\"", i, n->name);
            if (t->role == VKG_ROLE_INPUT || t->role == VKG_ROLE_CONSTANT)
                return bad(ps, where, "output %u writes %s tensor \"%s\"; inputs and constants are produced by no node", k,
                           role_name(t->role), t->name);
            if (t->producer != VKG_IR_NONE)
                return bad(ps, where, "output %u: tensor \"%s\" is already written by node \"%s\"; a tensor has exactly one producer", k,
                           t->name, g->nodes[t->producer].name);
            t->producer = i;
        }
    }
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        const vkg_ir_tensor *t = &g->tensors[i];
        if (t->producer != VKG_IR_NONE || t->role == VKG_ROLE_INPUT || t->role == VKG_ROLE_CONSTANT) continue;
        if (t->role == VKG_ROLE_OUTPUT) return bad(ps, "NODES", "graph output \"%s\" is never produced by any node", t->name);
        return bad(ps, "NODES", "intermediate tensor \"%s\" is never produced by any node", t->name);
    }
    return VKG_SUCCESS;
}

/* Binary min-heap of node indices: Kahn's algorithm always takes the lowest-index ready node, which
 * keeps file order among independent nodes. */
static void heap_push(uint32_t *h, uint32_t *n, uint32_t v)
{
    uint32_t i = (*n)++;
    while (i > 0 && h[(i - 1) / 2] > v) {
        h[i] = h[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    h[i] = v;
}

static uint32_t heap_pop(uint32_t *h, uint32_t *n)
{
    uint32_t top = h[0], v = h[--*n], i = 0;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    h[i] = v;
    return top;
}

static vkg_status report_cycle(parser *ps, const uint32_t *indeg)
{
    const vkg_graph *g = ps->g;
    uint32_t cur = VKG_IR_NONE;
    for (uint32_t i = 0; i < g->n_nodes && cur == VKG_IR_NONE; i++)
        if (indeg[i]) cur = i;
    /* Every unsorted node has an input produced by another unsorted node; following such inputs
     * n_nodes times must end inside a cycle. */
    uint32_t step[2] = {0};
    for (int phase = 0; phase < 2; phase++) {
        uint32_t start = cur;
        for (uint32_t s = 0; s < g->n_nodes; s++) {
            const vkg_ir_node *n = &g->nodes[cur];
            uint32_t next = cur;
            for (uint32_t k = 0; k < n->n_inputs; k++) {
                uint32_t t = n->inputs[k];
                if (t != VKG_IR_NONE && g->tensors[t].producer != VKG_IR_NONE && indeg[g->tensors[t].producer]) {
                    next = g->tensors[t].producer;
                    break;
                }
            }
            cur = next;
            step[phase]++;
            if (phase == 1 && cur == start) break;
        }
    }
    /* cur is on the cycle; list it (consumer <- producer order) for the message. */
    char path[768];
    size_t len = 0;
    uint32_t at = cur;
    for (uint32_t s = 0; s < step[1] + 1 && len < sizeof path - 64; s++) {
        int w = snprintf(path + len, sizeof path - len, "%s\"%.40s\"", s ? " <- " : "", g->nodes[at].name);
        if (w > 0) len += (size_t)w;
        const vkg_ir_node *n = &g->nodes[at];
        for (uint32_t k = 0; k < n->n_inputs; k++) {
            uint32_t t = n->inputs[k];
            if (t != VKG_IR_NONE && g->tensors[t].producer != VKG_IR_NONE && indeg[g->tensors[t].producer]) {
                at = g->tensors[t].producer;
                break;
            }
        }
    }
    return bad(ps, "NODES", "cycle through node \"%s\": %s (each reads an output of the next)", g->nodes[cur].name, path);
}

static vkg_status topo_sort(parser *ps)
{
    vkg_graph *g = ps->g;
    uint32_t nn = g->n_nodes, nt = g->n_tensors;
    vkg_status st = VKG_SUCCESS;
    /* Temporaries, freed below: in-degrees, the heap, consumers of each tensor (CSR), the order. */
    uint32_t *indeg = calloc((size_t)nn + 1, sizeof *indeg);
    uint32_t *heap = malloc(((size_t)nn + 1) * sizeof *heap);
    uint32_t *first = calloc((size_t)nt + 1, sizeof *first);
    uint32_t *order = malloc(((size_t)nn + 1) * sizeof *order);
    size_t n_edges = 0;
    for (uint32_t i = 0; i < nn; i++) n_edges += g->nodes[i].n_inputs;
    uint32_t *cons = malloc((n_edges + 1) * sizeof *cons);
    if (!indeg || !heap || !first || !order || !cons) {
        st = oom(ps, "NODES");
        goto done;
    }
    for (uint32_t i = 0; i < nn; i++)
        for (uint32_t k = 0; k < g->nodes[i].n_inputs; k++) {
            uint32_t t = g->nodes[i].inputs[k];
            if (t == VKG_IR_NONE || g->tensors[t].producer == VKG_IR_NONE) continue;
            indeg[i]++;
            first[t]++;
        }
    /* first[t] becomes the start of t's consumer range; it is advanced while filling. */
    uint32_t sum = 0;
    for (uint32_t t = 0; t <= nt; t++) {
        uint32_t c = first[t];
        first[t] = sum;
        sum += c;
    }
    for (uint32_t i = 0; i < nn; i++)
        for (uint32_t k = 0; k < g->nodes[i].n_inputs; k++) {
            uint32_t t = g->nodes[i].inputs[k];
            if (t == VKG_IR_NONE || g->tensors[t].producer == VKG_IR_NONE) continue;
            cons[first[t]++] = i;
        }
    /* After filling, t's consumers are cons[first[t-1] .. first[t]). */
    uint32_t hn = 0, done_n = 0;
    for (uint32_t i = 0; i < nn; i++)
        if (!indeg[i]) heap_push(heap, &hn, i);
    while (hn) {
        uint32_t i = heap_pop(heap, &hn);
        order[done_n++] = i;
        const vkg_ir_node *n = &g->nodes[i];
        for (uint32_t k = 0; k < n->n_outputs; k++) {
            uint32_t t = n->outputs[k];
            for (uint32_t c = t ? first[t - 1] : 0; c < first[t]; c++)
                if (--indeg[cons[c]] == 0) heap_push(heap, &hn, cons[c]);
        }
    }
    if (done_n != nn) {
        st = report_cycle(ps, indeg);
        goto done;
    }
    vkg_ir_node *sorted = ALLOC(ps, nn ? nn : 1, vkg_ir_node);
    if (!sorted) {
        st = oom(ps, "NODES");
        goto done;
    }
    for (uint32_t i = 0; i < nn; i++) {
        sorted[i] = g->nodes[order[i]];
        for (uint32_t k = 0; k < sorted[i].n_outputs; k++) g->tensors[sorted[i].outputs[k]].producer = i;
    }
    g->nodes = sorted; /* the unsorted array stays in the arena until the graph is freed */
done:
    free(indeg);
    free(heap);
    free(first);
    free(order);
    free(cons);
    return st;
}

/* ---- entry points ---- */

static vkg_status parse_all(parser *ps)
{
    VKG_TRY(parse_header(ps));
    VKG_TRY(check_sections(ps));
    VKG_TRY(parse_strings(ps));
    VKG_TRY(parse_tensors(ps));
    VKG_TRY(parse_nodes(ps));
    VKG_TRY(parse_graph_io(ps));
    VKG_TRY(parse_metadata(ps));
    VKG_TRY(check_producers(ps));
    VKG_TRY(topo_sort(ps));
    for (uint32_t i = 0; i < ps->g->n_nodes; i++) VKG_TRY(vkg_op_validate(ps->g, &ps->g->nodes[i]));
    return VKG_SUCCESS;
}

/* On success *out is owned by the caller (vkg_graph_free). */
vkg_status vkg_graph_parse(const void *data, size_t size, const char *source, bool copy, vkg_graph **out)
{
    if (!out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_graph_parse: out is NULL");
    *out = NULL;
    if (!data && size) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_graph_parse: data is NULL but size is %zu", size);
    if (!source) source = "<memory>";
    vkg_graph *g = calloc(1, sizeof *g);
    if (!g) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", source);
    size_t slen = strlen(source);
    char *src = arena_alloc(&g->arena, slen + 1, 1);
    if (!src) {
        vkg_graph_free(g);
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", source);
    }
    memcpy(src, source, slen + 1);
    g->source = src;
    if (copy && size) {
        g->image_owned = malloc(size);
        if (!g->image_owned) {
            vkg_graph_free(g);
            return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory copying %zu bytes", source, size);
        }
        memcpy(g->image_owned, data, size);
        data = g->image_owned;
    }
    g->image = data;
    g->image_size = size;
    parser ps = {.g = g, .p = data, .size = size};
    vkg_status st = parse_all(&ps);
    if (st != VKG_SUCCESS) {
        vkg_graph_free(g);
        return st;
    }
    *out = g;
    return VKG_SUCCESS;
}

/* On success *out is owned by the caller (vkg_graph_free), and owns the mapping. */
vkg_status vkg_graph_load_file(const char *path, vkg_graph **out)
{
    if (!out || !path) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_graph_load_file: path and out must not be NULL");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return vkg_fail(VKG_ERROR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return vkg_fail(VKG_ERROR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return vkg_fail(VKG_ERROR_IO, "%s: not a regular file", path);
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        return vkg_fail(VKG_ERROR_IO, "%s: %lld bytes do not fit in the address space", path, (long long)st.st_size);
    }
    size_t size = (size_t)st.st_size;
    void *map = NULL;
    if (size) {
        map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            return vkg_fail(VKG_ERROR_IO, "%s: cannot map %zu bytes: %s", path, size, strerror(e));
        }
    }
    close(fd); /* the mapping stays valid without the descriptor */
    vkg_graph *g = NULL;
    vkg_status s = vkg_graph_parse(size ? map : "", size, path, false, &g);
    if (s != VKG_SUCCESS) {
        if (map) munmap(map, size);
        return s;
    }
    g->image_mapped = map;
    *out = g;
    return VKG_SUCCESS;
}

void vkg_graph_free(vkg_graph *g)
{
    if (!g) return;
    if (g->image_mapped) munmap(g->image_mapped, g->image_size);
    free(g->image_owned);
    arena_free(g->arena);
    free(g);
}
