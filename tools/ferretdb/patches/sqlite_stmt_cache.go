// Local change (azora): statements run through Exec are prepared once per connection.
//
// database/sql's ExecContext without a prepared statement reaches conn.exec, which compiled the
// SQL text (sqlite3_prepare_v2), ran it once and finalized it, every time. FerretDB's writes
// (insert, update, delete of documents) are a handful of SQL texts run over and over, so
// compiling them was about a tenth of FerretDB's CPU under the mail benchmark. Here a
// connection keeps the compiled form of each single-statement text it ran, by text, and runs
// it again after sqlite3_reset and sqlite3_clear_bindings, which is what SQLite's own docs
// describe for reuse. A text holding more than one statement, or none, goes the old way.
//
// What stays exactly as before: the bound values, the result (changes and last insert id read
// after the step), the error of a failing step (the same c.step and errstr), interruption by
// the context. Bindings are cleared right after the step, before the memory of bound text is
// freed. SQLite re-compiles a cached statement by itself when the schema changed
// (prepare_v2), and a reset statement holds no lock, so DDL is not blocked. At most
// stmtCacheMax statements per connection (finalized when the cache is full and on Close).
//
// FERRETDB_SQLITE_STMT_CACHE=off runs every statement as before.

package sqlite

import (
	"context"
	"database/sql/driver"
	"os"
	"sync/atomic"
	"unsafe"

	"modernc.org/libc"
	sqlite3 "modernc.org/sqlite/lib"
)

// stmtCacheOn is false when FERRETDB_SQLITE_STMT_CACHE=off.
var stmtCacheOn = os.Getenv("FERRETDB_SQLITE_STMT_CACHE") != "off"

// stmtCacheMax bounds the statements one connection keeps compiled.
const stmtCacheMax = 64

// execCached runs query through the connection's statement cache. ok is false when the text
// is not cacheable (then nothing was run and the caller runs it the old way).
func (c *conn) execCached(ctx context.Context, query string, args []driver.NamedValue) (r driver.Result, ok bool, err error) {
	if !stmtCacheOn {
		return nil, false, nil
	}

	pstmt := c.stmts[query]
	if pstmt == 0 {
		var cacheable bool

		if pstmt, cacheable, err = c.compileOne(query); err != nil || !cacheable {
			return nil, cacheable, err
		}

		if len(c.stmts) >= stmtCacheMax {
			c.finalizeCached()
		}

		if c.stmts == nil {
			c.stmts = make(map[string]uintptr, stmtCacheMax)
		}

		c.stmts[query] = pstmt
	}

	var done int32

	if ctx != nil {
		if ctxDone := ctx.Done(); ctxDone != nil {
			select {
			case <-ctxDone:
				return nil, true, ctx.Err()
			default:
			}

			defer interruptOnDone(ctx, c, &done)()
		}
	}

	r, err = c.runCached(pstmt, args)

	if ctx != nil && atomic.LoadInt32(&done) != 0 {
		r, err = nil, ctx.Err()
	}

	return r, true, err
}

// compileOne compiles query; cacheable only when it is exactly one statement.
func (c *conn) compileOne(query string) (pstmt uintptr, cacheable bool, err error) {
	psql, err := libc.CString(query)
	if err != nil {
		return 0, false, nil
	}

	defer c.free(psql)

	tail := psql

	if pstmt, err = c.prepareV2(&tail); err != nil {
		// The old way would fail the same way at the same point: report it from here.
		return 0, true, err
	}

	if pstmt == 0 {
		return 0, false, nil
	}

	if *(*byte)(unsafe.Pointer(tail)) != 0 {
		c.finalize(pstmt) //nolint:errcheck // nothing ran: the old way runs the text again
		return 0, false, nil
	}

	return pstmt, true, nil
}

// runCached binds args, steps once, and leaves the statement reset with no bindings.
func (c *conn) runCached(pstmt uintptr, args []driver.NamedValue) (r driver.Result, err error) {
	var allocs []uintptr

	defer func() {
		sqlite3.Xsqlite3_reset(c.tls, pstmt)
		sqlite3.Xsqlite3_clear_bindings(c.tls, pstmt)

		for _, v := range allocs {
			c.free(v)
		}
	}()

	n, err := c.bindParameterCount(pstmt)
	if err != nil {
		return nil, err
	}

	if n != 0 {
		if allocs, err = c.bind(pstmt, n, args); err != nil {
			return nil, err
		}
	}

	rc, err := c.step(pstmt)
	if err != nil {
		return nil, err
	}

	switch rc & 0xff {
	case sqlite3.SQLITE_DONE, sqlite3.SQLITE_ROW:
		return newResult(c)
	default:
		return nil, c.errstr(int32(rc))
	}
}

// finalizeCached finalizes and forgets every cached statement.
func (c *conn) finalizeCached() {
	for query, pstmt := range c.stmts {
		c.finalize(pstmt) //nolint:errcheck // the error belongs to a step already reported
		delete(c.stmts, query)
	}
}
