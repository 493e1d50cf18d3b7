// Local addition to FerretDB 1.24 (copied by scripts/build_ferretdb.sh to
// internal/backends/sqlite/metadata/typed_index.go): the SQL spelling of "typed" indexes.
//
// Upstream indexes a field as `_ferretdb_sjson->"f"`: the field's JSON text. That key cannot
// serve Mongo comparisons: numbers compare as text ('10' < '9'), strings compare with their
// JSON escapes ('<' is stored as \u003c), and a string and an ObjectId, or an int and a date,
// are indistinguishable. A typed index stores two columns per key field instead:
//
//	tag:   _ferretdb_sjson->>'$."$s".p."f".t'  the BSON type name from the sjson schema
//	                                            ("string", "date", "array", ...; NULL if missing)
//	value: _ferretdb_sjson->>'$."f"'           the SQL value: TEXT for strings and ObjectIds
//	                                            (lower-case hex), INTEGER for ints, longs, dates
//	                                            (Unix ms) and bools, REAL for doubles
//
// Within one tag, SQLite's order of the value is MongoDB's order for that type (binary UTF-8
// for strings, numeric for numbers and dates, byte order for ObjectIds). The query planner
// (internal/backends/sqlite/pushdown.go) builds its WHERE clauses with the same functions,
// because SQLite uses an expression index only for the identical spelling.
package metadata

import "fmt"

// isTypedIndexField reports whether a field name can be a key of a typed index: a top-level
// field whose name needs no quoting in a JSON path (dotted paths and arrays of documents are
// left to upstream's form).
func isTypedIndexField(f string) bool {
	if f == "" {
		return false
	}

	for _, r := range f {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_':
		default:
			return false
		}
	}

	return true
}

// IsTypedIndexable reports whether an index is created in the typed form: non-unique (unique
// indexes, _id_ included, keep upstream's form so that their duplicate rules are unchanged)
// with top-level field names only.
func IsTypedIndexable(index IndexInfo) bool {
	if index.Unique || index.Name == "_id_" || len(index.Key) == 0 {
		return false
	}

	for _, k := range index.Key {
		if !isTypedIndexField(k.Field) {
			return false
		}
	}

	return true
}

// TypedTagExpr returns the SQL expression of the BSON type name of top-level field f.
func TypedTagExpr(f string) string {
	return typedTagOf(DefaultColumn, f)
}

// TypedValueExpr returns the SQL expression of the value of top-level field f.
func TypedValueExpr(f string) string {
	return DefaultColumn + "->>" + fieldPath(f)
}

// typedTagOf returns the SQL expression of the BSON type name of top-level field f of the
// document expression doc (a row's column, a trigger's `new` one, a JSONB value).
func typedTagOf(doc, f string) string {
	return fmt.Sprintf(`%s->>'$."$s".p."%s".t'`, doc, f)
}

// fieldPath returns the JSON path literal of top-level field f.
func fieldPath(f string) string {
	return fmt.Sprintf(`'$."%s"'`, f)
}
