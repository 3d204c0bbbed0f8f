/* config_internal.h — private to src/core/config*.c: the schema tables.
 * The public view of the schema is the accessor API in sp_config.h. */
#ifndef SP_CONFIG_INTERNAL_H
#define SP_CONFIG_INTERNAL_H

#include "surveyproc/sp_config.h"

/* Every key, in file order. Keys of one section (and of one nested group such
 * as checks.wcs_tolerance) are contiguous: the YAML writers rely on it and
 * test_config checks it. */
extern const sp_config_key sp_cfg_schema[];
extern const int sp_cfg_nschema;

/* One line of documentation per section and nested group, in file order. */
typedef struct {
    const char *name;
    const char *doc;
} sp_cfg_section;
extern const sp_cfg_section sp_cfg_sections[];
extern const int sp_cfg_nsections;

/* Keys (or whole sections) of the seed pipeline tract7dt that surveyproc
 * renamed (`ours` set) or dropped (`ours` NULL). Using one in a config file is
 * an error whose message comes from here; docs/config.md lists them. */
typedef struct {
    const char *seed;
    const char *ours;
    const char *note;
} sp_cfg_seed_key;
extern const sp_cfg_seed_key sp_cfg_seed_keys[];
extern const int sp_cfg_nseed_keys;

/* Keys shared with tract7dt whose default surveyproc changed, and why. */
typedef struct {
    const char *key;
    const char *seed_default;
    const char *why;
} sp_cfg_changed_default;
extern const sp_cfg_changed_default sp_cfg_changed_defaults[];
extern const int sp_cfg_nchanged_defaults;

#endif
