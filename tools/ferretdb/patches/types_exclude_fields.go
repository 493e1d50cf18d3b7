// Local addition to FerretDB 1.24 (copied by scripts/build_ferretdb.sh to
// internal/types/azora_exclude_fields.go): a document without some top-level fields, built
// without copying its values. Used by the exclusion projection's fast path
// (internal/handler/common/exclusion_projection.go).
package types

// WithoutTopLevelFields returns a new document holding d's fields in order except "_id" and
// the keys in excluded, with "_id" first when keepID is set: the document upstream's
// ProjectDocument builds for an exclusion projection of plain top-level fields. Its values are
// d's own (upstream deep-copies them twice), so the caller must own d and not change it or
// the result afterwards; the record id is kept. ok is false, and nothing is built, when d has
// a duplicated key or keepID is set and d has no "_id": upstream's code then decides.
func (d *Document) WithoutTopLevelFields(excluded map[string]struct{}, keepID bool) (*Document, bool) {
	if len(d.keys) != len(d.fields) {
		return nil, false
	}

	out := &Document{
		keys:     make(map[string]int, len(d.fields)),
		fields:   make([]field, 0, len(d.fields)),
		recordID: d.recordID,
	}

	if keepID {
		if d.keys["_id"] == 0 {
			return nil, false
		}

		for _, f := range d.fields {
			if f.key == "_id" {
				out.keys[f.key] = 1
				out.fields = append(out.fields, f)

				break
			}
		}
	}

	for _, f := range d.fields {
		if f.key == "_id" {
			continue
		}

		if _, drop := excluded[f.key]; drop {
			continue
		}

		out.keys[f.key] = 1
		out.fields = append(out.fields, f)
	}

	return out, true
}
