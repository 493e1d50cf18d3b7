// Local addition to FerretDB 1.24 (copied by scripts/build_ferretdb.sh to
// internal/backends/sqlite/pushdown.go): filter and sort pushdown onto typed indexes.
//
// Upstream's SQLite backend pushes down only a filter of exactly {_id: <string|ObjectId>};
// anything else reads and JSON-decodes every document of the collection. This file turns the
// filter (and a one-field sort) into a WHERE clause (and ORDER BY) that SQLite answers from an
// index created in the typed form (metadata/typed_index.go).
//
// The invariant that keeps results exact: the WHERE clause selects a SUPERSET of the documents
// the filter matches, and the handler still applies the whole filter to every returned document
// (and projections, skip, limit). A condition is pushed only where MongoDB's semantics imply it:
//
//   - Only top-level fields; only equality, $eq, $in, $gt, $gte, $lt, $lte; only values whose type
//     has an exact SQL image: string, ObjectId, date, bool (equality only) and numbers with
//     magnitude below 2^53 (so that exact and float comparison of stored int64s agree).
//     Everything else (null, missing, $ne, $nin, $exists, regex, documents, arrays, $or, ...) is
//     not pushed and is left to the handler.
//   - A comparison matches only values of its own type (MongoDB's type bracketing; int, long
//     and double are one numeric family), so `tag IN (<the value's types>)` is implied.
//   - An array field matches by element, which an expression index cannot see: a field is
//     pushed only after an index lookup showed that no candidate row (within the prefix already
//     pushed) holds an array in it; otherwise pushdown stops at that column.
//
// Sort: the handler sorts with MongoDB's cross-type order. The backend claims QueryResult.Sorted
// only for a one-field sort on the index column right after an equality prefix, after two index
// lookups showed that every candidate row holds the same type in that field (not array, not
// null, not missing, not object); within one type the index order is MongoDB's order. The
// handler then streams: filter, skip, limit, and stops reading rows at the limit.
//
// Concurrency: the checks and the query are separate statements; a document written while the
// query starts may or may not be seen, as with any MongoDB query that is not a snapshot read.
//
// FERRETDB_SQLITE_INDEX_PUSHDOWN=off (or 0/false) turns this off at start-up: queries then plan
// exactly as upstream (the typed indexes are still created), which tests use as the reference.
package sqlite

import (
	"context"
	"encoding/hex"
	"fmt"
	"math"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/FerretDB/FerretDB/internal/backends/sqlite/metadata"
	"github.com/FerretDB/FerretDB/internal/handler/sjson"
	"github.com/FerretDB/FerretDB/internal/types"
	"github.com/FerretDB/FerretDB/internal/util/fsql"
	"github.com/FerretDB/FerretDB/internal/util/lazyerrors"
	"github.com/FerretDB/FerretDB/internal/util/must"
)

// indexPushdownEnabled is read once: the switch is for whole processes, not per query.
var indexPushdownEnabled = func() bool {
	switch strings.ToLower(os.Getenv("FERRETDB_SQLITE_INDEX_PUSHDOWN")) {
	case "0", "off", "false", "no":
		return false
	default:
		return true
	}
}()

// numeric is MongoDB's numeric type family: its members compare with each other by value.
var numeric = []string{"double", "int", "long"}

// sortableTags are the types whose SQL values sort in MongoDB order among themselves.
var sortableTags = []string{"string", "objectId", "date", "bool", "double", "int", "long"}

// maxExactInt is 2^53: below it every integer is exact as a float64.
const maxExactInt = 1 << 53

type rangeCond struct {
	op  string // SQL comparison operator
	arg any
}

// fieldCond is what the filter says about one top-level field, in pushable terms.
type fieldCond struct {
	tags   []string // the only types a matching value can have
	eq     []any    // equality (one value) or $in (several); empty if none
	ranges []rangeCond
}

// sqlImage returns the types a value compares equal/ordered with, and its SQL image.
func sqlImage(v any, equality bool) ([]string, any, bool) {
	switch v := v.(type) {
	case string:
		return []string{"string"}, v, true
	case types.ObjectID:
		return []string{"objectId"}, hex.EncodeToString(v[:]), true
	case time.Time:
		return []string{"date"}, v.UnixMilli(), true
	case bool:
		if !equality {
			return nil, nil, false
		}

		if v {
			return []string{"bool"}, int64(1), true
		}

		return []string{"bool"}, int64(0), true
	case int32:
		return numeric, int64(v), true
	case int64:
		if v <= -maxExactInt || v >= maxExactInt {
			return nil, nil, false
		}

		return numeric, v, true
	case float64:
		if math.IsNaN(v) || v <= -maxExactInt || v >= maxExactInt {
			return nil, nil, false
		}

		return numeric, v, true
	default:
		return nil, nil, false
	}
}

// isPlainField reports whether a filter key is a top-level field a typed index can hold.
func isPlainField(k string) bool {
	if k == "" || strings.HasPrefix(k, "$") {
		return false
	}

	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_') {
			return false
		}
	}

	return true
}

// intersect narrows the allowed types; an empty result means nothing can match.
func intersect(a, b []string) []string {
	if a == nil {
		return slices.Clone(b)
	}

	var res []string

	for _, t := range a {
		if slices.Contains(b, t) {
			res = append(res, t)
		}
	}

	return res
}

// collectConds extracts the pushable conditions of a filter, by field.
func collectConds(filter *types.Document) map[string]*fieldCond {
	res := map[string]*fieldCond{}

	for _, k := range filter.Keys() {
		if !isPlainField(k) {
			continue
		}

		v := must.NotFail(filter.Get(k))
		c := new(fieldCond)
		ok := false

		ops, isDoc := v.(*types.Document)
		if !isDoc {
			tags, arg, pushable := sqlImage(v, true)
			if !pushable {
				continue
			}

			c.tags, c.eq, ok = tags, []any{arg}, true
		} else {
			if ops.Len() == 0 || !strings.HasPrefix(ops.Keys()[0], "$") {
				continue // equality with a document
			}

			for _, op := range ops.Keys() {
				ov := must.NotFail(ops.Get(op))

				switch op {
				case "$eq":
					tags, arg, pushable := sqlImage(ov, true)
					if !pushable || len(c.eq) > 0 {
						continue
					}

					c.tags, c.eq, ok = intersect(c.tags, tags), []any{arg}, true
				case "$in":
					arr, isArr := ov.(*types.Array)
					if !isArr || arr.Len() == 0 || len(c.eq) > 0 {
						continue
					}

					var inTags []string
					var args []any
					pushable := true

					for i := 0; i < arr.Len(); i++ {
						tags, arg, p := sqlImage(must.NotFail(arr.Get(i)), true)
						if !p || (inTags != nil && !slices.Equal(tags, inTags)) {
							pushable = false
							break
						}

						inTags = tags
						args = append(args, arg)
					}

					if !pushable {
						continue
					}

					c.tags, c.eq, ok = intersect(c.tags, inTags), args, true
				case "$gt", "$gte", "$lt", "$lte":
					tags, arg, pushable := sqlImage(ov, false)
					if !pushable {
						continue
					}

					sqlOp := map[string]string{"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}[op]
					c.tags, ok = intersect(c.tags, tags), true
					c.ranges = append(c.ranges, rangeCond{op: sqlOp, arg: arg})
				}
			}
		}

		if ok && len(c.tags) > 0 {
			res[k] = c
		}
	}

	return res
}

// pushdownPlan is a WHERE clause (with its arguments) and, if sorted, an ORDER BY clause.
type pushdownPlan struct {
	where   []string
	args    []any
	orderBy string
	sorted  bool
	columns int // index columns used (pushed conditions and sort)
	index   string
	from    string // for a multikey index: the FROM clause joining its side table, else ""
}

// selectFrom returns the SELECT of a multikey plan: the documents of the joined table, with
// the query's comment spelled as prepareSelectClause spells it.
func (p *pushdownPlan) selectFrom(comment string) string {
	if comment != "" {
		comment = strings.ReplaceAll(comment, "/*", "/ *")
		comment = strings.ReplaceAll(comment, "*/", "* /")
		comment = `/* ` + comment + ` */`
	}

	return fmt.Sprintf(`SELECT %s e.%s`, comment, metadata.DefaultColumn) + p.from
}

func (p *pushdownPlan) add(cond string, args ...any) {
	p.where = append(p.where, cond)
	p.args = append(p.args, args...)
}

// addRanges adds the range conditions on the SQL value expression val.
func (p *pushdownPlan) addRanges(val string, ranges []rangeCond) {
	for _, r := range ranges {
		p.add(fmt.Sprintf("%s %s ?", val, r.op), r.arg)
	}
}

// sortBy orders the rows by the SQL value expression val: the plan is sorted.
func (p *pushdownPlan) sortBy(val string, desc bool) {
	p.orderBy = " ORDER BY " + val
	if desc {
		p.orderBy += " DESC"
	}

	p.sorted = true
}

func (p *pushdownPlan) whereClause() string {
	if len(p.where) == 0 {
		return ""
	}

	return " WHERE " + strings.Join(p.where, " AND ")
}

func placeholders(n int) string {
	return strings.TrimSuffix(strings.Repeat("?, ", n), ", ")
}

func stringArgs(ss []string) []any {
	res := make([]any, len(ss))
	for i, s := range ss {
		res[i] = s
	}

	return res
}

// planIndex plans a query on one typed index; the index lookups it makes are the array and
// type-homogeneity checks described in the file comment.
//
// arrays memoizes the array checks of one query: indexes that share a prefix ask the same.
func planIndex(ctx context.Context, db *fsql.DB, table string, index metadata.IndexInfo, conds map[string]*fieldCond, sortField string, sortDesc bool, arrays map[string]bool) (*pushdownPlan, error) { //nolint:lll // for readability
	p := &pushdownPlan{index: index.Name}
	pinned := true // every column so far is fixed to one (type, value): the next one is ordered

	hasArrays := func(tag string) (bool, error) {
		q := fmt.Sprintf(`SELECT EXISTS (SELECT 1 FROM %q%s%s %s = 'array')`, table, p.whereClause(), and(p), tag)
		key := q + fmt.Sprintf("%#v", p.args)

		if found, ok := arrays[key]; ok {
			return found, nil
		}

		var found bool
		if err := db.QueryRowContext(ctx, q, p.args...).Scan(&found); err != nil {
			return false, lazyerrors.Error(err)
		}

		arrays[key] = found

		return found, nil
	}

	for _, key := range index.Key {
		f := key.Field
		tag, val := metadata.TypedTagExpr(f), metadata.TypedValueExpr(f)
		c := conds[f]

		if c != nil && len(c.eq) > 0 {
			arrays, err := hasArrays(tag)
			if err != nil || arrays {
				return p, err
			}

			p.add(fmt.Sprintf("%s IN (%s)", tag, placeholders(len(c.tags))), stringArgs(c.tags)...)
			p.add(fmt.Sprintf("%s IN (%s)", val, placeholders(len(c.eq))), c.eq...)
			pinned = pinned && len(c.tags) == 1 && len(c.eq) == 1
			p.columns++

			continue
		}

		// Ranges and/or the sort on this column; pushdown ends here.
		if f == sortField && pinned {
			q := fmt.Sprintf(
				`SELECT (SELECT %[3]s FROM %[1]q%[2]s ORDER BY %[3]s LIMIT 1), (SELECT %[3]s FROM %[1]q%[2]s ORDER BY %[3]s DESC LIMIT 1)`,
				table, p.whereClause(), tag,
			)

			var first, last *string
			if err := db.QueryRowContext(ctx, q, append(slices.Clone(p.args), p.args...)...).Scan(&first, &last); err != nil {
				return nil, lazyerrors.Error(err)
			}

			if first != nil && last != nil && *first == *last && slices.Contains(sortableTags, *first) {
				p.add(tag+" = ?", *first)

				if c != nil && slices.Contains(c.tags, *first) {
					p.addRanges(val, c.ranges)
				}

				p.sortBy(val, sortDesc)
				p.columns++

				return p, nil
			}
		}

		if c != nil && len(c.ranges) > 0 {
			arrays, err := hasArrays(tag)
			if err != nil || arrays {
				return p, err
			}

			p.add(fmt.Sprintf("%s IN (%s)", tag, placeholders(len(c.tags))), stringArgs(c.tags)...)

			p.addRanges(val, c.ranges)

			p.columns++
		}

		return p, nil
	}

	return p, nil
}

// planMultikey plans a query on a multikey index's side table (metadata/multikey_index.go),
// joined to the collection's table. A document has one side row per element of each key
// field, so the plan must select at most one row per document: every key column but the last
// is pinned by an equality to one value of one type (an element equal to it, whether alone or
// in an array, matches, as in MongoDB; the side table holds equal elements once), and the
// last is pinned the same way or, after two index lookups showed that every candidate row
// holds one scalar type there (no array elements, nothing missing: the last column's type
// names say "array:" for elements), carries the ranges and the sort. Otherwise it returns nil.
func planMultikey(ctx context.Context, db *fsql.DB, table string, index metadata.IndexInfo, conds map[string]*fieldCond, sortField string, sortDesc bool) (*pushdownPlan, error) { //nolint:lll // for readability
	side := metadata.MultikeySideTable(table + "_" + index.Name)
	p := &pushdownPlan{
		index: index.Name,
		from:  fmt.Sprintf(` FROM %q AS s JOIN %q AS e ON e.rowid = s.doc`, side, table),
	}

	for i, key := range index.Key {
		c := conds[key.Field]
		tag, val := fmt.Sprintf("s.t%d", i), fmt.Sprintf("s.v%d", i)

		if c != nil && len(c.eq) == 1 && len(c.tags) == 1 {
			if i < len(index.Key)-1 {
				p.add(tag+" = ?", c.tags[0])
			} else {
				p.add(tag+" IN (?, ?)", c.tags[0], "array:"+c.tags[0]) // metadata/multikey_index.go
			}

			p.add(val+" = ?", c.eq[0])
			p.columns++

			continue
		}

		if i < len(index.Key)-1 {
			return nil, nil
		}

		q := fmt.Sprintf(
			`SELECT (SELECT %[3]s FROM %[1]q AS s%[2]s ORDER BY %[3]s LIMIT 1), (SELECT %[3]s FROM %[1]q AS s%[2]s ORDER BY %[3]s DESC LIMIT 1)`,
			side, p.whereClause(), tag,
		)

		var first, last *string
		if err := db.QueryRowContext(ctx, q, append(slices.Clone(p.args), p.args...)...).Scan(&first, &last); err != nil {
			return nil, lazyerrors.Error(err)
		}

		if first == nil || last == nil || *first != *last || !slices.Contains(sortableTags, *first) {
			return nil, nil
		}

		p.add(tag+" = ?", *first)

		if c != nil && slices.Contains(c.tags, *first) {
			p.addRanges(val, c.ranges)
		}

		if key.Field == sortField {
			p.sortBy(val, sortDesc)
		}

		p.columns++
	}

	return p, nil
}

// and returns the word that joins one more condition to p's WHERE clause.
func and(p *pushdownPlan) string {
	if len(p.where) == 0 {
		return " WHERE"
	}

	return " AND"
}

// idPlan pushes a top-level _id equality or $in of strings/ObjectIds onto the unique _id index
// (upstream's spelling, metadata.IDColumn): _id is unique and never an array, so at most the
// listed documents are read. Returns nil if the filter has no such condition.
func idPlan(filter *types.Document) *pushdownPlan {
	v, err := filter.Get("_id")
	if err != nil {
		return nil
	}

	var ids []any

	switch v := v.(type) {
	case string, types.ObjectID:
		ids = []any{v}
	case *types.Document:
		if v.Len() != 1 {
			return nil
		}

		arr, ok := must.NotFail(v.Get(v.Keys()[0])).(*types.Array)
		if v.Keys()[0] != "$in" || !ok || arr.Len() == 0 {
			return nil
		}

		for i := 0; i < arr.Len(); i++ {
			id := must.NotFail(arr.Get(i))
			switch id.(type) {
			case string, types.ObjectID:
				ids = append(ids, id)
			default:
				return nil
			}
		}
	default:
		return nil
	}

	p := &pushdownPlan{index: "_id_", columns: 1}
	args := make([]any, len(ids))

	for i, id := range ids {
		args[i] = string(must.NotFail(sjson.MarshalSingleValue(id)))
	}

	p.add(fmt.Sprintf("%s IN (%s)", metadata.IDColumn, placeholders(len(ids))), args...)

	return p
}

// planPushdown returns the best plan for the filter and one-field sort, or nil to run the
// query as upstream does.
func planPushdown(ctx context.Context, db *fsql.DB, meta *metadata.Collection, filter, sort *types.Document) (*pushdownPlan, error) { //nolint:lll // for readability
	if !indexPushdownEnabled || meta.Capped() {
		return nil, nil
	}

	var sortField string
	var sortDesc bool

	// The handler passes a validated sort: values are int64 1 or -1.
	if sort.Len() == 1 && isPlainField(sort.Keys()[0]) {
		switch must.NotFail(sort.Get(sort.Keys()[0])) {
		case int64(1):
			sortField = sort.Keys()[0]
		case int64(-1):
			sortField, sortDesc = sort.Keys()[0], true
		}
	}

	var best *pushdownPlan

	if filter.Len() > 0 {
		best = idPlan(filter)
	}

	conds := map[string]*fieldCond{}
	if filter.Len() > 0 {
		conds = collectConds(filter)
	}

	if best != nil && sortField == "" {
		return best, nil // one or a few documents by _id: nothing is cheaper
	}

	arrays := map[string]bool{}

	for _, index := range meta.Settings.Indexes {
		if !index.Typed && !index.Multikey {
			continue
		}

		first := index.Key[0].Field
		if conds[first] == nil && first != sortField {
			continue
		}

		var p *pushdownPlan
		var err error

		if index.Multikey {
			p, err = planMultikey(ctx, db, meta.TableName, index, conds, sortField, sortDesc)
		} else {
			p, err = planIndex(ctx, db, meta.TableName, index, conds, sortField, sortDesc, arrays)
		}

		if err != nil {
			return nil, err
		}

		if p == nil {
			continue
		}

		switch {
		case best == nil:
			best = p
		case p.sorted != best.sorted:
			if p.sorted && best.index != "_id_" {
				best = p
			}
		case p.columns > best.columns:
			best = p
		}
	}

	if best == nil || (len(best.where) == 0 && !best.sorted) {
		return nil, nil
	}

	return best, nil
}
