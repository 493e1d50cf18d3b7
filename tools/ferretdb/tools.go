//go:build tools

// Package tools pins FerretDB as a build dependency of this repository.
//
// `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.0` needs the module proxy's version
// list, which is not reachable from every build machine. Building from this module (go.mod/go.sum
// committed, dependencies vendored at build time by scripts/build_ferretdb.sh) only needs the
// pinned module zips, and go.sum makes the result verifiable.
package tools

import _ "github.com/FerretDB/FerretDB/cmd/ferretdb"
