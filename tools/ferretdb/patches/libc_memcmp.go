// Local change (azora): memcmp that skips the equal prefix in blocks.
//
// modernc.org/libc's memcmp (musl's, translated to Go) compares one byte per loop turn. SQLite's
// JSON functions call it on every json_extract to find an already parsed copy of the same JSON
// text in their cache, which compares whole stored documents that are mostly equal (the typed
// indexes of FerretDB's SQLite backend extract several fields of every row written): 8 % of
// FerretDB's CPU under the mail benchmark. This version lets bytes.Equal (vector instructions)
// pass over 64-byte blocks that are equal, then finds the first difference byte by byte inside
// the block where it lies and returns the same value as musl: the difference of the first
// unequal bytes, or 0.

//go:build linux && (amd64 || arm64)

package libc

import (
	"bytes"
	"unsafe"
)

// azoraMemcmp compares n bytes at vl and vr as C's memcmp does (musl's return value).
func azoraMemcmp(vl, vr uintptr, n Tsize_t) int32 {
	if n == 0 {
		return 0
	}

	l := unsafe.Slice((*byte)(unsafe.Pointer(vl)), n)
	r := unsafe.Slice((*byte)(unsafe.Pointer(vr)), n)

	i := 0
	for len(l)-i >= 64 && bytes.Equal(l[i:i+64], r[i:i+64]) {
		i += 64
	}

	for ; i < len(l); i++ {
		if l[i] != r[i] {
			return int32(l[i]) - int32(r[i])
		}
	}

	return 0
}
