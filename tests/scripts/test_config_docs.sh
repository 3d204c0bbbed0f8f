#!/usr/bin/env bash
# test_config_docs.sh — `surveyproc config` end to end, and docs/config.md in step with the schema.
# Prints PASS: / FAIL: / SKIP: lines (see tests/run_all.sh).
set -u
cd "$(dirname "$0")/../.."
BIN=${SP_BIN:-$PWD/bin/surveyproc}
if [ ! -x "$BIN" ]; then echo "SKIP: config_cli (no $BIN; run make)"; exit 0; fi
T=$(mktemp -d "${TMPDIR:-/tmp}/sptest_cfg.XXXXXX")
trap 'rm -rf "$T"' EXIT

pass() { echo "PASS: $1"; }
fail() { echo "FAIL: $1"; shift; for l in "$@"; do echo "      $l"; done; }

# 1. docs/config.md is exactly what the schema generates (so no key is missing or stale).
if "$BIN" config --markdown --out "$T/config.md" 2>"$T/err" && diff -u docs/config.md "$T/config.md" >"$T/diff"; then
  pass config_docs_current
else
  fail config_docs_current "docs/config.md differs from the schema; regenerate it:" \
       "  bin/surveyproc config --markdown --out docs/config.md" "$(head -20 "$T/diff")" "$(cat "$T/err")"
fi

# 2. every key of the template is documented in docs/config.md (a second, independent check).
"$BIN" config --dump >"$T/template.yaml" 2>"$T/err"
missing=$(awk '
  /^[^# ][^:]*:$/ { sec=$1; sub(":","",sec); sub2=""; next }          # top-level section
  /^  [^# ][^:]*:$/ { s=$1; sub(":","",s); sub2=s; next }            # nested group
  /^    [^#]/ { k=$1; sub(":","",k); print sec "." sub2 "." k; next }
  /^  [^# ]/ { k=$1; sub(":","",k); sub2=""; print sec "." k }
' "$T/template.yaml" | while read -r key; do grep -qF "| \`$key\` |" docs/config.md || echo "$key"; done)
nkeys=$(grep -c '^ *[a-z_0-9]*: ' "$T/template.yaml")
if [ -z "$missing" ] && [ "$nkeys" -gt 100 ]; then pass config_docs_every_key; else
  fail config_docs_every_key "keys in the template but not in docs/config.md ($nkeys keys):" $missing; fi

# 3. the template validates and equals the defaults (same science hash as an empty file).
: >"$T/empty.yaml"
h1=$("$BIN" config "$T/template.yaml" --hash 2>"$T/err"); h2=$("$BIN" config "$T/empty.yaml" --hash 2>>"$T/err")
if [ -n "$h1" ] && [ "$h1" = "$h2" ]; then pass config_template_is_defaults; else
  fail config_template_is_defaults "template hash '$h1' vs empty-file hash '$h2'" "$(cat "$T/err")"; fi

# 4. the example validates; the effective print is valid YAML that reloads to the same config.
if "$BIN" config config/example.yaml --out "$T/effective.yaml" 2>"$T/err" &&
   [ "$("$BIN" config "$T/effective.yaml" --hash)" = "$("$BIN" config config/example.yaml --hash)" ] &&
   grep -q 'work_dir: "/' "$T/effective.yaml"; then
  pass config_example_effective
else
  fail config_example_effective "$(cat "$T/err")"
fi

# 5. a bad config: exit code 3, FILE:LINE: key: message on stderr, nothing on stdout.
printf 'epsf:\n  epsf_ngrid: 4\n  thresh_sigm: 5\npatch_run:\n  gal_model: expo\n' >"$T/bad.yaml"
"$BIN" config "$T/bad.yaml" >"$T/out" 2>"$T/err"; rc=$?
if [ $rc -eq 3 ] && grep -q "bad.yaml:3: epsf.thresh_sigm: unknown key (did you mean epsf.thresh_sigma?)" "$T/err" &&
   grep -q "bad.yaml:5: patch_run.gal_model: 'expo' is not allowed" "$T/err" && [ ! -s "$T/out" ]; then
  pass config_bad_file_reported
else
  fail config_bad_file_reported "rc=$rc" "$(cat "$T/err")"
fi

# 6. malformed YAML: line and column.
printf 'crop:\n  margin: 3\n - x\n' >"$T/malformed.yaml"
"$BIN" config "$T/malformed.yaml" >/dev/null 2>"$T/err"; rc=$?
if [ $rc -eq 3 ] && grep -q "malformed.yaml:3:[0-9]*: malformed YAML" "$T/err"; then pass config_malformed_yaml; else
  fail config_malformed_yaml "rc=$rc" "$(cat "$T/err")"; fi

# 7. a missing file is an I/O error (exit 4) naming the file.
"$BIN" config "$T/nope.yaml" >/dev/null 2>"$T/err"; rc=$?
if [ $rc -eq 4 ] && grep -q "nope.yaml: cannot open config file" "$T/err"; then pass config_missing_file; else
  fail config_missing_file "rc=$rc" "$(cat "$T/err")"; fi

# 8. --set overrides, with the same checks.
out=$("$BIN" config "$T/empty.yaml" --set patch_run.n_opt_iters=33 --set 'outputs.export_formats=[csv]' 2>"$T/err")
if echo "$out" | grep -q "n_opt_iters: 33  # default: 20" && echo "$out" | grep -q "export_formats: \[csv\]" &&
   ! "$BIN" config "$T/empty.yaml" --set patch_run.n_opt_iters=0 >/dev/null 2>&1; then
  pass config_set_override
else
  fail config_set_override "$(cat "$T/err")"
fi

# 9. --help, and --out never leaves a half-written file.
if "$BIN" config --help | grep -q -- "--dump" && "$BIN" config --dump --out "$T/t2.yaml" && cmp -s "$T/t2.yaml" "$T/template.yaml" &&
   [ -z "$(ls "$T" | grep '\.tmp\.')" ]; then
  pass config_help_and_out
else
  fail config_help_and_out
fi
