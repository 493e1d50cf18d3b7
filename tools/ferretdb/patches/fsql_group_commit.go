// Local change (azora): concurrent document writes to one SQLite database share a transaction.
//
// Upstream gives every InsertAll, UpdateAll and DeleteAll a transaction of its own: BEGIN, the
// statements, COMMIT with an fsync of the write-ahead log, while holding the database's single
// write lock. Under the mail benchmark most of FerretDB's connections inside SQLite were either
// in that fsync or asleep waiting for the lock it held (sampled goroutine stacks: 0.33 and 0.83
// connections on average, against 0.07 running statements).
//
// InGroupTransaction queues the write; one goroutine per database takes every write queued
// while it was busy and runs them in one transaction, each inside its own SAVEPOINT, then
// commits once (group commit, as databases do with their log). A lone write goes alone, so
// nothing waits for company. Each write still sees exactly what it would alone:
//
//   - a write that fails is rolled back to its savepoint, so it leaves nothing, and gets its
//     own error; the others of the group are not affected (a unique index violated by the
//     second of two inserts of one _id fails that one, as if it had run after the first);
//   - every write is acknowledged only after the COMMIT that made it durable;
//   - if the group's transaction fails as a whole (it could not begin, or commit), nothing of
//     it landed, and every write of the group gets that error, as a lone transaction failing
//     there would have given it;
//   - the writes these calls make are blind (the handler read and changed the documents
//     before), so sharing a transaction changes nothing they compute.
//
// The callers run their statements with a context that is not cancelled when the client goes
// away (context.WithoutCancel): modernc.org/sqlite interrupts the connection on cancellation,
// and an interrupted write inside an explicit transaction rolls back the whole transaction,
// the other clients' writes with it. A write already queued is carried out either way.
//
// FERRETDB_GROUP_COMMIT=off gives every write its own transaction again (upstream's way).

package fsql

import (
	"context"
	"os"
	"sync"

	"github.com/FerretDB/FerretDB/internal/util/lazyerrors"
)

// groupCommitOn is false when FERRETDB_GROUP_COMMIT=off.
var groupCommitOn = os.Getenv("FERRETDB_GROUP_COMMIT") != "off"

// groupCommitMax bounds the writes of one group (a transaction's size and the time the lock
// is held for it).
const groupCommitMax = 64

// groupWrite is one caller's write waiting for its group.
type groupWrite struct {
	f    func(*Tx) error
	done chan error
}

// groupCommitter runs the queued writes of one database, a group at a time.
type groupCommitter struct {
	db      *DB
	mu      sync.Mutex
	queued  []*groupWrite
	running bool
}

// committers holds the groupCommitter of each DB (*DB -> *groupCommitter).
var committers sync.Map

// InGroupTransaction runs f in a transaction shared with the other writes queued meanwhile
// (see above), and returns f's error, or the group's.
func (db *DB) InGroupTransaction(ctx context.Context, f func(*Tx) error) error {
	if !groupCommitOn {
		return db.InTransaction(ctx, f)
	}

	v, _ := committers.LoadOrStore(db, &groupCommitter{db: db})
	gc := v.(*groupCommitter)

	w := &groupWrite{f: f, done: make(chan error, 1)}

	gc.mu.Lock()
	gc.queued = append(gc.queued, w)

	if !gc.running {
		gc.running = true

		go gc.run()
	}
	gc.mu.Unlock()

	return <-w.done
}

// run writes groups until nothing is queued.
func (gc *groupCommitter) run() {
	for {
		gc.mu.Lock()

		group := gc.queued
		if len(group) > groupCommitMax {
			group = group[:groupCommitMax:groupCommitMax]
		}

		gc.queued = gc.queued[len(group):]
		if len(group) == 0 {
			gc.queued = nil
			gc.running = false
			gc.mu.Unlock()

			return
		}
		gc.mu.Unlock()

		gc.write(group)
	}
}

// write runs one group in one transaction and answers each of its writes.
func (gc *groupCommitter) write(group []*groupWrite) {
	ctx := context.Background()

	if len(group) == 1 {
		group[0].done <- gc.db.InTransaction(ctx, group[0].f)
		return
	}

	errs := make([]error, len(group))

	err := gc.db.InTransaction(ctx, func(tx *Tx) error {
		for i, w := range group {
			if _, err := tx.ExecContext(ctx, "SAVEPOINT azora_group_write"); err != nil {
				return lazyerrors.Error(err)
			}

			if errs[i] = w.f(tx); errs[i] != nil {
				if _, err := tx.ExecContext(ctx, "ROLLBACK TO azora_group_write"); err != nil {
					return lazyerrors.Error(err)
				}
			}

			if _, err := tx.ExecContext(ctx, "RELEASE azora_group_write"); err != nil {
				return lazyerrors.Error(err)
			}
		}

		return nil
	})

	for i, w := range group {
		if err != nil {
			w.done <- err
			continue
		}

		w.done <- errs[i]
	}
}
