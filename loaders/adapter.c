/* PEFT LoRA adapters: adapter_config.json (cJSON) and adapter_model.safetensors resolved against a
 * loaded model by tensor names, then merged into its weights buffer (W = W0 + s (alpha/r) B A). Sessions
 * read constants straight from the model's weights buffer (graph/session.c: no copy, no repacking),
 * so rewriting a constant there is all an adapter needs. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <regex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "graph/exec.h"
#include "loaders/safetensors.h"

#define PEFT_PREFIX "base_model.model."

/* One weight the adapter changes: lora_A (r, k) and lora_B (n, r) widened to float. */
typedef struct adapter_match {
    uint32_t tensor; /* the weight's id in the model's graph */
    uint32_t n, k, r;
    float *a, *b;
} adapter_match;

typedef struct adapter_config {
    char *path;
    int64_t r;
    double alpha;
    bool rslora;
    cJSON *root;           /* owned; target_modules points into it */
    const cJSON *targets;  /* a list of strings, or NULL with has_regex set */
    regex_t regex;         /* a target_modules string, as a full match of the module path */
    bool has_regex;
} adapter_config;

struct vkg_adapter {
    const vkg_model *model;
    double scaling; /* alpha / r, or alpha / sqrt(r) (use_rslora) */
    adapter_match *match;
    uint32_t n_match;
    char **unmatched; /* "name: reason", each malloc'd */
    uint32_t n_unmatched, cap_unmatched;
};

static vkg_status oom(void) { return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "adapter: out of host memory"); }

/* ---- adapter_config.json ---- */

static vkg_status read_text(const char *path, char **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) return vkg_fail(VKG_ERROR_IO, "%s: cannot open: %s", path, strerror(errno));
    vkg_status s = VKG_SUCCESS;
    long len = -1;
    if (fseek(f, 0, SEEK_END) == 0) len = ftell(f);
    if (len < 0 || len > (long)VKG_ST_MAX_HEADER || fseek(f, 0, SEEK_SET) != 0)
        s = vkg_fail(VKG_ERROR_IO, "%s: cannot determine its size, or it is over %u bytes", path, VKG_ST_MAX_HEADER);
    else if (!(*out = malloc((size_t)len + 1))) s = oom();
    else if (fread(*out, 1, (size_t)len, f) != (size_t)len) s = vkg_fail(VKG_ERROR_IO, "%s: cannot read", path);
    else (*out)[len] = '\0';
    fclose(f);
    if (s != VKG_SUCCESS) {
        free(*out);
        *out = NULL;
    }
    return s;
}

static vkg_status cfg_fail(const adapter_config *c, const char *what)
{
    return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: %s", c->path, what);
}

/* Python's re syntax beyond POSIX extended expressions ((?:...), \d, \w, lookarounds) would match
 * differently here: such patterns are refused rather than guessed. */
static vkg_status compile_regex(adapter_config *c, const char *pattern)
{
    for (const char *p = pattern; *p; p++) {
        if (p[0] == '(' && p[1] == '?')
            return cfg_fail(c, "target_modules is a regular expression with a \"(?\" group; only POSIX extended syntax is supported");
        if (p[0] == '\\' && p[1]) {
            if ((p[1] >= 'a' && p[1] <= 'z') || (p[1] >= 'A' && p[1] <= 'Z') || (p[1] >= '0' && p[1] <= '9'))
                return cfg_fail(c, "target_modules is a regular expression with a class escape such as \\d or \\w; "
                                   "only POSIX extended syntax is supported (escape punctuation only)");
            p++;
        }
    }
    size_t len = strlen(pattern) + 5;
    char *full = malloc(len);
    if (!full) return oom();
    snprintf(full, len, "^(%s)$", pattern);
    int rc = regcomp(&c->regex, full, REG_EXTENDED | REG_NOSUB);
    free(full);
    if (rc != 0) return cfg_fail(c, "target_modules is not a valid POSIX extended regular expression");
    c->has_regex = true;
    return VKG_SUCCESS;
}

static vkg_status cfg_targets(adapter_config *c)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(c->root, "target_modules");
    if (cJSON_IsString(t)) return compile_regex(c, t->valuestring);
    if (!cJSON_IsArray(t)) return cfg_fail(c, "target_modules is missing, or neither a list of strings nor a string");
    for (const cJSON *e = t->child; e; e = e->next)
        if (!cJSON_IsString(e) || !e->valuestring[0]) return cfg_fail(c, "target_modules holds an entry that is not a non-empty string");
    c->targets = t;
    return VKG_SUCCESS;
}

static bool pattern_set(const cJSON *root, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(root, key);
    return v && !cJSON_IsNull(v) && !(cJSON_IsObject(v) && !v->child);
}

static bool flag(const cJSON *root, const char *key) { return cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(root, key)); }

/* Options that change what the weights mean are refused, not ignored. */
static vkg_status cfg_refusals(const adapter_config *c)
{
    const cJSON *pt = cJSON_GetObjectItemCaseSensitive(c->root, "peft_type");
    if (pt && (!cJSON_IsString(pt) || strcmp(pt->valuestring, "LORA") != 0))
        return cfg_fail(c, "peft_type is not \"LORA\"; only LoRA adapters are supported");
    if (flag(c->root, "fan_in_fan_out"))
        return cfg_fail(c, "fan_in_fan_out is true (Conv1D-style (in, out) weights); only nn.Linear's (out, in) layout is supported");
    if (flag(c->root, "use_dora")) return cfg_fail(c, "use_dora is true; DoRA adapters are not supported");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(c->root, "bias");
    if (b && !cJSON_IsNull(b) && (!cJSON_IsString(b) || strcmp(b->valuestring, "none") != 0))
        return cfg_fail(c, "bias is not \"none\"; adapters that train biases are not supported");
    if (pattern_set(c->root, "rank_pattern") || pattern_set(c->root, "alpha_pattern"))
        return cfg_fail(c, "rank_pattern or alpha_pattern is set; per-module ranks and alphas are not supported");
    return VKG_SUCCESS;
}

static vkg_status cfg_numbers(adapter_config *c)
{
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(c->root, "r");
    const cJSON *al = cJSON_GetObjectItemCaseSensitive(c->root, "lora_alpha");
    if (!cJSON_IsNumber(r) || !(r->valuedouble >= 1 && r->valuedouble <= 1e6) || r->valuedouble != (double)(int64_t)r->valuedouble)
        return cfg_fail(c, "r is missing or not an integer in 1..1000000");
    if (!cJSON_IsNumber(al) || !isfinite(al->valuedouble)) return cfg_fail(c, "lora_alpha is missing or not a finite number");
    const cJSON *rs = cJSON_GetObjectItemCaseSensitive(c->root, "use_rslora");
    if (rs && !cJSON_IsBool(rs) && !cJSON_IsNull(rs)) return cfg_fail(c, "use_rslora is not true or false");
    c->r = (int64_t)r->valuedouble;
    c->alpha = al->valuedouble;
    c->rslora = cJSON_IsTrue(rs);
    return VKG_SUCCESS;
}

static void cfg_free(adapter_config *c)
{
    if (c->has_regex) regfree(&c->regex);
    cJSON_Delete(c->root);
    free(c->path);
}

static vkg_status cfg_read(const char *path, adapter_config *c)
{
    memset(c, 0, sizeof *c);
    if (!(c->path = strdup(path))) return oom();
    char *text;
    VKG_TRY(read_text(path, &text));
    const char *end = NULL;
    c->root = cJSON_ParseWithOpts(text, &end, 1);
    size_t at = end && end >= text ? (size_t)(end - text) : 0;
    free(text);
    if (!c->root) return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: not valid JSON (error near byte %zu)", path, at);
    if (!cJSON_IsObject(c->root)) return cfg_fail(c, "the top level is not a JSON object");
    VKG_TRY(cfg_refusals(c));
    VKG_TRY(cfg_numbers(c));
    return cfg_targets(c);
}

/* PEFT's rule for a list entry: the module path equals it or ends with "." + it. */
static bool suffix_match(const char *module, size_t ml, const char *target)
{
    size_t tl = strlen(target);
    return tl <= ml && !strncmp(module + ml - tl, target, tl) && (tl == ml || module[ml - tl - 1] == '.');
}

/* module: ml bytes, not NUL-terminated where it is followed by ".weight". */
static bool targeted(const adapter_config *c, const char *module, size_t ml)
{
    if (c->has_regex) {
        char *s = strndup(module, ml);
        bool hit = s && regexec(&c->regex, s, 0, NULL, 0) == 0;
        free(s);
        return hit;
    }
    for (const cJSON *e = c->targets->child; e; e = e->next)
        if (suffix_match(module, ml, e->valuestring)) return true;
    return false;
}

/* ---- the adapter object ---- */

static vkg_status add_unmatched(vkg_adapter *a, const char *name, const char *reason)
{
    if (a->n_unmatched == a->cap_unmatched) {
        uint32_t cap = a->cap_unmatched ? a->cap_unmatched * 2 : 8;
        char **p = realloc(a->unmatched, cap * sizeof *p);
        if (!p) return oom();
        a->unmatched = p;
        a->cap_unmatched = cap;
    }
    size_t len = strlen(name) + strlen(reason) + 3;
    char *s = malloc(len);
    if (!s) return oom();
    snprintf(s, len, "%s: %s", name, reason);
    a->unmatched[a->n_unmatched++] = s;
    return VKG_SUCCESS;
}

void vkg_adapter_destroy(vkg_adapter *a)
{
    if (!a) return;
    for (uint32_t i = 0; i < a->n_match; i++) {
        free(a->match[i].a);
        free(a->match[i].b);
    }
    free(a->match);
    for (uint32_t i = 0; i < a->n_unmatched; i++) free(a->unmatched[i]);
    free(a->unmatched);
    free(a);
}

uint32_t vkg_adapter_matched_count(const vkg_adapter *a) { return a ? a->n_match : 0; }
uint32_t vkg_adapter_unmatched_count(const vkg_adapter *a) { return a ? a->n_unmatched : 0; }
const char *vkg_adapter_unmatched(const vkg_adapter *a, uint32_t i) { return a && i < a->n_unmatched ? a->unmatched[i] : NULL; }

/* ---- keys ---- */

/* Whether body[0, len) ends with ".lora_A" or ".lora_B" after a non-empty module path. */
static bool lora_tail(const char *body, size_t len)
{
    return len > 7 && !strncmp(body + len - 7, ".lora_", 6) && (body[len - 1] == 'A' || body[len - 1] == 'B');
}

/* Splits "[base_model.model.]<module>.lora_A[.<adapter name>].weight" (or lora_B). Returns the module
 * path's length (0 when the key has another form); *module points into key, *side_at is the index
 * of the key's 'A' or 'B'. */
static size_t split_key(const char *key, const char **module, size_t *side_at)
{
    *module = strncmp(key, PEFT_PREFIX, strlen(PEFT_PREFIX)) ? key : key + strlen(PEFT_PREFIX);
    size_t len = strlen(*module);
    if (len < 8 || strcmp(*module + len - 7, ".weight")) return 0;
    len -= 7;
    if (!lora_tail(*module, len)) { /* an adapter name between: ".lora_A.default" */
        size_t dot = len;
        while (dot > 0 && (*module)[dot - 1] != '.') dot--;
        if (dot < 2 || dot == len) return 0;
        len = dot - 1;
        if (!lora_tail(*module, len)) return 0;
    }
    *side_at = (size_t)(*module - key) + len - 1;
    return len - 7;
}

/* The tensor whose name is key with `side` ('A' or 'B') at side_at, or NULL. */
static const vkg_st_tensor *find_side(const vkg_st_file *f, const char *key, size_t side_at, char side)
{
    size_t len = strlen(key);
    for (uint32_t i = 0; i < f->n_tensors; i++) {
        const char *n = f->tensors[i].name;
        if (strlen(n) == len && n[side_at] == side && !strncmp(n, key, side_at) && !strcmp(n + side_at + 1, key + side_at + 1))
            return &f->tensors[i];
    }
    return NULL;
}

/* ---- resolving a module against the model ---- */

/* NULL when the weight can take the adapter, else why not (a static string). */
static const char *weight_refusal(const vkg_graph *g, uint32_t id)
{
    const vkg_ir_tensor *w = &g->tensors[id];
    if (w->role != VKG_ROLE_CONSTANT) return "the model's tensor of that name is not a constant";
    if (!w->data || !w->data_size) return "the model's weight is empty";
    bool linear = false;
    for (uint32_t n = 0; n < g->n_nodes; n++)
        for (uint32_t i = 0; i < g->nodes[n].n_inputs; i++) {
            if (g->nodes[n].inputs[i] != id) continue;
            /* Any other reader (a router, an expert stack, a conv) would see the merged values too. */
            if (strcmp(g->nodes[n].op, "linear") != 0 || i != 1)
                return "the weight is read by a node other than as a linear weight (only linear weights take adapters)";
            linear = true;
        }
    if (!linear) return "no linear node uses the weight";
    const uint8_t *lo = w->data, *hi = lo + w->data_size;
    for (uint32_t t = 0; t < g->n_tensors; t++) {
        const vkg_ir_tensor *o = &g->tensors[t];
        if (t == id || o->role != VKG_ROLE_CONSTANT || !o->data) continue;
        if ((const uint8_t *)o->data < hi && (const uint8_t *)o->data + o->data_size > lo)
            return "the weight shares its bytes with another constant";
    }
    return NULL;
}

static vkg_status bad_pair(const vkg_st_file *f, const char *ka, const char *kb, const char *what, long long v1, long long v2)
{
    return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensors \"%s\" and \"%s\": %s (%lld vs %lld)", f->path, ka, kb, what, v1, v2);
}

/* The adapter's own consistency: rank-2 tensors, r rows of A, r columns of B. */
static vkg_status check_pair(const vkg_st_file *f, const adapter_config *c, const vkg_st_tensor *A, const vkg_st_tensor *B)
{
    if (A->rank != 2 || B->rank != 2) return bad_pair(f, A->name, B->name, "lora_A and lora_B must be 2-d; ranks", A->rank, B->rank);
    if (A->dims[0] != c->r) return bad_pair(f, A->name, B->name, "lora_A has a row count other than the config's r", A->dims[0], c->r);
    if (B->dims[1] != c->r)
        return bad_pair(f, A->name, B->name, "lora_B has a column count other than the config's r", B->dims[1], c->r);
    return VKG_SUCCESS;
}

static float *widen(const vkg_st_tensor *t)
{
    float *p = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *p);
    for (uint64_t i = 0; p && i < t->numel; i++) p[i] = vkg_st_get(t, i);
    return p;
}

static bool already_matched(const vkg_adapter *a, uint32_t id)
{
    for (uint32_t i = 0; i < a->n_match; i++)
        if (a->match[i].tensor == id) return true;
    return false;
}

/* Resolves one lora_A/lora_B pair; a mismatch with the model becomes an unmatched entry. */
static vkg_status resolve_pair(vkg_adapter *a, const vkg_st_file *f, const adapter_config *c, const vkg_st_tensor *A,
                               const vkg_st_tensor *B, const char *module, size_t mlen)
{
    VKG_TRY(check_pair(f, c, A, B));
    char *wname = malloc(mlen + 8);
    if (!wname) return oom();
    memcpy(wname, module, mlen);
    memcpy(wname + mlen, ".weight", 8);
    bool target = targeted(c, wname, mlen);
    const vkg_graph *g = a->model->g;
    uint32_t id = vkg_ir_tensor_find(g, wname);
    char missing[600];
    snprintf(missing, sizeof missing, "the model has no tensor \"%.500s\"", wname);
    free(wname);
    const vkg_ir_tensor *w = id == VKG_IR_NONE ? NULL : &g->tensors[id];
    const char *why = !target ? "its module is not in target_modules" : !w ? missing : weight_refusal(g, id);
    if (!why && (w->rank != 2 || w->dims[0] != B->dims[0] || w->dims[1] != A->dims[1] || w->dims[0] > UINT32_MAX ||
                 w->dims[1] > UINT32_MAX))
        why = "shape mismatch: lora_B (out, r) @ lora_A (r, in) does not match the model's weight (out, in)";
    if (!why && already_matched(a, id)) why = "a second adapter for the same weight";
    if (why) return add_unmatched(a, A->name, why);
    adapter_match *mt = &a->match[a->n_match];
    *mt = (adapter_match){.tensor = id, .n = (uint32_t)w->dims[0], .k = (uint32_t)w->dims[1], .r = (uint32_t)c->r};
    mt->a = widen(A);
    mt->b = widen(B);
    a->n_match++;
    return mt->a && mt->b ? VKG_SUCCESS : oom();
}

static vkg_status resolve_key(vkg_adapter *a, const vkg_st_file *f, const adapter_config *c, const vkg_st_tensor *t)
{
    const char *module;
    size_t side_at = 0, mlen = split_key(t->name, &module, &side_at);
    if (!mlen) return add_unmatched(a, t->name, "not a lora_A or lora_B weight (only LoRA on linear weights is supported)");
    if (t->name[side_at] == 'B') /* handled with its lora_A; only an orphan is reported */
        return find_side(f, t->name, side_at, 'A') ? VKG_SUCCESS : add_unmatched(a, t->name, "no lora_A weight for this lora_B");
    const vkg_st_tensor *B = find_side(f, t->name, side_at, 'B');
    if (!B) return add_unmatched(a, t->name, "no lora_B weight for this lora_A");
    return resolve_pair(a, f, c, t, B, module, mlen);
}

/* Every list entry of target_modules (or the regular expression) that matched none of the applied
 * weights. */
static vkg_status report_targets(vkg_adapter *a, const adapter_config *c)
{
    if (!c->targets)
        return a->n_match ? VKG_SUCCESS : add_unmatched(a, "target_modules (a regular expression)", "matches no weight the adapter changes");
    for (const cJSON *e = c->targets->child; e; e = e->next) {
        bool hit = false;
        for (uint32_t i = 0; i < a->n_match && !hit; i++) {
            const char *name = a->model->g->tensors[a->match[i].tensor].name;
            hit = suffix_match(name, strlen(name) - 7, e->valuestring); /* the module: name without ".weight" */
        }
        if (!hit) {
            char label[300];
            snprintf(label, sizeof label, "target_modules entry \"%.256s\"", e->valuestring);
            VKG_TRY(add_unmatched(a, label, "matches no weight the adapter changes"));
        }
    }
    return VKG_SUCCESS;
}

/* ---- loading ---- */

static bool ends_with(const char *s, const char *tail)
{
    size_t ls = strlen(s), lt = strlen(tail);
    return ls >= lt && !strcmp(s + ls - lt, tail);
}

static char *join(const char *folder, size_t len, const char *file)
{
    size_t cap = len + strlen(file) + 2;
    char *p = malloc(cap);
    if (p) snprintf(p, cap, "%.*s/%s", (int)len, folder, file);
    return p;
}

/* dir/adapter_model.safetensors and dir/adapter_config.json, or a file path and its sibling. */
static vkg_status adapter_paths(const char *dir, char **st, char **cfg)
{
    struct stat sb;
    bool folder = stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode);
    bool is_st = !folder && ends_with(dir, ".safetensors"), is_cfg = !folder && ends_with(dir, ".json");
    if (!folder && !is_st && !is_cfg)
        return vkg_fail(VKG_ERROR_IO, "%s: not a folder holding adapter_model.safetensors and adapter_config.json, "
                        "nor a .safetensors or .json file", dir);
    const char *slash = strrchr(dir, '/'), *parent = folder ? dir : slash ? dir : ".";
    size_t len = folder ? strlen(dir) : slash ? (size_t)(slash - dir) : 1;
    *st = is_st ? strdup(dir) : join(parent, len, "adapter_model.safetensors");
    *cfg = is_cfg ? strdup(dir) : join(parent, len, "adapter_config.json");
    return *st && *cfg ? VKG_SUCCESS : oom();
}

static vkg_status load_into(vkg_adapter *a, const char *st_path, const char *cfg_path)
{
    adapter_config c;
    vkg_st_file *f = NULL;
    vkg_status s = cfg_read(cfg_path, &c);
    if (s == VKG_SUCCESS) s = vkg_st_read(st_path, &f);
    if (s == VKG_SUCCESS) {
        a->scaling = c.rslora ? c.alpha / sqrt((double)c.r) : c.alpha / (double)c.r;
        if (!(a->match = calloc(f->n_tensors ? f->n_tensors : 1, sizeof *a->match))) s = oom();
    }
    for (uint32_t i = 0; s == VKG_SUCCESS && i < f->n_tensors; i++) s = resolve_key(a, f, &c, &f->tensors[i]);
    if (s == VKG_SUCCESS) s = report_targets(a, &c);
    vkg_st_free(f);
    cfg_free(&c);
    return s;
}

vkg_status vkg_adapter_load(vkg_model *model, const char *dir, vkg_adapter **out)
{
    if (!model || !dir || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_adapter_load: NULL argument");
    *out = NULL;
    char *st = NULL, *cfg = NULL;
    vkg_adapter *a = calloc(1, sizeof *a);
    vkg_status s = a ? adapter_paths(dir, &st, &cfg) : oom();
    if (s == VKG_SUCCESS) {
        a->model = model;
        s = load_into(a, st, cfg);
    }
    free(st);
    free(cfg);
    if (s != VKG_SUCCESS) {
        vkg_adapter_destroy(a);
        return s;
    }
    *out = a;
    return VKG_SUCCESS;
}

/* ---- merging ---- */

static vkg_status upload_tensor(vkg_model *m, uint32_t id, const void *bytes)
{
    const vkg_ir_tensor *t = &m->g->tensors[id];
    vkg_status s = vkg_buf_upload(m->weights, (VkDeviceSize)((const uint8_t *)t->data - m->weights_base), bytes, t->data_size);
    return s == VKG_SUCCESS ? s : vkg_fail_prefix(s, "%s: weight \"%s\"", m->g->source, t->name);
}

/* Puts the file's bytes back for every merged weight; stops at the first failure. */
static vkg_status restore_base(vkg_model *m)
{
    while (m->n_adapted) {
        uint32_t id = m->adapted[m->n_adapted - 1];
        VKG_TRY(upload_tensor(m, id, m->g->tensors[id].data));
        m->n_adapted--;
    }
    return VKG_SUCCESS;
}

static float base_value(const vkg_ir_tensor *t, uint64_t i)
{
    if (t->dtype == VKG_DTYPE_F16) {
        uint16_t h;
        memcpy(&h, (const uint8_t *)t->data + i * 2, 2);
        return vkg_f16_to_f32(h);
    }
    float f;
    memcpy(&f, (const uint8_t *)t->data + i * 4, 4);
    return f;
}

/* W0 + coef B A into out (the weight's dtype), row by row with a double accumulator per column. */
static void merge_weight(const vkg_ir_tensor *t, const adapter_match *mt, double coef, void *out, double *acc)
{
    for (uint32_t n = 0; n < mt->n; n++) {
        memset(acc, 0, mt->k * sizeof *acc);
        for (uint32_t j = 0; j < mt->r; j++) {
            double b = mt->b[(size_t)n * mt->r + j];
            const float *arow = mt->a + (size_t)j * mt->k;
            for (uint32_t k = 0; k < mt->k; k++) acc[k] += b * arow[k];
        }
        for (uint32_t k = 0; k < mt->k; k++) {
            size_t i = (size_t)n * mt->k + k;
            float v = (float)((double)base_value(t, i) + coef * acc[k]);
            if (t->dtype == VKG_DTYPE_F16) ((uint16_t *)out)[i] = vkg_f32_to_f16(v);
            else ((float *)out)[i] = v;
        }
    }
}

static vkg_status apply_one(vkg_model *m, const adapter_match *mt, double coef)
{
    const vkg_ir_tensor *t = &m->g->tensors[mt->tensor];
    void *out = malloc(t->data_size);
    double *acc = malloc((size_t)mt->k * sizeof *acc);
    vkg_status s = out && acc ? VKG_SUCCESS : oom();
    if (s == VKG_SUCCESS) {
        merge_weight(t, mt, coef, out, acc);
        /* Recorded first: a partial upload must be undone too. */
        m->adapted[m->n_adapted++] = mt->tensor;
        s = upload_tensor(m, mt->tensor, out);
    }
    free(out);
    free(acc);
    return s;
}

vkg_status vkg_model_apply_adapter(vkg_model *m, const vkg_adapter *a, float scale)
{
    if (!m) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_apply_adapter: NULL model");
    if (a && a->model != m)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_apply_adapter: the adapter was loaded for another model");
    if (a && !isfinite(scale)) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_apply_adapter: scale %g is not finite", scale);
    VKG_TRY(vkg_context_alive(m->ctx, "vkg_model_apply_adapter"));
    VKG_TRY(restore_base(m));
    if (!a || !a->n_match) return vkg_context_check_validation(m->ctx);
    uint32_t *ids = realloc(m->adapted, a->n_match * sizeof *ids);
    if (!ids) return oom();
    m->adapted = ids;
    double coef = (double)scale * a->scaling;
    vkg_status s = VKG_SUCCESS;
    for (uint32_t i = 0; i < a->n_match && s == VKG_SUCCESS; i++) s = apply_one(m, &a->match[i], coef);
    if (s == VKG_SUCCESS) s = vkg_context_check_validation(m->ctx);
    if (s != VKG_SUCCESS) (void)restore_base(m); /* best effort: the failure to report is the first one */
    return s;
}
