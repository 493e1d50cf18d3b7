#!/usr/bin/env bash
# Build bin/ferretdb at the version pinned in tools/ferretdb/go.mod (called by `make deps`).
#
# Why not `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.0`: that form asks the Go
# module proxy for the module's version list, which some build machines cannot get (it answers 403
# here). Instead tools/ferretdb is a tiny module that requires FerretDB at an exact version, with a
# committed go.sum; vendoring it only downloads the pinned, checksummed module zips.
#
# Local changes are applied to the vendored source before building (see "Local fix" and
# "Local change" below); the binary's build id (pinned version + change revision) is kept in
# bin/ferretdb.build-id.
#
# Idempotent: does nothing when bin/ferretdb already reports the pinned version and build id.
# Environment: GO (go command, default: `go` on PATH, else /usr/local/go/bin/go).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools_dir="$repo_root/tools/ferretdb"
bin_dir="$repo_root/bin"
binary="$bin_dir/ferretdb"
module="github.com/FerretDB/FerretDB"

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
if ! "$GO" version >/dev/null 2>&1; then
  echo "build_ferretdb: Go toolchain not found (set GO=/path/to/go)" >&2
  exit 1
fi

# The pinned version is whatever go.mod requires; go.mod is the single place to change it.
version="$(awk -v m="$module" '
  $1 == m { print $2; exit }                     # inside a require ( ... ) block
  $1 == "require" && $2 == m { print $3; exit }  # one-line require
' "$tools_dir/go.mod")"
if [[ ! "$version" =~ ^v[0-9]+\.[0-9]+\.[0-9]+ ]]; then
  echo "build_ferretdb: cannot read the $module version from $tools_dir/go.mod" >&2
  exit 1
fi

# True when $binary exists and reports $version. The output is captured first, not piped into
# `grep -q`: grep exits at the first match, ferretdb then dies of SIGPIPE, and under pipefail
# the check would fail at random.
has_version() {
  local output
  output="$("$binary" --version 2>/dev/null)" || return 1
  grep -qx "version: $version" <<<"$output"
}

# Bump the suffix whenever the local fix below changes, so that existing binaries get rebuilt.
build_id="$version+azora-sqlite-id-index.1+index-pushdown.3+resource-tracking-debug-only.1+sjson-fast-unmarshal.2+sql-debug-log-lazy.1+libc-memcmp-blocks.1+wire-built-messages-not-rechecked.1+sjson-schema-cache.1+sqlite-stmt-cache.1+sqlite-busy-short-waits.2+batched-updates.2+group-commit.1+fast-exclusion.1+multikey-side-tables.4"
build_id_file="$bin_dir/ferretdb.build-id"

if [[ -x "$binary" ]] && has_version && [[ "$(cat "$build_id_file" 2>/dev/null)" == "$build_id" ]]; then
  exit 0
fi

echo "build_ferretdb: building FerretDB $version into $binary (takes a minute or two)" >&2
cd "$tools_dir"
# vendor/ is gitignored and rebuilt from go.mod/go.sum each time, so it never drifts.
rm -rf vendor
"$GO" mod vendor

# FerretDB embeds build/version/*.txt and panics at start-up ("Invalid build/version/version.txt
# file content") unless version.txt holds a `v<major>.<minor>.<patch>` version. Upstream generates
# that file with `bin/task gen-version`, it is gitignored there, and so it is absent from the
# module zip the Go toolchain downloads. Write it into the vendored copy before building.
printf '%s\n' "$version" >"vendor/$module/build/version/version.txt"

# Local fix: let lookups by _id use the collection's unique _id index. The SQLite backend's
# WHERE clauses (find, update, delete by _id) spell the path ->'$._id' while the index it creates
# is on ->"_id"; SQLite uses an expression index only for the same spelling, so every update and
# delete by _id scanned and JSON-parsed the whole table (measured with the sqlite3 shell on a
# 5,000-document table: 35-45 ms scanning vs under 1 ms searching the index; through FerretDB an
# update took 50-90 ms at 5,000 3-KB documents). The label form '_id' denotes the same path
# ($._id, SQLite's JSON docs) and matches the index. Query results are unchanged.
metadata_go="vendor/$module/internal/backends/sqlite/metadata/metadata.go"
sed -i "s|IDColumn = DefaultColumn + \"->'\$\._id'\"|IDColumn = DefaultColumn + \"->'_id'\"|" "$metadata_go"
if ! grep -qF "IDColumn = DefaultColumn + \"->'_id'\"" "$metadata_go"; then
  echo "build_ferretdb: the _id index fix no longer applies to $metadata_go; review it" >&2
  exit 1
fi

# Local change: filter and sort pushdown onto indexes (tools/ferretdb/patches/, README there).
# Non-unique indexes on top-level fields are created in a "typed" form (the field's BSON type
# and SQL value), and the SQLite backend turns equality, $in and range conditions on them, and a
# one-field sort, into WHERE/ORDER BY clauses that SQLite serves from the index. The pushed
# condition is a superset of the matches and the handler still filters every document, so
# results are unchanged; FERRETDB_SQLITE_INDEX_PUSHDOWN=off plans queries as upstream does.
patches_dir="$tools_dir/patches"

# apply_patch DIR NAME: apply patches/NAME inside DIR (a vendored module), or stop the build.
apply_patch() {
  if ! patch --quiet --forward --batch -p1 -d "$1" <"$patches_dir/$2"; then
    echo "build_ferretdb: $patches_dir/$2 no longer applies; review it" >&2
    exit 1
  fi
}
cp "$patches_dir/metadata_typed_index.go" "vendor/$module/internal/backends/sqlite/metadata/typed_index.go"
cp "$patches_dir/sqlite_pushdown.go" "vendor/$module/internal/backends/sqlite/pushdown.go"
apply_patch "vendor/$module" sqlite-index-pushdown.patch

# Local change: resource tracking only in debug builds. FerretDB tracks every iterator, cursor
# and query as a leak detector: a pprof profile entry with a captured stack and a finalizer per
# object, in release builds too. Measured with FerretDB's own CPU profile under the mail
# benchmark and under ListEmails pages: 10-12 % of the server's CPU (stack unwinding, profile
# bookkeeping, finalizers). The release build we run skips it (`debugbuild.Enabled` is false).
apply_patch "vendor/$module" resource-tracking-debug-only.patch

# Local change: stored documents decoded in one pass. Upstream decodes every row's sjson text
# with encoding/json in layers (a new json.Decoder per field, nested values re-read per level);
# that was most of the cost of reading rows. The one-pass decoder returns the same document or
# declines, and upstream's decoder then runs (README there; FERRETDB_SJSON_FAST_DECODE=off).
cp "$patches_dir/sjson_fast_unmarshal.go" "vendor/$module/internal/handler/sjson/fast_unmarshal.go"
apply_patch "vendor/$module" sjson-fast-unmarshal.patch

# Local change: SQL debug log lines built only when debug logging is on (upstream formatted every
# statement's arguments, whole documents as JSON, before dropping the line at our level).
cp "$patches_dir/fsql_debug_log.go" "vendor/$module/internal/util/fsql/debug_log.go"
apply_patch "vendor/$module" sql-debug-log-lazy.patch

# Local change: SQLite's memcmp (modernc.org/libc, a byte per loop turn) skips equal 64-byte
# blocks with bytes.Equal; same return values (README there).
libc_dir="vendor/modernc.org/libc"
cp "$patches_dir/libc_memcmp.go" "$libc_dir/azora_memcmp.go"
apply_patch "$libc_dir" libc-memcmp-blocks.patch

# Local change: messages we build (replies) are not decoded again to check them (requests still are).
apply_patch "vendor/github.com/FerretDB/wire" wire-built-messages-not-rechecked.patch

# Local change: statements run through Exec are compiled once per connection, not every time
# (modernc.org/sqlite prepared, ran and finalized each); README there; FERRETDB_SQLITE_STMT_CACHE=off.
sqlite_dir="vendor/modernc.org/sqlite"
cp "$patches_dir/sqlite_stmt_cache.go" "$sqlite_dir/azora_stmt_cache.go"
apply_patch "$sqlite_dir" sqlite-stmt-cache.patch

# Local change: a connection waiting for the write lock first waits 0.1, 0.2, 0.4 ... 12.8 ms
# instead of sleeping 1, 2, 5, 10 ... ms (README there); same busy timeout in all.
cp "$patches_dir/sqlite_busy_wait.go" "$sqlite_dir/lib/azora_busy_wait.go"
apply_patch "$sqlite_dir" sqlite-busy-short-waits.patch

# Local change: an update command whose statements each name a distinct _id (string or
# ObjectID) writes its changed documents in one transaction, not one per statement (README
# there; FERRETDB_BATCHED_UPDATES=off).
cp "$patches_dir/handler_batched_update.go" "vendor/$module/internal/handler/batched_update.go"
apply_patch "vendor/$module" handler-batched-update.patch

# Local change: concurrent document writes (insert, update, delete) to one SQLite database
# share a transaction and its commit, each in its own savepoint (README there;
# FERRETDB_GROUP_COMMIT=off).
cp "$patches_dir/fsql_group_commit.go" "vendor/$module/internal/util/fsql/group_commit.go"
apply_patch "vendor/$module" sqlite-group-commit.patch

# Local change: an exclusion projection of plain top-level fields builds its result without
# deep-copying the document twice (README there; FERRETDB_FAST_EXCLUSION=off).
cp "$patches_dir/types_exclude_fields.go" "vendor/$module/internal/types/azora_exclude_fields.go"
cp "$patches_dir/handler_exclusion_projection.go" "vendor/$module/internal/handler/common/exclusion_projection.go"
apply_patch "vendor/$module" handler-exclusion-projection.patch

# Local change: an index whose name ends in _multikey is kept as a side table with one row per
# array element, maintained by triggers, and the planner joins it, so that an equality on an
# array field is served by an index as on MongoDB (README there).
cp "$patches_dir/metadata_multikey_index.go" "vendor/$module/internal/backends/sqlite/metadata/multikey_index.go"
apply_patch "vendor/$module" sqlite-multikey.patch

mkdir -p "$bin_dir"
GOBIN="$bin_dir" "$GO" install -mod=vendor "$module/cmd/ferretdb"
# The vendored tree (~240 MB) is only needed for this build.
rm -rf vendor

if ! has_version; then
  echo "build_ferretdb: built $binary does not report version $version:" >&2
  "$binary" --version >&2 || true
  exit 1
fi
printf '%s\n' "$build_id" >"$build_id_file"
echo "build_ferretdb: built $binary ($build_id)" >&2
