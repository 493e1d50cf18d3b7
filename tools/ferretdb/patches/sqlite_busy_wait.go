// Local change (azora): a connection waiting for SQLite's write lock polls every 100 µs for
// its first 20 ms, then waits as upstream does.
//
// SQLite's default busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between attempts, so a
// lock freed after a fraction of a millisecond is taken only when the sleep ends. FerretDB
// runs every command in its own transaction on a pool of connections, and its write
// transactions last well under a millisecond, so under concurrent writes (new mail being
// stored while deliveries record their outcomes) most waiting writers were asleep long after
// the lock was free: sampled goroutine stacks during the mail benchmark showed 1.6 of the 2.2
// connections inside SQLite on average sleeping in the busy handler. Short polls take the
// lock within about 0.1 ms of its release. The total wait before SQLITE_BUSY is the same
// busy_timeout as before (the first 20 ms are counted here, the rest by upstream's schedule).

//go:build linux && amd64

package sqlite3

import (
	"unsafe"

	"modernc.org/libc"
)

// _azoraShortWaits polls of _azoraShortWaitMicros each come first: _azoraShortWaitsMs in all.
const (
	_azoraShortWaits      = int32(200)
	_azoraShortWaitMicros = int32(100)
	_azoraShortWaitsMs    = _azoraShortWaits * _azoraShortWaitMicros / 1000
)

// _azoraShortWait is wait number count (0-based) of a writer: a 100 µs sleep, or 0 (give up)
// once the busy timeout (tmout, in ms) is spent.
func _azoraShortWait(tls *libc.TLS, db uintptr, count, tmout int32) int32 {
	if count*_azoraShortWaitMicros >= tmout*1000 {
		return 0
	}

	_sqlite3OsSleep(tls, (*Tsqlite3)(unsafe.Pointer(db)).FpVfs, _azoraShortWaitMicros)

	return 1
}
