// Local change (azora): a connection waiting for SQLite's write lock first waits 0.1 ms, then
// doubles (0.1, 0.2, 0.4 ... 12.8 ms), then waits as upstream does.
//
// SQLite's default busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between attempts, so a
// lock freed after a fraction of a millisecond is taken only when the sleep ends. FerretDB
// runs every command in its own transaction on a pool of connections, and its write
// transactions last well under a millisecond, so under concurrent writes (new mail being
// stored while deliveries record their outcomes) most waiting writers were asleep long after
// the lock was free: sampled goroutine stacks during the mail benchmark showed 1.6 of the 2.2
// connections inside SQLite on average sleeping in the busy handler. Short waits take the
// lock soon after its release. The total wait before SQLITE_BUSY is the same busy_timeout as
// before (the first 25 ms are counted here, the rest by upstream's schedule).

//go:build linux && amd64

package sqlite3

import (
	"unsafe"

	"modernc.org/libc"
)

// The first _azoraShortWaits waits double from 100 us (0.1, 0.2, 0.4 ... 12.8 ms: 25.5 ms in
// all, _azoraShortWaitsMs rounded down); upstream's schedule follows for the rest of the
// timeout. Doubling keeps many waiting writers from polling the lock all at once.
const (
	_azoraShortWaits   = int32(8)
	_azoraFirstWaitUs  = int32(100)
	_azoraShortWaitsMs = int32(25)
)

// _azoraShortWait is wait number count (0-based) of a writer: a sleep of 100 us << count, or 0
// (give up) once the busy timeout (tmout, in ms) is spent.
func _azoraShortWait(tls *libc.TLS, db uintptr, count, tmout int32) int32 {
	waited := _azoraFirstWaitUs * ((int32(1) << count) - 1) // us slept before this wait
	if waited >= tmout*1000 {
		return 0
	}

	_sqlite3OsSleep(tls, (*Tsqlite3)(unsafe.Pointer(db)).FpVfs, _azoraFirstWaitUs<<count)

	return 1
}
