/* config.c — configuration loading, validation and writing, all driven by the
 * schema table in config_schema.c (see sp_config.h for the rules).
 *
 * YAML is read with libyaml's document API: it keeps the line of every node,
 * which every message needs. Values are converted into a scratch slot and
 * checked before they replace anything, so a failed load or set leaves the
 * caller's config untouched. */
#include "config_internal.h"
#include "surveyproc/sp_config.h"
#include "surveyproc/sp_error.h"

#include <yaml.h>

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef SP_VERSION
#define SP_VERSION "unknown"
#endif

#define MAX_CONFIG_BYTES (16L << 20) /* a config larger than this is surely the wrong file */
#define MAX_REPORTED 12              /* errors listed in one message; the rest are counted */
#define ERRBUF 1900                  /* fits sp_err's 2048-byte message buffer */
#define VALBUF 4096                  /* formatted value of one key */

/* Enum fields are read and written as int through the schema's offsets. */
_Static_assert(sizeof(sp_log_level) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_psfstar_mode) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_epsf_interp) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_smoothing) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_bkg_estimator) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_fallback_model) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_gal_model) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_psf_model) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_halo_mode) == sizeof(int), "enum size");
_Static_assert(sizeof(sp_cfg_coordinator) == sizeof(int), "enum size");

/* Scratch storage for one converted value; the largest field is 16 bytes. */
typedef union {
    bool b;
    int i;
    double d;
    char *s;
    sp_cfg_strlist l;
    int iv[4];
    double dv[4];
} slot_t;

/* ------------------------------------------------------------------ errors */

/* All problems of one file, reported together: fixing a config should not
 * take one run per typo. */
typedef struct {
    const char *name; /* file name (or "--set", "schema default") for messages */
    char buf[ERRBUF];
    size_t len;
    int nerr;
    int nseed; /* of which: tract7dt keys */
} errlist;

static void el_init(errlist *el, const char *name)
{
    el->name = name ? name : "config";
    el->buf[0] = '\0';
    el->len = 0;
    el->nerr = 0;
    el->nseed = 0;
}

static void el_append(errlist *el, const char *line)
{
    size_t n = strlen(line);
    if (el->len + n + 2 >= sizeof el->buf) return;
    if (el->len) el->buf[el->len++] = '\n';
    memcpy(el->buf + el->len, line, n + 1);
    el->len += n;
}

/* Record "NAME:LINE: KEY: message" (without ":LINE" when line <= 0). */
__attribute__((format(printf, 4, 5))) static void el_add(errlist *el, int line, const char *key, const char *fmt, ...)
{
    char msg[600], full[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (line > 0)
        snprintf(full, sizeof full, "%s:%d: %s%s%s", el->name, line, key ? key : "", key ? ": " : "", msg);
    else
        snprintf(full, sizeof full, "%s: %s%s%s", el->name, key ? key : "", key ? ": " : "", msg);
    if (el->nerr < MAX_REPORTED) el_append(el, full);
    el->nerr++;
}

/* Turn the collected errors into the thread's sp_err message. */
static int el_fail(errlist *el, int code)
{
    if (el->nerr > MAX_REPORTED) {
        char more[96];
        snprintf(more, sizeof more, "(%d more errors not shown)", el->nerr - MAX_REPORTED);
        el_append(el, more);
    }
    if (el->nseed) {
        char hint[160];
        snprintf(hint, sizeof hint,
                 "(%d key%s from tract7dt: docs/config.md, 'Coming from tract7dt', maps them to surveyproc)",
                 el->nseed, el->nseed == 1 ? "" : "s");
        el_append(el, hint);
    }
    return SP_FAIL(code, "%s", el->buf);
}

/* ------------------------------------------------------------------ schema */

int sp_config_nkeys(void) { return sp_cfg_nschema; }

const sp_config_key *sp_config_key_at(int i)
{
    return i >= 0 && i < sp_cfg_nschema ? &sp_cfg_schema[i] : NULL;
}

const sp_config_key *sp_config_find_key(const char *name)
{
    if (!name) return NULL;
    for (int i = 0; i < sp_cfg_nschema; i++)
        if (!strcmp(sp_cfg_schema[i].name, name)) return &sp_cfg_schema[i];
    return NULL;
}

static int key_index(const sp_config_key *k) { return (int)(k - sp_cfg_schema); }

const char *sp_config_section_doc(const char *section)
{
    if (!section) return NULL;
    for (int i = 0; i < sp_cfg_nsections; i++)
        if (!strcmp(sp_cfg_sections[i].name, section)) return sp_cfg_sections[i].doc;
    return NULL;
}

/* A section or nested group: some key's name starts with "name.". */
static int is_group(const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < sp_cfg_nschema; i++)
        if (!strncmp(sp_cfg_schema[i].name, name, n) && sp_cfg_schema[i].name[n] == '.') return 1;
    return 0;
}

const char *sp_config_type_name(sp_cfg_type type)
{
    switch (type) {
    case SP_CFG_T_BOOL: return "bool";
    case SP_CFG_T_INT: return "int";
    case SP_CFG_T_DOUBLE: return "double";
    case SP_CFG_T_STRING: return "string";
    case SP_CFG_T_PATH: return "path";
    case SP_CFG_T_ENUM: return "enum";
    case SP_CFG_T_STRLIST: return "string-list";
    case SP_CFG_T_AUTO_INT: return "auto-or-int";
    case SP_CFG_T_INT_VEC: return "int-list";
    case SP_CFG_T_DOUBLE_VEC: return "double-list";
    }
    return "?";
}

static int n_values(const char *const *v)
{
    int n = 0;
    while (v && v[n]) n++;
    return n;
}

static int vec_len(const sp_config_key *k)
{
    return (int)(k->size / (k->type == SP_CFG_T_INT_VEC ? sizeof(int) : sizeof(double)));
}

/* Numbers in messages and docs: integers without an exponent. */
static void fmt_num(double v, char *buf, size_t n)
{
    if (v == floor(v) && fabs(v) < 1e15)
        snprintf(buf, n, "%.0f", v);
    else
        snprintf(buf, n, "%g", v);
}

static void range_text(const sp_config_key *k, char *buf, size_t n)
{
    char lo[40], hi[40];
    fmt_num(k->min, lo, sizeof lo);
    fmt_num(k->max, hi, sizeof hi);
    snprintf(buf, n, "%s%s, %s]", (k->flags & SP_CFG_F_MIN_EXCL) ? "(" : "[", lo, hi);
}

static void join_values(const char *const *v, char *buf, size_t n)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int i = 0; v && v[i] && len + 1 < n; i++)
        len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? ", " : "", v[i]);
}

void sp_config_allowed_text(const sp_config_key *k, char *buf, size_t n)
{
    char r[100], vals[400];
    const char *null_or = (k->flags & SP_CFG_F_NULLABLE) ? "null or " : "";
    range_text(k, r, sizeof r);
    switch (k->type) {
    case SP_CFG_T_BOOL: snprintf(buf, n, "true or false"); break;
    case SP_CFG_T_INT:
        snprintf(buf, n, "%s%s integer in %s", null_or, (k->flags & SP_CFG_F_ODD) ? "an odd" : "an", r);
        break;
    case SP_CFG_T_DOUBLE: snprintf(buf, n, "%sa number in %s", null_or, r); break;
    case SP_CFG_T_STRING: snprintf(buf, n, "%sa string", null_or); break;
    case SP_CFG_T_PATH:
        snprintf(buf, n, "%sa path (relative to %s)", null_or,
                 (k->flags & SP_CFG_F_REL_WORKDIR) ? "outputs.work_dir" : "the config file's folder");
        break;
    case SP_CFG_T_ENUM:
        join_values(k->values, vals, sizeof vals);
        snprintf(buf, n, "one of: %s", vals);
        break;
    case SP_CFG_T_STRLIST:
        if (k->values) {
            join_values(k->values, vals, sizeof vals);
            snprintf(buf, n, "a list of: %s", vals);
        } else
            snprintf(buf, n, "a list of strings");
        break;
    case SP_CFG_T_AUTO_INT: snprintf(buf, n, "auto or an integer in %s", r); break;
    case SP_CFG_T_INT_VEC:
    case SP_CFG_T_DOUBLE_VEC:
        snprintf(buf, n, "a list of %d %s in %s%s", vec_len(k), k->type == SP_CFG_T_INT_VEC ? "integers" : "numbers",
                 r, (k->flags & SP_CFG_F_ORDERED) ? (vec_len(k) == 2 ? ", min <= max" : ", pairs ascending") : "");
        break;
    }
}

/* -------------------------------------------------------------- formatting */

/* Shortest text that reads back to the same double, always with a '.' so
 * YAML 1.1 readers (PyYAML reading the provenance) see a float. */
static void fmt_double(double v, char *buf, size_t n)
{
    char tmp[64];
    if (!isfinite(v)) {
        snprintf(buf, n, "%s", isnan(v) ? ".nan" : v > 0 ? ".inf" : "-.inf");
        return;
    }
    /* %g switches to an exponent when the exponent reaches the precision: start
     * at enough digits that 20 prints as 20, not 2e+01. */
    int first = 1;
    if (v != 0 && fabs(v) >= 1 && fabs(v) < 1e16) first = (int)floor(log10(fabs(v))) + 1;
    if (first > 17) first = 17;
    for (int prec = first; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (strtod(tmp, NULL) == v) break;
    }
    if (!strpbrk(tmp, ".")) {
        char *e = strpbrk(tmp, "eE");
        if (e) {
            char exp[32];
            snprintf(exp, sizeof exp, "%s", e);
            *e = '\0';
            snprintf(buf, n, "%s.0%s", tmp, exp);
        } else
            snprintf(buf, n, "%s.0", tmp);
        return;
    }
    snprintf(buf, n, "%s", tmp);
}

/* YAML double-quoted scalar. */
static void fmt_quoted(const char *s, char *buf, size_t n)
{
    size_t j = 0;
    if (n < 3) {
        if (n) buf[0] = '\0';
        return;
    }
    buf[j++] = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p && j + 6 < n; p++) {
        if (*p == '"' || *p == '\\') {
            buf[j++] = '\\';
            buf[j++] = (char)*p;
        } else if (*p == '\n') {
            buf[j++] = '\\';
            buf[j++] = 'n';
        } else if (*p == '\t') {
            buf[j++] = '\\';
            buf[j++] = 't';
        } else if (*p < 0x20 || *p == 0x7f) {
            j += (size_t)snprintf(buf + j, n - j, "\\x%02x", *p);
        } else
            buf[j++] = (char)*p;
    }
    buf[j++] = '"';
    buf[j] = '\0';
}

/* Can s be written as a plain scalar that every YAML reader takes as that string? */
static int plain_safe(const char *s)
{
    static const char *const special[] = {"true", "false", "yes", "no", "on", "off", "y", "n", "null", "~", NULL};
    if (!s[0]) return 0;
    for (int i = 0; special[i]; i++)
        if (!strcasecmp(s, special[i])) return 0;
    if (!isalpha((unsigned char)s[0])) return 0;
    for (const char *p = s; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("_+-./", *p)) return 0;
    return 1;
}

static void fmt_word(const char *s, char *buf, size_t n)
{
    if (plain_safe(s))
        snprintf(buf, n, "%s", s);
    else
        fmt_quoted(s, buf, n);
}

static const void *field_c(const sp_config *cfg, const sp_config_key *k)
{
    return (const char *)cfg + k->offset;
}

static void *field(sp_config *cfg, const sp_config_key *k) { return (char *)cfg + k->offset; }

/* Format a value held in `p` (a field or a slot). */
static void format_raw(const sp_config_key *k, const void *p, char *buf, size_t n)
{
    char tmp[VALBUF];
    size_t len = 0;
    switch (k->type) {
    case SP_CFG_T_BOOL: snprintf(buf, n, "%s", *(const bool *)p ? "true" : "false"); break;
    case SP_CFG_T_INT: {
        int v = *(const int *)p;
        if ((k->flags & SP_CFG_F_NULLABLE) && v == SP_CONFIG_NULL_INT)
            snprintf(buf, n, "null");
        else
            snprintf(buf, n, "%d", v);
        break;
    }
    case SP_CFG_T_AUTO_INT: {
        int v = *(const int *)p;
        if (v == SP_CONFIG_AUTO)
            snprintf(buf, n, "auto");
        else
            snprintf(buf, n, "%d", v);
        break;
    }
    case SP_CFG_T_DOUBLE: fmt_double(*(const double *)p, buf, n); break;
    case SP_CFG_T_STRING:
    case SP_CFG_T_PATH: {
        const char *s = *(char *const *)p;
        if (!s)
            snprintf(buf, n, "null");
        else
            fmt_quoted(s, buf, n);
        break;
    }
    case SP_CFG_T_ENUM: {
        int v = *(const int *)p;
        if (v >= 0 && v < n_values(k->values))
            fmt_word(k->values[v], buf, n);
        else
            snprintf(buf, n, "%d", v); /* only a code-built config can get here; validate reports it */
        break;
    }
    case SP_CFG_T_STRLIST: {
        const sp_cfg_strlist *l = p;
        len = (size_t)snprintf(buf, n, "[");
        for (int i = 0; i < l->n && len + 1 < n; i++) {
            fmt_word(l->v[i] ? l->v[i] : "", tmp, sizeof tmp);
            len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? ", " : "", tmp);
        }
        if (len + 1 < n) snprintf(buf + len, n - len, "]");
        break;
    }
    case SP_CFG_T_INT_VEC:
    case SP_CFG_T_DOUBLE_VEC: {
        len = (size_t)snprintf(buf, n, "[");
        for (int i = 0; i < vec_len(k) && len + 1 < n; i++) {
            if (k->type == SP_CFG_T_INT_VEC)
                snprintf(tmp, sizeof tmp, "%d", ((const int *)p)[i]);
            else
                fmt_double(((const double *)p)[i], tmp, sizeof tmp);
            len += (size_t)snprintf(buf + len, n - len, "%s%s", i ? ", " : "", tmp);
        }
        if (len + 1 < n) snprintf(buf + len, n - len, "]");
        break;
    }
    }
}

void sp_config_format_value(const sp_config *cfg, const sp_config_key *k, char *buf, size_t n)
{
    format_raw(k, field_c(cfg, k), buf, n);
}

/* --------------------------------------------------------- owned storage */

static void free_raw(const sp_config_key *k, void *p)
{
    if (k->type == SP_CFG_T_STRING || k->type == SP_CFG_T_PATH) {
        free(*(char **)p);
        *(char **)p = NULL;
    } else if (k->type == SP_CFG_T_STRLIST) {
        sp_cfg_strlist *l = p;
        for (int i = 0; i < l->n; i++) free(l->v[i]);
        free(l->v);
        l->v = NULL;
        l->n = 0;
    }
}

/* Replace the field's value by the slot's (ownership moves to cfg). */
static void commit(sp_config *cfg, const sp_config_key *k, slot_t *slot)
{
    void *p = field(cfg, k);
    free_raw(k, p);
    memcpy(p, slot, k->size);
}

static char *dupstr(const char *s)
{
    if (!s) return NULL;
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

/* ------------------------------------------------------------ validation */

/* Check one value (field or slot) against its key; report at `line`. */
static int check_raw(const sp_config_key *k, const void *p, errlist *el, int line)
{
    char allowed[600], val[VALBUF];
    sp_config_allowed_text(k, allowed, sizeof allowed);
    int bad = 0;
    switch (k->type) {
    case SP_CFG_T_BOOL: break;
    case SP_CFG_T_INT:
    case SP_CFG_T_AUTO_INT: {
        int v = *(const int *)p;
        if (k->type == SP_CFG_T_AUTO_INT && v == SP_CONFIG_AUTO) break;
        if (k->type == SP_CFG_T_INT && (k->flags & SP_CFG_F_NULLABLE) && v == SP_CONFIG_NULL_INT) break;
        if (k->min < k->max && (v < k->min || v > k->max || ((k->flags & SP_CFG_F_MIN_EXCL) && v <= k->min))) {
            el_add(el, line, k->name, "%d is out of range (allowed: %s)", v, allowed);
            bad = 1;
        } else if ((k->flags & SP_CFG_F_ODD) && v % 2 == 0) {
            el_add(el, line, k->name, "%d is even; it must be odd so the stamp has a central pixel (allowed: %s)", v,
                   allowed);
            bad = 1;
        }
        break;
    }
    case SP_CFG_T_DOUBLE: {
        double v = *(const double *)p;
        fmt_double(v, val, sizeof val);
        if (!isfinite(v)) {
            el_add(el, line, k->name, "%s is not a finite number (allowed: %s)", val, allowed);
            bad = 1;
        } else if (k->min < k->max &&
                   (v < k->min || v > k->max || ((k->flags & SP_CFG_F_MIN_EXCL) && v <= k->min))) {
            el_add(el, line, k->name, "%s is out of range (allowed: %s)", val, allowed);
            bad = 1;
        }
        break;
    }
    case SP_CFG_T_STRING:
    case SP_CFG_T_PATH: {
        const char *s = *(char *const *)p;
        if (!s && !(k->flags & SP_CFG_F_NULLABLE)) {
            el_add(el, line, k->name, "must be set, it cannot be null (allowed: %s)", allowed);
            bad = 1;
        } else if (s && !s[0] && k->type == SP_CFG_T_PATH) {
            el_add(el, line, k->name, "the path is empty (allowed: %s)", allowed);
            bad = 1;
        }
        break;
    }
    case SP_CFG_T_ENUM: {
        int v = *(const int *)p;
        if (v < 0 || v >= n_values(k->values)) {
            el_add(el, line, k->name, "%d is not a valid value (allowed: %s)", v, allowed);
            bad = 1;
        }
        break;
    }
    case SP_CFG_T_STRLIST: {
        const sp_cfg_strlist *l = p;
        for (int i = 0; i < l->n && !bad; i++) {
            const char *s = l->v[i] ? l->v[i] : "";
            if (k->values) {
                int ok = 0;
                for (int j = 0; k->values[j]; j++) ok |= !strcmp(k->values[j], s);
                if (!ok) {
                    el_add(el, line, k->name, "'%s' is not allowed (allowed: %s)", s, allowed);
                    bad = 1;
                }
            }
            for (int j = 0; j < i && !bad; j++)
                if (l->v[j] && !strcmp(l->v[j], s)) {
                    el_add(el, line, k->name, "'%s' is listed twice", s);
                    bad = 1;
                }
        }
        break;
    }
    case SP_CFG_T_INT_VEC:
    case SP_CFG_T_DOUBLE_VEC: {
        int nv = vec_len(k);
        double v[4];
        for (int i = 0; i < nv; i++)
            v[i] = k->type == SP_CFG_T_INT_VEC ? ((const int *)p)[i] : ((const double *)p)[i];
        format_raw(k, p, val, sizeof val);
        for (int i = 0; i < nv && !bad; i++) {
            if (!isfinite(v[i]) || (k->min < k->max && (v[i] < k->min || v[i] > k->max ||
                                                        ((k->flags & SP_CFG_F_MIN_EXCL) && v[i] <= k->min)))) {
                el_add(el, line, k->name, "element %d of %s is out of range (allowed: %s)", i + 1, val, allowed);
                bad = 1;
            }
        }
        if (!bad && (k->flags & SP_CFG_F_ORDERED))
            for (int i = 0; i + 1 < nv && !bad; i += 2)
                if (v[i] > v[i + 1]) {
                    el_add(el, line, k->name, "%s is not ascending: element %d > element %d (allowed: %s)", val,
                           i + 1, i + 2, allowed);
                    bad = 1;
                }
        break;
    }
    }
    return bad ? -1 : 0;
}

static int line_of(const int *lines, const char *name)
{
    const sp_config_key *k = sp_config_find_key(name);
    return lines && k ? lines[key_index(k)] : 0;
}

/* a < b (strict) or a <= b must hold between two keys; report at the later line. */
static void need_less(const sp_config *c, errlist *el, const int *lines, const char *a, const char *b, int strict)
{
    const sp_config_key *ka = sp_config_find_key(a), *kb = sp_config_find_key(b);
    if (!ka || !kb) return;
    const void *pa = field_c(c, ka), *pb = field_c(c, kb);
    double va = ka->type == SP_CFG_T_DOUBLE ? *(const double *)pa : *(const int *)pa;
    double vb = kb->type == SP_CFG_T_DOUBLE ? *(const double *)pb : *(const int *)pb;
    if (strict ? va < vb : va <= vb) return;
    char sa[64], sb[64];
    format_raw(ka, pa, sa, sizeof sa);
    format_raw(kb, pb, sb, sizeof sb);
    int la = line_of(lines, a), lb = line_of(lines, b);
    if (lb > la)
        el_add(el, lb, b, "%s must be %s %s (%s)", sb, strict ? "greater than" : "at least", a, sa);
    else
        el_add(el, la, a, "%s must be %s %s (%s)", sa, strict ? "smaller than" : "at most", b, sb);
}

/* Relations between keys that no single range can say. */
static void cross_checks(const sp_config *c, errlist *el, const int *lines)
{
    need_less(c, el, lines, "epsf.star_local_bkg_annulus_rin_pix", "epsf.star_local_bkg_annulus_rout_pix", 1);
    need_less(c, el, lines, "epsf.final_psf_size", "epsf.cutout_size", 0);
    need_less(c, el, lines, "epsf.recenter_boxsize", "epsf.cutout_size", 0);
    need_less(c, el, lines, "epsf.reference_mag_min", "epsf.reference_mag_max", 1);
    need_less(c, el, lines, "zp.gaia_mag_min", "zp.gaia_mag_max", 1);
    need_less(c, el, lines, "patch_run.sersic_n_min", "patch_run.sersic_n_init", 0);
    need_less(c, el, lines, "patch_run.sersic_n_init", "patch_run.sersic_n_max", 0);
    need_less(c, el, lines, "patch_run.cutout_data_p_lo", "patch_run.cutout_data_p_hi", 1);
    need_less(c, el, lines, "patch_run.cutout_model_p_lo", "patch_run.cutout_model_p_hi", 1);
}

int sp_config_validate(const sp_config *cfg)
{
    errlist el;
    el_init(&el, cfg->config_path);
    for (int i = 0; i < sp_cfg_nschema; i++) check_raw(&sp_cfg_schema[i], field_c(cfg, &sp_cfg_schema[i]), &el, 0);
    cross_checks(cfg, &el, NULL);
    return el.nerr ? el_fail(&el, SP_ERR_CONFIG) : SP_OK;
}

int sp_config_check_inputs(const sp_config *cfg)
{
    errlist el;
    el_init(&el, cfg->config_path);
    if (!cfg->inputs.image_list_file)
        el_add(&el, 0, "inputs.image_list_file", "not set; the list of FITS frames is required (set it in the config)");
    if (!cfg->inputs.input_catalog)
        el_add(&el, 0, "inputs.input_catalog", "not set; the source catalog CSV is required (set it in the config)");
    return el.nerr ? el_fail(&el, SP_ERR_CONFIG) : SP_OK;
}

/* ------------------------------------------------------ YAML -> values */

static int is_null_node(const yaml_node_t *node)
{
    if (!node) return 1;
    if (node->type != YAML_SCALAR_NODE || node->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *s = (const char *)node->data.scalar.value;
    return !s[0] || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

static int is_plain(const yaml_node_t *node) { return node->data.scalar.style == YAML_PLAIN_SCALAR_STYLE; }

static const char *scalar(const yaml_node_t *node) { return (const char *)node->data.scalar.value; }

static int node_line(const yaml_node_t *node) { return node ? (int)node->start_mark.line + 1 : 0; }

/* "'text'" (shortened), "the quoted string "text"", "a list", "a mapping". */
static void describe(const yaml_node_t *node, char *buf, size_t n)
{
    if (!node) {
        snprintf(buf, n, "null");
        return;
    }
    if (node->type == YAML_SEQUENCE_NODE)
        snprintf(buf, n, "a list");
    else if (node->type == YAML_MAPPING_NODE)
        snprintf(buf, n, "a mapping");
    else if (!is_plain(node))
        snprintf(buf, n, "the quoted string \"%.60s\"", scalar(node));
    else
        snprintf(buf, n, "'%.60s%s'", scalar(node), strlen(scalar(node)) > 60 ? "..." : "");
}

static int parse_bool(const char *s, bool *v)
{
    static const char *const t[] = {"true", "yes", "on", NULL}, *const f[] = {"false", "no", "off", NULL};
    for (int i = 0; t[i]; i++)
        if (!strcasecmp(s, t[i])) return *v = true, 1;
    for (int i = 0; f[i]; i++)
        if (!strcasecmp(s, f[i])) return *v = false, 1;
    return 0;
}

/* 1 if s is a whole decimal integer that fits an int. */
static int parse_int(const char *s, int *v)
{
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (!isdigit((unsigned char)*p)) return 0;
    for (const char *q = p; *q; q++)
        if (!isdigit((unsigned char)*q)) return 0;
    errno = 0;
    long long x = strtoll(s, NULL, 10);
    if (errno || x < INT_MIN || x > INT_MAX) return -1; /* an integer, too large */
    *v = (int)x;
    return 1;
}

static int parse_double(const char *s, double *v)
{
    char *end;
    if (!s[0] || isspace((unsigned char)s[0])) return 0;
    errno = 0;
    *v = strtod(s, &end);
    return *end == '\0';
}

/* Convert one value node of key k into slot (zeroed by the caller). Returns
 * 0, or -1 after reporting to el. Nothing is left allocated on failure. */
static int convert(const sp_config_key *k, yaml_document_t *doc, yaml_node_t *node, slot_t *slot, errlist *el,
                   int line)
{
    char allowed[600], got[120];
    sp_config_allowed_text(k, allowed, sizeof allowed);
    describe(node, got, sizeof got);

    if (is_null_node(node)) {
        if ((k->flags & SP_CFG_F_NULLABLE) && (k->type == SP_CFG_T_STRING || k->type == SP_CFG_T_PATH)) {
            slot->s = NULL;
            return 0;
        }
        if ((k->flags & SP_CFG_F_NULLABLE) && k->type == SP_CFG_T_INT) {
            slot->i = SP_CONFIG_NULL_INT;
            return 0;
        }
        if (k->type == SP_CFG_T_STRLIST) return 0; /* null = empty list */
        el_add(el, line, k->name, "no value given (allowed: %s)", allowed);
        return -1;
    }
    int want_scalar = k->type != SP_CFG_T_STRLIST && k->type != SP_CFG_T_INT_VEC && k->type != SP_CFG_T_DOUBLE_VEC;
    if (want_scalar && node->type != YAML_SCALAR_NODE) {
        el_add(el, line, k->name, "expected a single value, got %s (allowed: %s)", got, allowed);
        return -1;
    }
    if (!want_scalar && node->type != YAML_SEQUENCE_NODE) {
        el_add(el, line, k->name, "expected a list like %s, got %s (allowed: %s)", k->def, got, allowed);
        return -1;
    }

    switch (k->type) {
    case SP_CFG_T_BOOL:
        if (!is_plain(node) || !parse_bool(scalar(node), &slot->b)) {
            el_add(el, line, k->name, "expected true or false, got %s", got);
            return -1;
        }
        break;
    case SP_CFG_T_INT:
    case SP_CFG_T_AUTO_INT: {
        if (k->type == SP_CFG_T_AUTO_INT && !strcasecmp(scalar(node), "auto")) {
            slot->i = SP_CONFIG_AUTO;
            break;
        }
        int r = is_plain(node) ? parse_int(scalar(node), &slot->i) : 0;
        if (r < 0) {
            el_add(el, line, k->name, "%s is out of range (allowed: %s)", got, allowed);
            return -1;
        }
        if (r == 0) {
            el_add(el, line, k->name, "expected %s, got %s (allowed: %s)",
                   k->type == SP_CFG_T_AUTO_INT ? "auto or an integer" : "an integer", got, allowed);
            return -1;
        }
        /* The sentinels are only reachable by their words (auto, null), not by number. */
        if ((k->type == SP_CFG_T_AUTO_INT && slot->i == SP_CONFIG_AUTO) ||
            (k->type == SP_CFG_T_INT && (k->flags & SP_CFG_F_NULLABLE) && slot->i == SP_CONFIG_NULL_INT)) {
            el_add(el, line, k->name, "%d is out of range (allowed: %s)", slot->i, allowed);
            return -1;
        }
        break;
    }
    case SP_CFG_T_DOUBLE:
        if (!is_plain(node) || !parse_double(scalar(node), &slot->d)) {
            el_add(el, line, k->name, "expected a number, got %s (allowed: %s)", got, allowed);
            return -1;
        }
        break;
    case SP_CFG_T_STRING:
    case SP_CFG_T_PATH:
        if (k->type == SP_CFG_T_PATH && !scalar(node)[0]) {
            el_add(el, line, k->name, "the path is empty (allowed: %s)", allowed);
            return -1;
        }
        break; /* copied after the checks */
    case SP_CFG_T_ENUM: {
        const char *s = scalar(node);
        int idx = -1;
        for (int i = 0; k->values[i] && idx < 0; i++)
            if (!strcasecmp(k->values[i], s)) idx = i;
        for (int i = 0; k->aliases && k->aliases[i] && idx < 0; i += 2)
            if (!strcasecmp(k->aliases[i], s))
                for (int j = 0; k->values[j]; j++)
                    if (!strcmp(k->values[j], k->aliases[i + 1])) idx = j;
        if (idx < 0) {
            el_add(el, line, k->name, "%s is not allowed (allowed: %s)", got, allowed);
            return -1;
        }
        slot->i = idx;
        break;
    }
    case SP_CFG_T_STRLIST: {
        int n = (int)(node->data.sequence.items.top - node->data.sequence.items.start);
        for (int i = 0; i < n; i++) {
            yaml_node_t *it = yaml_document_get_node(doc, node->data.sequence.items.start[i]);
            if (!it || it->type != YAML_SCALAR_NODE || is_null_node(it)) {
                describe(it, got, sizeof got);
                el_add(el, node_line(it), k->name, "list element %d: expected a word, got %s (allowed: %s)", i + 1,
                       got, allowed);
                return -1;
            }
        }
        /* check the words before copying them */
        const char *words[64];
        if (n < 0 || n > 64) {
            el_add(el, line, k->name, "too many elements (%d; at most 64)", n);
            return -1;
        }
        for (int i = 0; i < n; i++) words[i] = scalar(yaml_document_get_node(doc, node->data.sequence.items.start[i]));
        sp_cfg_strlist view = {n, (char **)words};
        if (check_raw(k, &view, el, line)) return -1;
        if (n > 0) {
            slot->l.v = calloc((size_t)n, sizeof(char *));
            if (!slot->l.v) {
                el_add(el, line, k->name, "out of memory");
                return -1;
            }
            for (int i = 0; i < n; i++) {
                slot->l.v[i] = dupstr(words[i]);
                if (!slot->l.v[i]) {
                    slot->l.n = i;
                    free_raw(k, slot);
                    el_add(el, line, k->name, "out of memory");
                    return -1;
                }
            }
        }
        slot->l.n = n;
        return 0;
    }
    case SP_CFG_T_INT_VEC:
    case SP_CFG_T_DOUBLE_VEC: {
        int n = (int)(node->data.sequence.items.top - node->data.sequence.items.start), want = vec_len(k);
        if (n != want) {
            el_add(el, line, k->name, "expected a list of %d %s, got %d element%s (allowed: %s)", want,
                   k->type == SP_CFG_T_INT_VEC ? "integers" : "numbers", n, n == 1 ? "" : "s", allowed);
            return -1;
        }
        for (int i = 0; i < n; i++) {
            yaml_node_t *it = yaml_document_get_node(doc, node->data.sequence.items.start[i]);
            int ok = it && it->type == YAML_SCALAR_NODE && is_plain(it);
            if (ok && k->type == SP_CFG_T_INT_VEC) ok = parse_int(scalar(it), &slot->iv[i]) == 1;
            if (ok && k->type == SP_CFG_T_DOUBLE_VEC) ok = parse_double(scalar(it), &slot->dv[i]);
            if (!ok) {
                describe(it, got, sizeof got);
                el_add(el, node_line(it), k->name, "list element %d: expected %s, got %s (allowed: %s)", i + 1,
                       k->type == SP_CFG_T_INT_VEC ? "an integer" : "a number", got, allowed);
                return -1;
            }
        }
        break;
    }
    }
    if (k->type == SP_CFG_T_STRING || k->type == SP_CFG_T_PATH) {
        slot->s = (char *)scalar(node); /* checked as a borrowed pointer, copied below */
        if (check_raw(k, slot, el, line)) return -1;
        slot->s = dupstr(scalar(node));
        if (!slot->s) {
            el_add(el, line, k->name, "out of memory");
            return -1;
        }
        return 0;
    }
    return check_raw(k, slot, el, line);
}

/* Parse a YAML value written as text ("30", "[fits, csv]", "auto") into slot. */
static int convert_text(const sp_config_key *k, const char *text, slot_t *slot, errlist *el)
{
    yaml_parser_t parser;
    yaml_document_t doc;
    int rc = -1;
    if (!yaml_parser_initialize(&parser)) {
        el_add(el, 0, k->name, "out of memory");
        return -1;
    }
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, strlen(text));
    if (!yaml_parser_load(&parser, &doc)) {
        el_add(el, 0, k->name, "'%s' is not a valid YAML value: %s", text,
               parser.problem ? parser.problem : "parse error");
        yaml_parser_delete(&parser);
        return -1;
    }
    rc = convert(k, &doc, yaml_document_get_root_node(&doc), slot, el, 0);
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    return rc;
}

/* ---------------------------------------------------------- paths */

/* Absolute form of dir (NULL: the current directory), without trailing '/'. */
static char *abs_dir(const char *dir)
{
    char cwd[4096];
    char *out = NULL;
    if (dir && dir[0] == '/')
        out = dupstr(dir);
    else {
        if (!getcwd(cwd, sizeof cwd)) return NULL;
        if (!dir || !dir[0] || !strcmp(dir, "."))
            out = dupstr(cwd);
        else {
            while (dir[0] == '.' && dir[1] == '/') dir += 2;
            size_t n = strlen(cwd) + strlen(dir) + 2;
            out = malloc(n);
            if (out) snprintf(out, n, "%s/%s", cwd, dir);
        }
    }
    if (out)
        for (size_t n = strlen(out); n > 1 && out[n - 1] == '/'; n--) out[n - 1] = '\0';
    return out;
}

/* Make *p absolute against base ("~/" expands to $HOME). 0 or -1 (no memory). */
static int resolve_one(char **p, const char *base)
{
    const char *s = *p, *home = getenv("HOME");
    char *out;
    if (!s || !s[0] || s[0] == '/') return 0;
    if (s[0] == '~' && (s[1] == '/' || !s[1]) && home && home[0]) {
        size_t n = strlen(home) + strlen(s) + 1;
        out = malloc(n);
        if (!out) return -1;
        snprintf(out, n, "%s%s", home, s + 1);
    } else {
        if (!base) return 0;
        while (s[0] == '.' && s[1] == '/') s += 2;
        size_t n = strlen(base) + strlen(s) + 2;
        out = malloc(n);
        if (!out) return -1;
        if (!strcmp(s, "."))
            snprintf(out, n, "%s", base);
        else
            snprintf(out, n, "%s%s%s", base, strcmp(base, "/") ? "/" : "", s);
    }
    free(*p);
    *p = out;
    return 0;
}

int sp_config_resolve_paths(sp_config *cfg, const char *base_dir)
{
    int status = SP_OK;
    char *base = abs_dir(base_dir);
    SP_CHECK(base, SP_ERR_IO, "cannot resolve config paths: the current directory is unknown or out of memory");
    SP_CHECK(!resolve_one(&cfg->outputs.work_dir, base), SP_ERR_NOMEM, "out of memory resolving config paths");
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        if (k->type != SP_CFG_T_PATH || field(cfg, k) == (void *)&cfg->outputs.work_dir) continue;
        const char *b = (k->flags & SP_CFG_F_REL_WORKDIR) && cfg->outputs.work_dir ? cfg->outputs.work_dir : base;
        SP_CHECK(!resolve_one((char **)field(cfg, k), b), SP_ERR_NOMEM, "out of memory resolving config paths");
    }
    free(cfg->config_dir);
    cfg->config_dir = base;
    base = NULL;
cleanup:
    free(base);
    return status;
}

/* ---------------------------------------------------------- life cycle */

void sp_config_free(sp_config *cfg)
{
    if (!cfg) return;
    for (int i = 0; i < sp_cfg_nschema; i++) free_raw(&sp_cfg_schema[i], field(cfg, &sp_cfg_schema[i]));
    free(cfg->config_path);
    free(cfg->config_dir);
    memset(cfg, 0, sizeof *cfg);
}

int sp_config_defaults(sp_config *cfg)
{
    errlist el;
    el_init(&el, "schema default");
    memset(cfg, 0, sizeof *cfg);
    for (int i = 0; i < sp_cfg_nschema; i++) {
        slot_t slot;
        memset(&slot, 0, sizeof slot);
        if (convert_text(&sp_cfg_schema[i], sp_cfg_schema[i].def, &slot, &el)) continue;
        commit(cfg, &sp_cfg_schema[i], &slot);
    }
    cross_checks(cfg, &el, NULL);
    if (el.nerr) {
        sp_config_free(cfg);
        return el_fail(&el, SP_ERR_INTERNAL);
    }
    return SP_OK;
}

int sp_config_copy(sp_config *dst, const sp_config *src)
{
    memcpy(dst, src, sizeof *dst);
    dst->config_path = dst->config_dir = NULL;
    for (int i = 0; i < sp_cfg_nschema; i++) { /* detach: dst must not free src's storage */
        const sp_config_key *k = &sp_cfg_schema[i];
        if (k->type == SP_CFG_T_STRING || k->type == SP_CFG_T_PATH) *(char **)field(dst, k) = NULL;
        if (k->type == SP_CFG_T_STRLIST) memset(field(dst, k), 0, sizeof(sp_cfg_strlist));
    }
    int fail = (src->config_path && !(dst->config_path = dupstr(src->config_path))) ||
               (src->config_dir && !(dst->config_dir = dupstr(src->config_dir)));
    for (int i = 0; i < sp_cfg_nschema && !fail; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        const void *s = field_c(src, k);
        void *d = field(dst, k);
        if (k->type == SP_CFG_T_STRING || k->type == SP_CFG_T_PATH) {
            const char *str = *(char *const *)s;
            fail = str && !(*(char **)d = dupstr(str));
        } else if (k->type == SP_CFG_T_STRLIST) {
            const sp_cfg_strlist *sl = s;
            sp_cfg_strlist *dl = d;
            if (sl->n) {
                dl->v = calloc((size_t)sl->n, sizeof(char *));
                fail = !dl->v;
                for (int j = 0; j < sl->n && !fail; j++) {
                    dl->v[j] = dupstr(sl->v[j]);
                    fail = !dl->v[j];
                    dl->n = j + 1;
                }
            }
        }
    }
    if (fail) {
        sp_config_free(dst);
        return SP_FAIL(SP_ERR_NOMEM, "out of memory copying the configuration");
    }
    return SP_OK;
}

/* Closest known name to an unknown one, or NULL: a key with the same last
 * component in another section first (a key put in the wrong section), then
 * the smallest edit distance among keys and sections (a typo). */
static size_t edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 200 || lb > 200) return (size_t)-1;
    size_t row[201];
    for (size_t j = 0; j <= lb; j++) row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static const char *suggest(const char *name)
{
    const char *leaf = strrchr(name, '.');
    leaf = leaf ? leaf + 1 : name;
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const char *kl = strrchr(sp_cfg_schema[i].name, '.');
        if (kl && !strcmp(kl + 1, leaf)) return sp_cfg_schema[i].name;
    }
    const char *best = NULL;
    size_t bestd = (size_t)-1;
    for (int i = 0; i < sp_cfg_nschema + sp_cfg_nsections; i++) {
        const char *cand = i < sp_cfg_nschema ? sp_cfg_schema[i].name : sp_cfg_sections[i - sp_cfg_nschema].name;
        size_t d = edit_distance(name, cand);
        if (d < bestd) bestd = d, best = cand;
    }
    size_t limit = strlen(name) / 4;
    if (limit < 2) limit = 2;
    return bestd <= limit ? best : NULL;
}

static const sp_cfg_seed_key *seed_lookup(const char *name)
{
    for (int i = 0; i < sp_cfg_nseed_keys; i++)
        if (!strcmp(sp_cfg_seed_keys[i].seed, name)) return &sp_cfg_seed_keys[i];
    return NULL;
}

/* A tract7dt-only section such as moffat_psf: its keys are all in the seed table. */
static int is_seed_group(const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < sp_cfg_nseed_keys; i++)
        if (!strncmp(sp_cfg_seed_keys[i].seed, name, n) && sp_cfg_seed_keys[i].seed[n] == '.') return 1;
    return 0;
}

typedef struct {
    errlist *el;
    yaml_document_t *doc;
    sp_config *cfg;
    int *lines; /* per key: line it was set on, 0 for defaults */
} walk_t;

static void unknown_key(walk_t *w, const char *name, int line, int is_map)
{
    const sp_cfg_seed_key *sk = seed_lookup(name);
    if (sk) {
        w->el->nseed++;
        if (sk->ours)
            el_add(w->el, line, name, "a tract7dt key; surveyproc calls it %s (%s)", sk->ours, sk->note);
        else
            el_add(w->el, line, name, "a tract7dt %s with no surveyproc equivalent (%s); remove it",
                   strchr(name, '.') ? "key" : "section", sk->note);
        return;
    }
    const char *s = suggest(name);
    if (s)
        el_add(w->el, line, name, "unknown %s (did you mean %s?)", is_map && !strchr(name, '.') ? "section" : "key",
               s);
    else if (!strchr(name, '.')) {
        char secs[400];
        size_t len = 0;
        secs[0] = '\0';
        for (int i = 0; i < sp_cfg_nsections; i++)
            if (!strchr(sp_cfg_sections[i].name, '.') && len + 1 < sizeof secs)
                len += (size_t)snprintf(secs + len, sizeof secs - len, "%s%s", len ? ", " : "", sp_cfg_sections[i].name);
        el_add(w->el, line, name, "unknown section (sections: %s)", secs);
    } else
        el_add(w->el, line, name, "unknown key (`surveyproc config --dump` lists every key)");
}

static void walk_map(walk_t *w, yaml_node_t *map, const char *prefix)
{
    yaml_node_pair_t *start = map->data.mapping.pairs.start, *top = map->data.mapping.pairs.top;
    for (yaml_node_pair_t *pr = start; pr < top; pr++) {
        yaml_node_t *kn = yaml_document_get_node(w->doc, pr->key);
        yaml_node_t *vn = yaml_document_get_node(w->doc, pr->value);
        int line = node_line(kn);
        if (!kn || kn->type != YAML_SCALAR_NODE) {
            el_add(w->el, line, prefix[0] ? prefix : NULL, "a key must be a plain name, not a list or mapping");
            continue;
        }
        char name[512];
        snprintf(name, sizeof name, "%s%s%s", prefix, prefix[0] ? "." : "", scalar(kn));
        int dup = 0;
        for (yaml_node_pair_t *q = start; q < pr && !dup; q++) {
            yaml_node_t *qk = yaml_document_get_node(w->doc, q->key);
            if (qk && qk->type == YAML_SCALAR_NODE && !strcmp(scalar(qk), scalar(kn))) {
                el_add(w->el, line, name, "duplicate key (first given at line %d)", node_line(qk));
                dup = 1;
            }
        }
        if (dup) continue;

        const sp_config_key *k = sp_config_find_key(name);
        if (k) {
            slot_t slot;
            memset(&slot, 0, sizeof slot);
            if (convert(k, w->doc, vn, &slot, w->el, vn && node_line(vn) ? node_line(vn) : line) == 0) {
                commit(w->cfg, k, &slot);
                w->lines[key_index(k)] = line;
            }
        } else if (is_group(name)) {
            if (vn && vn->type == YAML_MAPPING_NODE)
                walk_map(w, vn, name);
            else if (!is_null_node(vn)) { /* an empty section is fine */
                char got[120];
                describe(vn, got, sizeof got);
                el_add(w->el, line, name, "a section: expected its keys indented below it, got %s", got);
            }
        } else if (!seed_lookup(name) && is_seed_group(name)) {
            /* A tract7dt-only section (moffat_psf): report each key inside with its
             * own replacement; an empty one is reported as a whole. */
            if (vn && vn->type == YAML_MAPPING_NODE && vn->data.mapping.pairs.top > vn->data.mapping.pairs.start)
                walk_map(w, vn, name);
            else {
                w->el->nseed++;
                el_add(w->el, line, name, "a tract7dt section that surveyproc does not have; remove it");
            }
        } else
            unknown_key(w, name, line, vn && vn->type == YAML_MAPPING_NODE);
    }
}

/* "NAME:LINE:COL: malformed YAML: problem (context at line L)". */
static void yaml_syntax_error(errlist *el, yaml_parser_t *p)
{
    char ctx[160] = "";
    if (p->context)
        snprintf(ctx, sizeof ctx, " (%s at line %d)", p->context, (int)p->context_mark.line + 1);
    char where[64];
    snprintf(where, sizeof where, "%d:%d", (int)p->problem_mark.line + 1, (int)p->problem_mark.column + 1);
    char full[700];
    snprintf(full, sizeof full, "%s:%s: malformed YAML: %s%s", el->name, where,
             p->problem ? p->problem : (p->error == YAML_MEMORY_ERROR ? "out of memory" : "parse error"), ctx);
    el_append(el, full);
    el->nerr++;
}

int sp_config_load_string(const char *text, const char *name_for_messages, const char *base_dir, sp_config *cfg)
{
    int status = SP_OK;
    errlist el;
    yaml_parser_t parser;
    yaml_document_t doc, doc2;
    int parser_ok = 0, doc_ok = 0;
    int *lines = NULL;
    sp_config tmp;
    memset(&tmp, 0, sizeof tmp);
    memset(cfg, 0, sizeof *cfg);
    el_init(&el, name_for_messages ? name_for_messages : "config");

    SP_TRY(sp_config_defaults(&tmp));
    SP_ALLOC(lines, sp_cfg_nschema);
    SP_CHECK(yaml_parser_initialize(&parser), SP_ERR_NOMEM, "out of memory starting the YAML parser");
    parser_ok = 1;
    yaml_parser_set_input_string(&parser, (const unsigned char *)text, strlen(text));
    if (!yaml_parser_load(&parser, &doc)) {
        yaml_syntax_error(&el, &parser);
        status = el_fail(&el, SP_ERR_CONFIG);
        goto cleanup;
    }
    doc_ok = 1;
    /* A second document ("---") would be silently ignored: refuse it. */
    if (!yaml_parser_load(&parser, &doc2)) {
        yaml_syntax_error(&el, &parser);
        status = el_fail(&el, SP_ERR_CONFIG);
        goto cleanup;
    }
    yaml_node_t *root2 = yaml_document_get_root_node(&doc2);
    if (root2) el_add(&el, node_line(root2), NULL, "a second YAML document ('---'); a config is one document");
    yaml_document_delete(&doc2);

    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root && !is_null_node(root)) {
        if (root->type != YAML_MAPPING_NODE) {
            char got[120];
            describe(root, got, sizeof got);
            el_add(&el, node_line(root), NULL, "the config must be a mapping of sections (inputs:, outputs:, ...), got %s",
                   got);
        } else {
            walk_t w = {&el, &doc, &tmp, lines};
            walk_map(&w, root, "");
        }
    }
    if (!el.nerr) cross_checks(&tmp, &el, lines);
    if (el.nerr) {
        status = el_fail(&el, SP_ERR_CONFIG);
        goto cleanup;
    }
    SP_TRY(sp_config_resolve_paths(&tmp, base_dir));
    tmp.config_path = dupstr(el.name);
    SP_CHECK(tmp.config_path, SP_ERR_NOMEM, "out of memory");
    *cfg = tmp;
    memset(&tmp, 0, sizeof tmp);
cleanup:
    if (doc_ok) yaml_document_delete(&doc);
    if (parser_ok) yaml_parser_delete(&parser);
    sp_config_free(&tmp);
    free(lines);
    return status;
}

int sp_config_read_file(const char *path, char **text, char **dir)
{
    int status = SP_OK;
    FILE *f = NULL;
    char *buf = NULL, *real = NULL;
    struct stat st;
    *text = NULL;
    *dir = NULL;
    f = fopen(path, "rb");
    SP_CHECK(f, SP_ERR_IO, "%s: cannot open config file: %s", path, strerror(errno));
    SP_CHECK(fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode), SP_ERR_IO,
             "%s: not a regular file (give the path of a YAML config file)", path);
    SP_CHECK(st.st_size <= MAX_CONFIG_BYTES, SP_ERR_IO, "%s: %lld bytes is too large for a config file (wrong file?)",
             path, (long long)st.st_size);
    SP_ALLOC(buf, (size_t)st.st_size + 1);
    size_t got = fread(buf, 1, (size_t)st.st_size, f);
    SP_CHECK(!ferror(f), SP_ERR_IO, "%s: read error: %s", path, strerror(errno));
    buf[got] = '\0';
    SP_CHECK(strlen(buf) == got, SP_ERR_CONFIG, "%s: contains a NUL byte; not a text (YAML) file", path);
    real = realpath(path, NULL);
    SP_CHECK(real, SP_ERR_IO, "%s: cannot resolve the path: %s", path, strerror(errno));
    char *slash = strrchr(real, '/');
    if (slash == real)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    *text = buf;
    *dir = real;
    buf = real = NULL;
cleanup:
    if (f) fclose(f);
    free(buf);
    free(real);
    return status;
}

int sp_config_load(const char *path, sp_config *cfg)
{
    int status = SP_OK;
    char *text = NULL, *dir = NULL;
    memset(cfg, 0, sizeof *cfg);
    SP_TRY(sp_config_read_file(path, &text, &dir));
    SP_TRY(sp_config_load_string(text, path, dir, cfg));
cleanup:
    free(text);
    free(dir);
    return status;
}

int sp_config_set(sp_config *cfg, const char *name, const char *value_text)
{
    errlist el;
    el_init(&el, "--set");
    const sp_config_key *k = sp_config_find_key(name);
    if (!k) {
        const char *s = suggest(name ? name : "");
        if (s) return SP_FAIL(SP_ERR_CONFIG, "--set: %s: unknown key (did you mean %s?)", name, s);
        return SP_FAIL(SP_ERR_CONFIG, "--set: %s: unknown key (`surveyproc config --dump` lists every key)", name);
    }
    slot_t slot;
    memset(&slot, 0, sizeof slot);
    if (convert_text(k, value_text ? value_text : "", &slot, &el)) return el_fail(&el, SP_ERR_CONFIG);
    const int is_wd = field(cfg, k) == (void *)&cfg->outputs.work_dir;
    char *old_wd = is_wd && cfg->outputs.work_dir ? strdup(cfg->outputs.work_dir) : NULL;
    if (is_wd && cfg->outputs.work_dir && !old_wd) return SP_FAIL(SP_ERR_NOMEM, "out of memory");
    commit(cfg, k, &slot);
    if (k->type == SP_CFG_T_PATH && cfg->config_dir) {
        const char *base = (k->flags & SP_CFG_F_REL_WORKDIR) && cfg->outputs.work_dir ? cfg->outputs.work_dir
                                                                                     : cfg->config_dir;
        if (resolve_one((char **)field(cfg, k), base)) {
            free(old_wd);
            return SP_FAIL(SP_ERR_NOMEM, "out of memory");
        }
    }
    /* a new work_dir takes along the outputs that were under the old one (the
     * store, the log, ... resolved against it when the file was read), so
     * `--set outputs.work_dir=DIR` moves every output that was not placed
     * elsewhere explicitly */
    if (is_wd && old_wd && cfg->outputs.work_dir) {
        size_t lo = strlen(old_wd);
        for (int i = 0; i < sp_cfg_nschema; i++) {
            const sp_config_key *q = &sp_cfg_schema[i];
            if (q->type != SP_CFG_T_PATH || !(q->flags & SP_CFG_F_REL_WORKDIR)) continue;
            char **v = (char **)field(cfg, q);
            if (!*v || strncmp(*v, old_wd, lo) != 0 || (*v)[lo] != '/') continue;
            size_t ln = strlen(cfg->outputs.work_dir), lr = strlen(*v + lo);
            char *nv = malloc(ln + lr + 1);
            if (!nv) {
                free(old_wd);
                return SP_FAIL(SP_ERR_NOMEM, "out of memory");
            }
            memcpy(nv, cfg->outputs.work_dir, ln);
            memcpy(nv + ln, *v + lo, lr + 1);
            free(*v);
            *v = nv;
        }
    }
    free(old_wd);
    return SP_OK;
}

/* ------------------------------------------------------------- writers */

/* Comment lines "# ..." wrapped at ~100 columns. */
static void wrap_comment(FILE *f, int indent, const char *text)
{
    const int width = 100 - indent - 2;
    const char *p = text;
    while (*p) {
        int n = (int)strlen(p);
        if (n > width) {
            n = width;
            while (n > 0 && p[n] != ' ') n--;
            if (n == 0) n = width;
        }
        fprintf(f, "%*s# %.*s\n", indent, "", n, p);
        p += n;
        while (*p == ' ') p++;
    }
}

enum { EMIT_TEMPLATE, EMIT_PRINT };

/* Write every key as nested YAML. TEMPLATE adds docs; PRINT marks values
 * that differ from `defaults` (may be NULL); keys under outputs.work_dir are
 * compared with `defaults_wd`, the defaults placed under cfg's own work_dir,
 * so moving work_dir does not mark every output as changed. */
static void emit(FILE *f, const sp_config *cfg, int mode, const sp_config *defaults, const sp_config *defaults_wd)
{
    char prev[256] = "", val[VALBUF], dval[VALBUF], allowed[600];
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        /* Open the groups this key enters: compare its group path with the previous key's. */
        const char *name = k->name;
        int depth = 0;
        size_t common = 0; /* length of the group prefix shared with prev */
        for (size_t j = 0; name[j] && prev[j] && name[j] == prev[j]; j++)
            if (name[j] == '.') common = j + 1;
        for (size_t j = 0; name[j]; j++)
            if (name[j] == '.') {
                if (j + 1 > common) {
                    char group[256];
                    snprintf(group, sizeof group, "%.*s", (int)j, name);
                    const char *last = strrchr(group, '.');
                    last = last ? last + 1 : group;
                    if (depth == 0) fputc('\n', f);
                    if (mode == EMIT_TEMPLATE) {
                        const char *doc = sp_config_section_doc(group);
                        if (doc) wrap_comment(f, depth * 2, doc);
                    }
                    fprintf(f, "%*s%s:\n", depth * 2, "", last);
                }
                depth++;
            }
        snprintf(prev, sizeof prev, "%s", name);
        const char *leaf = strrchr(name, '.') + 1;
        sp_config_format_value(cfg, k, val, sizeof val);
        if (mode == EMIT_TEMPLATE) {
            char meta[800];
            sp_config_allowed_text(k, allowed, sizeof allowed);
            snprintf(meta, sizeof meta, "allowed: %s%s%s%s%s", allowed, k->unit[0] ? " (" : "", k->unit,
                     k->unit[0] ? ")" : "", (k->flags & SP_CFG_F_SCIENCE) ? "; science" : "");
            wrap_comment(f, depth * 2, k->doc);
            wrap_comment(f, depth * 2, meta);
            fprintf(f, "%*s%s: %s\n", depth * 2, "", leaf, val);
        } else {
            fprintf(f, "%*s%s: %s", depth * 2, "", leaf, val);
            const sp_config *dflt = (k->flags & SP_CFG_F_REL_WORKDIR) && defaults_wd ? defaults_wd : defaults;
            if (dflt) {
                sp_config_format_value(dflt, k, dval, sizeof dval);
                if (strcmp(val, dval)) fprintf(f, "  # default: %s", dval);
            }
            fputc('\n', f);
        }
    }
}

int sp_config_dump_template(FILE *f)
{
    int status = SP_OK;
    sp_config d;
    SP_TRY(sp_config_defaults(&d));
    fprintf(f,
            "# surveyproc configuration template: every key at its default (surveyproc %s).\n"
            "# Written by `surveyproc config --dump`; the reference is docs/config.md.\n"
            "#\n"
            "# Must set: inputs.image_list_file and inputs.input_catalog. A key left out keeps its\n"
            "# default, so delete what you do not change. Relative paths resolve against this file's\n"
            "# folder; outputs.* other than work_dir resolve against outputs.work_dir. `auto` lets the\n"
            "# planner choose. Keys marked 'science' change results: `surveyproc run --resume` refuses a\n"
            "# store made with different values. Check a config with `surveyproc config FILE`.\n",
            SP_VERSION);
    emit(f, &d, EMIT_TEMPLATE, NULL, NULL);
    sp_config_free(&d);
    SP_CHECK(!ferror(f), SP_ERR_IO, "error writing the config template: %s", strerror(errno));
cleanup:
    return status;
}

int sp_config_print(FILE *f, const sp_config *cfg)
{
    int status = SP_OK;
    sp_config d, dwd;
    memset(&d, 0, sizeof d);
    memset(&dwd, 0, sizeof dwd);
    SP_TRY(sp_config_defaults(&d));
    SP_TRY(sp_config_defaults(&dwd));
    if (cfg->outputs.work_dir) {
        free(dwd.outputs.work_dir);
        dwd.outputs.work_dir = dupstr(cfg->outputs.work_dir);
        SP_CHECK(dwd.outputs.work_dir, SP_ERR_NOMEM, "out of memory");
    }
    if (cfg->config_dir) {
        SP_TRY(sp_config_resolve_paths(&d, cfg->config_dir));
        SP_TRY(sp_config_resolve_paths(&dwd, cfg->config_dir));
    }
    uint64_t h = 0;
    sp_config_science_hash(cfg, &h);
    fprintf(f, "# surveyproc effective configuration (surveyproc %s)\n", SP_VERSION);
    if (cfg->config_path) fprintf(f, "# from: %s\n", cfg->config_path);
    fprintf(f, "# science hash: %016llx\n", (unsigned long long)h);
    emit(f, cfg, EMIT_PRINT, &d, &dwd);
    SP_CHECK(!ferror(f), SP_ERR_IO, "error writing the configuration: %s", strerror(errno));
cleanup:
    sp_config_free(&d);
    sp_config_free(&dwd);
    return status;
}

int sp_config_to_yaml_string(const sp_config *cfg, char **text)
{
    int status = SP_OK;
    char *buf = NULL;
    size_t len = 0;
    *text = NULL;
    FILE *f = open_memstream(&buf, &len);
    SP_CHECK(f, SP_ERR_NOMEM, "out of memory writing the configuration");
    status = sp_config_print(f, cfg);
    if (fclose(f) != 0 && status == SP_OK) status = SP_FAIL(SP_ERR_NOMEM, "out of memory writing the configuration");
    if (status != SP_OK) goto cleanup;
    *text = buf;
    buf = NULL;
cleanup:
    free(buf);
    return status;
}

/* Markdown table cell: '|' would end the cell, and renderers take <band> for an HTML tag. */
static void md_cell(FILE *f, const char *s)
{
    for (; *s; s++) {
        if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else {
            if (*s == '|') fputc('\\', f);
            fputc(*s, f);
        }
    }
}

int sp_config_write_markdown(FILE *f)
{
    int status = SP_OK;
    sp_config d;
    char val[VALBUF], allowed[600];
    SP_TRY(sp_config_defaults(&d));
    fprintf(f,
            "# Configuration reference\n\n"
            "<!-- Generated by `surveyproc config --markdown` from src/core/config_schema.c; do not edit by hand.\n"
            "     tests/scripts/test_config_docs.sh fails when this file and the schema disagree. -->\n\n"
            "A run is configured by one YAML file. `surveyproc config --dump` writes a commented template with\n"
            "every key at its default; `surveyproc config FILE` checks a file and prints the effective\n"
            "configuration (every key, paths resolved, non-default values marked).\n\n"
            "Rules:\n\n"
            "- A key left out keeps its default. Unknown keys, wrong types, out-of-range and non-allowed values\n"
            "  are errors of the form `FILE:LINE: key: what is wrong (allowed: ...)`; all errors of a file are\n"
            "  reported together. Malformed YAML is reported with its line and column.\n"
            "- **Paths**: `~/` expands to `$HOME`. A relative path resolves against the folder of the config\n"
            "  file, except `outputs.*` (other than `outputs.work_dir`) and `performance.fftw_wisdom_file`,\n"
            "  which resolve against `outputs.work_dir` (as in tract7dt).\n"
            "- **auto**: keys of type auto-or-int accept `auto`, and the resource planner (`surveyproc plan`)\n"
            "  chooses from the launcher's environment (SLURM/PBS variables, OpenMP, cgroups, cores, memory).\n"
            "- **null**: only keys whose allowed values say so accept `null`.\n"
            "- **Science**: keys marked *yes* can change the numbers in the catalog. They are hashed\n"
            "  (`sp_config_science_hash`) into the store, and `surveyproc run --resume` refuses a store made with\n"
            "  different values. Performance, output, logging and QA keys are not hashed; input paths are\n"
            "  covered by the separate hash of the input files.\n"
            "- Under MPI, rank 0 reads the file and broadcasts its text; every rank parses the same text.\n\n"
            "## Sections\n\n");
    for (int i = 0; i < sp_cfg_nsections; i++)
        if (!strchr(sp_cfg_sections[i].name, '.'))
            fprintf(f, "- [`%s`](#%s): %s\n", sp_cfg_sections[i].name, sp_cfg_sections[i].name, sp_cfg_sections[i].doc);
    fprintf(f, "- [Coming from tract7dt](#coming-from-tract7dt)\n");

    const char *section = "";
    size_t seclen = 0;
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        size_t n = (size_t)(strchr(k->name, '.') - k->name);
        if (n != seclen || strncmp(k->name, section, n)) {
            section = k->name;
            seclen = n;
            char sec[128];
            snprintf(sec, sizeof sec, "%.*s", (int)n, k->name);
            fprintf(f, "\n## %s\n\n%s\n", sec, sp_config_section_doc(sec) ? sp_config_section_doc(sec) : "");
            for (int j = 0; j < sp_cfg_nsections; j++) /* nested groups of this section */
                if (!strncmp(sp_cfg_sections[j].name, sec, n) && sp_cfg_sections[j].name[n] == '.')
                    fprintf(f, "`%s`: %s\n", sp_cfg_sections[j].name, sp_cfg_sections[j].doc);
            fprintf(f, "\n| Key | Type | Default | Allowed | Unit | Science | Description |\n"
                       "|---|---|---|---|---|---|---|\n");
        }
        sp_config_format_value(&d, k, val, sizeof val);
        sp_config_allowed_text(k, allowed, sizeof allowed);
        fprintf(f, "| `%s` | %s | `", k->name, sp_config_type_name(k->type));
        md_cell(f, val);
        fputs("` | ", f);
        md_cell(f, allowed);
        fprintf(f, " | %s | %s | ", k->unit, (k->flags & SP_CFG_F_SCIENCE) ? "yes" : "no");
        md_cell(f, k->doc);
        fputs(" |\n", f);
    }

    fprintf(f, "\n## Coming from tract7dt\n\n"
               "surveyproc keeps tract7dt's section and key names where the concept is the same, so a tract7dt\n"
               "config reads familiar. Keys it renamed or dropped are recognised: using one is an error that\n"
               "names the replacement. Pipeline products that were separate files in tract7dt (ePSFs, patch\n"
               "definitions, per-patch fits, the merged CSV) are datasets of the one HDF5 store.\n\n"
               "### Renamed or dropped keys\n\n"
               "| tract7dt key | surveyproc key | Note |\n|---|---|---|\n");
    for (int i = 0; i < sp_cfg_nseed_keys; i++) {
        const sp_cfg_seed_key *s = &sp_cfg_seed_keys[i];
        fprintf(f, "| `%s` | %s%s%s | ", s->seed, s->ours ? "`" : "", s->ours ? s->ours : "(none)", s->ours ? "`" : "");
        md_cell(f, s->note);
        fputs(" |\n", f);
    }
    fprintf(f, "\n### Same key, different default\n\n"
               "| Key | tract7dt default | surveyproc default | Why |\n|---|---|---|---|\n");
    for (int i = 0; i < sp_cfg_nchanged_defaults; i++) {
        const sp_cfg_changed_default *c = &sp_cfg_changed_defaults[i];
        const sp_config_key *k = sp_config_find_key(c->key);
        if (k)
            sp_config_format_value(&d, k, val, sizeof val);
        else
            snprintf(val, sizeof val, "?");
        fprintf(f, "| `%s` | `%s` | `", c->key, c->seed_default);
        md_cell(f, val);
        fputs("` | ", f);
        md_cell(f, c->why);
        fputs(" |\n", f);
    }
    fprintf(f, "\nAlso new in surveyproc (no tract7dt equivalent): `performance.ranks`, `threads_per_rank`,\n"
               "`memory_per_rank_mb`, `dedicated_coordinator`, `blas_coretype`, `fftw_wisdom_file`, `rank_timeout_s`; the\n"
               "staged fit "
               "(`patch_run.enable_staged_fit`), sky fitting (`fit_sky`, `sky_order`), halo handling\n"
               "(`halo_source_mode`), shape bounds; and `outputs.store`, `export_formats`, `save_white`.\n");
    sp_config_free(&d);
    SP_CHECK(!ferror(f), SP_ERR_IO, "error writing the config reference: %s", strerror(errno));
cleanup:
    return status;
}

/* ---------------------------------------------------------- comparison */

int sp_config_science_hash(const sp_config *cfg, uint64_t *hash)
{
    uint64_t h = 14695981039346656037ULL; /* FNV-1a 64 offset basis */
    char val[VALBUF];
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        if (!(k->flags & SP_CFG_F_SCIENCE)) continue;
        sp_config_format_value(cfg, k, val, sizeof val);
        const char *parts[4] = {k->name, "=", val, "\n"};
        for (int p = 0; p < 4; p++)
            for (const unsigned char *c = (const unsigned char *)parts[p]; *c; c++) {
                h ^= *c;
                h *= 1099511628211ULL; /* FNV prime */
            }
    }
    *hash = h;
    return SP_OK;
}

int sp_config_diff(const sp_config *a, const sp_config *b, int science_only, char *buf, size_t n)
{
    char va[VALBUF], vb[VALBUF];
    int count = 0;
    size_t len = 0;
    if (buf && n) buf[0] = '\0';
    for (int i = 0; i < sp_cfg_nschema; i++) {
        const sp_config_key *k = &sp_cfg_schema[i];
        if (science_only && !(k->flags & SP_CFG_F_SCIENCE)) continue;
        sp_config_format_value(a, k, va, sizeof va);
        sp_config_format_value(b, k, vb, sizeof vb);
        if (!strcmp(va, vb)) continue;
        count++;
        if (buf && len + 1 < n) len += (size_t)snprintf(buf + len, n - len, "%s: %s -> %s\n", k->name, va, vb);
    }
    return count;
}
