// Local addition to FerretDB 1.24 (copied by scripts/build_ferretdb.sh to
// internal/backends/sqlite/metadata/multikey_index.go): multikey indexes as side tables.
//
// A typed index (typed_index.go) holds one SQL value per document and field, so an array field
// cannot be searched by element; the planner stops at any field that holds an array. MongoDB
// indexes every element of an array (a "multikey" index). Here an index whose name ends in
// MultikeySuffix is kept instead as a side table with one row per combination of its key
// fields' elements (a scalar field is one element, a missing one a single NULL row):
//
//	doc              the document's rowid in the collection's table
//	t0, v0, t1, ...  per key field: the element's BSON type name and SQL value, in the typed
//	                 index's spelling; in the last key field, an element of an array has the
//	                 type "array:<type>", so that the planner's type check of the column it
//	                 sorts on tells arrays from scalars (the other columns keep one type name
//	                 for a value alone and in an array, so that an equality on them is one
//	                 index range and the rows after it stay in index order)
//
// with a unique index on (t0, v0, t1, v1, ..., doc), which also orders the rows as a typed
// index orders documents, and an index on doc. Three triggers on the collection's table keep
// it: after an insert, after an update that changes a key field's JSON (`WHEN`: an update of
// other fields, such as every state change of an email, costs two JSON extracts per field, not
// a rewrite of its rows), and after a delete. The triggers run inside the statement that
// writes the document, so the side table never disagrees with the table.
//
// The planner (pushdown.go, planMultikey) joins the side table to the collection's table.
package metadata

import (
	"fmt"
	"strings"
)

// MultikeySuffix ends the name of every index kept as a side table. MongoDB has no option to
// ask for a multikey index (any index becomes one when an array is stored), so the name says
// it; on MongoDB the same index is an ordinary one.
const MultikeySuffix = "_multikey"

// IsMultikeyIndex reports whether index is created as a side table.
func IsMultikeyIndex(index IndexInfo) bool {
	return strings.HasSuffix(index.Name, MultikeySuffix) && IsTypedIndexable(index)
}

// MultikeySideTable returns the side table of the index whose SQL name is sqlIndexName.
func MultikeySideTable(sqlIndexName string) string {
	return sqlIndexName + "_side"
}

// multikeyTriggers are the suffixes of the side table's triggers.
var multikeyTriggers = []string{"_ai", "_au", "_ad"}

// multikeyRows returns a SELECT of the side rows of a document: rowid is its rowid, doc its
// document (text or JSONB), from the FROM clause that provides both; then a cross join of one
// json_each per key field, each LEFT JOINed so that a missing field still gives its one NULL
// row.
func multikeyRows(rowid, doc, from string, keys []IndexKeyPair) string {
	cols := []string{rowid}

	for i, k := range keys {
		path := fieldPath(k.Field)
		elem := fmt.Sprintf("j%d", i)

		marker := ""
		if i == len(keys)-1 {
			marker = `'array:' || `
		}

		// An array's elements have their types in the schema's items, by position; any other
		// value (an object's members included) has the field's own type.
		tag := fmt.Sprintf(
			`CASE json_type(%[1]s, %[2]s) WHEN 'array' THEN %[5]sjson_extract(%[1]s, '$."$s".p."%[3]s".i[' || %[4]s.key || '].t') ELSE %[6]s END`,
			doc, path, k.Field, elem, marker, typedTagOf(doc, k.Field),
		)
		cols = append(cols, tag, elem+".value")
		from += fmt.Sprintf(" LEFT JOIN json_each(%s, %s) AS %s", doc, path, elem)
	}

	return "SELECT " + strings.Join(cols, ", ") + from
}

// newRows returns the SELECT of the side rows of the document a trigger wrote (`new`). Every
// JSON function over a text argument parses the whole document, and the rows' expressions
// call about four per key field; so the document is converted to SQLite's binary JSON once
// (the LIMIT keeps SQLite from substituting the expression into each use) and read from that.
func newRows(keys []IndexKeyPair) string {
	from := fmt.Sprintf(" FROM (SELECT jsonb(new.%s) AS b LIMIT 1) AS d", DefaultColumn)
	return multikeyRows("new.rowid", "d.b", from, keys)
}

// MultikeyCreate returns the statements that create the side table of the index (SQL name
// sqlIndexName) on table, its indexes and triggers, and fill it from the table's documents.
func MultikeyCreate(table, sqlIndexName string, keys []IndexKeyPair) []string {
	side := MultikeySideTable(sqlIndexName)

	cols := make([]string, 0, 2*len(keys))
	for i := range keys {
		cols = append(cols, fmt.Sprintf("t%d", i), fmt.Sprintf("v%d", i))
	}

	all := strings.Join(cols, ", ")

	// The update trigger runs only when a key field changed: one json_extract of all key
	// fields from each side (two parses of the document, not two per field; with one field
	// it returns the value itself, which compares as well).
	paths := make([]string, len(keys))
	for i, k := range keys {
		paths[i] = fieldPath(k.Field)
	}

	keyFields := strings.Join(paths, ", ")
	changed := fmt.Sprintf(
		"json_extract(old.%[1]s, %[2]s) IS NOT json_extract(new.%[1]s, %[2]s)", DefaultColumn, keyFields,
	)

	backfill := multikeyRows("e.rowid", "e."+DefaultColumn, fmt.Sprintf(" FROM %q AS e", table), keys)

	return []string{
		fmt.Sprintf("CREATE TABLE %q (doc INTEGER NOT NULL, %s)", side, all),
		fmt.Sprintf("CREATE UNIQUE INDEX %q ON %q (%s, doc)", side+"_key", side, all),
		fmt.Sprintf("CREATE INDEX %q ON %q (doc)", side+"_doc", side),
		fmt.Sprintf("INSERT OR IGNORE INTO %q (doc, %s) %s", side, all, backfill),
		fmt.Sprintf("CREATE TRIGGER %q AFTER INSERT ON %q BEGIN INSERT OR IGNORE INTO %q (doc, %s) %s; END",
			side+multikeyTriggers[0], table, side, all, newRows(keys)),
		fmt.Sprintf("CREATE TRIGGER %q AFTER UPDATE ON %q WHEN %s BEGIN DELETE FROM %q WHERE doc = old.rowid; INSERT OR IGNORE INTO %q (doc, %s) %s; END",
			side+multikeyTriggers[1], table, changed, side, side, all, newRows(keys)),
		fmt.Sprintf("CREATE TRIGGER %q AFTER DELETE ON %q BEGIN DELETE FROM %q WHERE doc = old.rowid; END",
			side+multikeyTriggers[2], table, side),
	}
}

// MultikeyDrop returns the statements that remove the side table of the index and its
// triggers (its indexes go with it).
func MultikeyDrop(sqlIndexName string) []string {
	side := MultikeySideTable(sqlIndexName)
	qs := make([]string, 0, len(multikeyTriggers)+1)

	for _, t := range multikeyTriggers {
		qs = append(qs, fmt.Sprintf("DROP TRIGGER IF EXISTS %q", side+t))
	}

	return append(qs, fmt.Sprintf("DROP TABLE IF EXISTS %q", side))
}
