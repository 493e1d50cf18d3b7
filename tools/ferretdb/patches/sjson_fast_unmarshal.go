// Local change (azora): a one-pass decoder for stored sjson documents.
//
// Upstream's Unmarshal decodes a stored document with encoding/json in layers: the whole text
// into map[string]json.RawMessage, the schema with reflection, then every field again through a
// new json.Decoder of its own (nested documents and arrays once more per level). Reading rows
// is most of what a find, an update or a delete costs on the SQLite backend, and that decoding
// was most of reading (FerretDB's own CPU profile under a page of 20 stored emails).
//
// unmarshalFast walks the text once, schema first, and builds the same *types.Document. It is
// strict: anything it is not sure to decode exactly as upstream does (a key order other than
// the schema's, duplicate keys, a string with an escape it does not handle, invalid UTF-8, a
// number upstream would refuse, trailing data, an unknown schema field) makes it decline, and
// Unmarshal then runs upstream's decoder, which returns upstream's result or error. So the fast
// path only ever returns what upstream returns for the same bytes.
//
// Documents of one shape share their schema text, so parsed schemas are kept by their text
// (schemaCache) and a row whose schema was seen before only skips over it.
//
// FERRETDB_SJSON_FAST_DECODE=off decodes every document as upstream does (the project's tests
// compare the two on a corpus of every BSON type).

package sjson

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"strconv"
	"sync"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/FerretDB/FerretDB/internal/types"
)

// fastDecode is false when FERRETDB_SJSON_FAST_DECODE=off.
var fastDecode = os.Getenv("FERRETDB_SJSON_FAST_DECODE") != "off"

// errDecline means "let upstream's decoder do it"; it never reaches a caller.
var errDecline = errors.New("sjson: fast decoder declined")

// schemaCache holds parsed schemas by their exact text. A parsed schema is never modified, so
// one value serves every goroutine. Emptied when full (shapes are few; this bounds memory).
var schemaCache = struct {
	sync.RWMutex
	byText map[string]*schema
}{byText: make(map[string]*schema)}

// schemaCacheMax bounds the number of cached schemas.
const schemaCacheMax = 2048

// fastDecoder reads one sjson text from start to end.
type fastDecoder struct {
	data []byte
	pos  int
}

// unmarshalFast decodes a top-level sjson document, or says it declined.
func unmarshalFast(data []byte) (*types.Document, bool) {
	dec := fastDecoder{data: data}
	doc, err := dec.topLevel()

	if err != nil {
		return nil, false
	}

	return doc, true
}

// fieldList holds a document's keys and values in order (types.ConvertDocument's input).
type fieldList struct {
	keys   []string
	values []any
}

// Keys implements the interface types.ConvertDocument reads.
func (f *fieldList) Keys() []string { return f.keys }

// Values implements the interface types.ConvertDocument reads.
func (f *fieldList) Values() []any { return f.values }

func (d *fastDecoder) topLevel() (*types.Document, error) {
	if err := d.expect('{'); err != nil {
		return nil, err
	}

	// Upstream's Marshal writes the schema first; any other order goes to upstream.
	key, err := d.key()
	if err != nil || key != "$s" {
		return nil, errDecline
	}

	sch, err := d.cachedSchema()
	if err != nil {
		return nil, err
	}

	fields, err := d.members(sch, true)
	if err != nil {
		return nil, err
	}

	d.skipSpace()

	if d.pos != len(d.data) {
		return nil, errDecline
	}

	if len(fields.keys) == 0 {
		return orDecline(types.NewDocument())
	}

	return orDecline(types.ConvertDocument(fields))
}

// orDecline turns a constructor's error into a decline.
func orDecline(doc *types.Document, err error) (*types.Document, error) {
	if err != nil {
		return nil, errDecline
	}

	return doc, nil
}

// members reads the rest of an object whose '{' was read (after "$s" at the top level: then
// afterFirst is true and a ',' or '}' comes next), in the schema's key order.
func (d *fastDecoder) members(sch *schema, afterFirst bool) (*fieldList, error) {
	n := 0
	if sch != nil {
		n = len(sch.Keys)
	}

	fields := &fieldList{keys: make([]string, 0, n), values: make([]any, 0, n)}

	d.skipSpace()

	if d.peek() == '}' {
		d.pos++
		if n != 0 {
			return nil, errDecline
		}

		return fields, nil
	}

	for i := 0; ; i++ {
		if afterFirst || i > 0 {
			if err := d.expect(','); err != nil {
				return nil, err
			}
		}

		key, err := d.key()
		if err != nil {
			return nil, err
		}

		if sch == nil || i >= n || sch.Keys[i] != key {
			return nil, errDecline
		}

		value, err := d.value(sch.Properties[key])
		if err != nil {
			return nil, err
		}

		fields.keys = append(fields.keys, key)
		fields.values = append(fields.values, value)

		d.skipSpace()

		if d.peek() == '}' {
			d.pos++
			break
		}
	}

	if len(fields.keys) != n {
		return nil, errDecline
	}

	return fields, nil
}

// value reads one value of the given schema element.
func (d *fastDecoder) value(sch *elem) (any, error) {
	d.skipSpace()

	if d.literal("null") {
		return types.Null, nil
	}

	if sch == nil {
		return nil, errDecline
	}

	switch sch.Type {
	case elemTypeObject:
		// Upstream refuses an object without a schema, even an empty one.
		if sch.Schema == nil {
			return nil, errDecline
		}

		if err := d.expect('{'); err != nil {
			return nil, err
		}

		fields, err := d.members(sch.Schema, false)
		if err != nil {
			return nil, err
		}

		if len(fields.keys) == 0 {
			return new(types.Document), nil
		}

		return orDecline(types.ConvertDocument(fields))

	case elemTypeArray:
		// Upstream refuses an array without item schemas, even an empty one ("i": [] is
		// what its Marshal writes for an empty array).
		if sch.Items == nil {
			return nil, errDecline
		}

		return d.array(sch.Items)

	case elemTypeDouble:
		raw, err := d.number()
		if err != nil {
			return nil, err
		}

		f, err := strconv.ParseFloat(raw, 64)
		if err != nil {
			return nil, errDecline
		}

		return f, nil

	case elemTypeString:
		return d.string()

	case elemTypeBinData:
		s, err := d.string()
		if err != nil || sch.Subtype == nil {
			return nil, errDecline
		}

		b, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, errDecline
		}

		return types.Binary{B: b, Subtype: *sch.Subtype}, nil

	case elemTypeObjectID:
		s, err := d.string()
		if err != nil {
			return nil, err
		}

		b, err := hex.DecodeString(s)
		if err != nil || len(b) != types.ObjectIDLen {
			return nil, errDecline
		}

		var id types.ObjectID
		copy(id[:], b)

		return id, nil

	case elemTypeBool:
		switch {
		case d.literal("true"):
			return true, nil
		case d.literal("false"):
			return false, nil
		}

		return nil, errDecline

	case elemTypeDate:
		ms, err := d.integer(64)
		if err != nil {
			return nil, err
		}

		return time.UnixMilli(ms), nil

	case elemTypeRegex:
		s, err := d.string()
		if err != nil || sch.Options == nil {
			return nil, errDecline
		}

		return types.Regex{Pattern: s, Options: *sch.Options}, nil

	case elemTypeInt:
		i, err := d.integer(32)
		if err != nil {
			return nil, err
		}

		return int32(i), nil

	case elemTypeTimestamp:
		raw, err := d.number()
		if err != nil {
			return nil, err
		}

		u, err := strconv.ParseUint(raw, 10, 64)
		if err != nil {
			return nil, errDecline
		}

		return types.Timestamp(u), nil

	case elemTypeLong:
		return d.integer(64)
	}

	return nil, errDecline
}

// array reads an array whose items have the given schemas, one each.
func (d *fastDecoder) array(items []*elem) (any, error) {
	if err := d.expect('['); err != nil {
		return nil, err
	}

	a := types.MakeArray(len(items))

	d.skipSpace()

	if d.peek() == ']' {
		d.pos++
		if len(items) != 0 {
			return nil, errDecline
		}

		return a, nil
	}

	for i := 0; ; i++ {
		if i > 0 {
			if err := d.expect(','); err != nil {
				return nil, err
			}
		}

		if i >= len(items) {
			return nil, errDecline
		}

		v, err := d.value(items[i])
		if err != nil {
			return nil, err
		}

		a.Append(v)

		d.skipSpace()

		if d.peek() == ']' {
			d.pos++
			break
		}
	}

	if a.Len() != len(items) {
		return nil, errDecline
	}

	return a, nil
}

// cachedSchema reads the top-level schema, parsing its text only the first time it is seen.
func (d *fastDecoder) cachedSchema() (*schema, error) {
	d.skipSpace()
	start := d.pos

	if !d.skipObject() {
		return nil, errDecline
	}

	end := d.pos
	text := d.data[start:end]

	schemaCache.RLock()
	sch := schemaCache.byText[string(text)]
	schemaCache.RUnlock()

	if sch != nil {
		return sch, nil
	}

	d.pos = start

	sch, err := d.schema()
	if err != nil || d.pos != end {
		return nil, errDecline
	}

	schemaCache.Lock()
	if len(schemaCache.byText) >= schemaCacheMax {
		schemaCache.byText = make(map[string]*schema)
	}
	schemaCache.byText[string(text)] = sch
	schemaCache.Unlock()

	return sch, nil
}

// skipObject moves past one JSON object (strings and nesting respected, nothing validated:
// a text is parsed, and so validated, before it is cached).
func (d *fastDecoder) skipObject() bool {
	if d.peek() != '{' {
		return false
	}

	depth := 0

	for d.pos < len(d.data) {
		switch d.data[d.pos] {
		case '"':
			for d.pos++; d.pos < len(d.data) && d.data[d.pos] != '"'; d.pos++ {
				if d.data[d.pos] == '\\' {
					d.pos++
				}
			}
		case '{', '[':
			depth++
		case '}', ']':
			depth--

			if depth == 0 {
				d.pos++
				return true
			}
		}

		d.pos++
	}

	return false
}

// each reads the items of a JSON array or object: open, items separated by commas, close.
// item reads one item (for an object: its key, the colon and the value). Used for schemas,
// which are parsed once per shape; the values' own loops (members, array) are written out.
func (d *fastDecoder) each(open, closing byte, item func() error) error {
	if err := d.expect(open); err != nil {
		return err
	}

	for i := 0; ; i++ {
		d.skipSpace()

		if d.peek() == closing {
			d.pos++
			return nil
		}

		if i > 0 {
			if err := d.expect(','); err != nil {
				return err
			}
		}

		if err := item(); err != nil {
			return err
		}
	}
}

// schema reads a document schema: {"$k": [keys], "p": {key: elem}} in any order.
func (d *fastDecoder) schema() (*schema, error) {
	sch := new(schema)
	seenKeys, seenProps := false, false

	err := d.each('{', '}', func() error {
		key, err := d.key()
		if err != nil {
			return err
		}

		switch {
		case key == "$k" && !seenKeys:
			seenKeys = true
			sch.Keys, err = d.stringList()
		case key == "p" && !seenProps:
			seenProps = true
			sch.Properties, err = d.properties()
		default:
			err = errDecline
		}

		return err
	})
	if err != nil {
		return nil, err
	}

	return sch, nil
}

// properties reads the "p" object of a schema.
func (d *fastDecoder) properties() (map[string]*elem, error) {
	d.skipSpace()

	if d.literal("null") {
		return nil, nil
	}

	props := make(map[string]*elem)

	err := d.each('{', '}', func() error {
		key, err := d.key()
		if err != nil {
			return err
		}

		if _, dup := props[key]; dup {
			return errDecline
		}

		props[key], err = d.element()

		return err
	})
	if err != nil {
		return nil, err
	}

	return props, nil
}

// element reads one schema element: {"t": type, "$s": schema, "o": options, "i": [elems],
// "s": subtype}, fields in any order; a null leaves its field unset, as encoding/json does.
func (d *fastDecoder) element() (*elem, error) {
	d.skipSpace()

	if d.literal("null") {
		return nil, nil
	}

	e := new(elem)
	seen := map[string]bool{}

	err := d.each('{', '}', func() error {
		key, err := d.key()
		if err != nil {
			return err
		}

		switch key {
		case "t", "$s", "o", "i", "s":
		default:
			return errDecline
		}

		if seen[key] {
			return errDecline
		}

		seen[key] = true

		d.skipSpace()

		if d.literal("null") {
			return nil
		}

		switch key {
		case "t":
			var s string
			s, err = d.string()
			e.Type = elemType(s)
		case "$s":
			e.Schema, err = d.schema()
		case "o":
			var s string
			if s, err = d.string(); err == nil {
				e.Options = &s
			}
		case "i":
			e.Items, err = d.elementList()
		case "s":
			var raw string
			if raw, err = d.number(); err != nil {
				return err
			}

			n, perr := strconv.ParseUint(raw, 10, 8)
			if perr != nil {
				return errDecline
			}

			subtype := types.BinarySubtype(n)
			e.Subtype = &subtype
		}

		return err
	})
	if err != nil {
		return nil, err
	}

	return e, nil
}

// elementList reads the "i" array of an array's schema ([] gives an empty, non-nil list).
func (d *fastDecoder) elementList() ([]*elem, error) {
	list := []*elem{}

	err := d.each('[', ']', func() error {
		e, err := d.element()
		list = append(list, e)

		return err
	})
	if err != nil {
		return nil, err
	}

	return list, nil
}

// stringList reads the "$k" array of a schema.
func (d *fastDecoder) stringList() ([]string, error) {
	d.skipSpace()

	if d.literal("null") {
		return nil, nil
	}

	list := []string{}

	err := d.each('[', ']', func() error {
		s, err := d.string()
		list = append(list, s)

		return err
	})
	if err != nil {
		return nil, err
	}

	return list, nil
}

// key reads an object key and the ':' after it.
func (d *fastDecoder) key() (string, error) {
	d.skipSpace()

	s, err := d.string()
	if err != nil {
		return "", err
	}

	if err := d.expect(':'); err != nil {
		return "", err
	}

	return s, nil
}

// string reads a JSON string. Escapes are decoded as encoding/json does; what it would
// replace (invalid UTF-8, lone surrogates) makes the fast path decline instead.
func (d *fastDecoder) string() (string, error) {
	d.skipSpace()

	if d.peek() != '"' {
		return "", errDecline
	}

	d.pos++
	start := d.pos
	ascii := true

	for d.pos < len(d.data) {
		c := d.data[d.pos]

		switch {
		case c == '"':
			s := d.data[start:d.pos]
			d.pos++

			if !ascii && !utf8.Valid(s) {
				return "", errDecline
			}

			return string(s), nil
		case c == '\\':
			return d.escapedString(start)
		case c < 0x20:
			return "", errDecline
		case c >= 0x80:
			ascii = false
		}

		d.pos++
	}

	return "", errDecline
}

// escapedString finishes a string that has an escape, from its first character at start.
func (d *fastDecoder) escapedString(start int) (string, error) {
	out := make([]byte, 0, d.pos-start+16)
	d.pos = start

	for d.pos < len(d.data) {
		c := d.data[d.pos]

		switch {
		case c == '"':
			d.pos++

			if !utf8.Valid(out) {
				return "", errDecline
			}

			return string(out), nil
		case c < 0x20:
			return "", errDecline
		case c != '\\':
			out = append(out, c)
			d.pos++

			continue
		}

		if d.pos+1 >= len(d.data) {
			return "", errDecline
		}

		esc := d.data[d.pos+1]
		d.pos += 2

		switch esc {
		case '"', '\\', '/':
			out = append(out, esc)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := d.hex4()
			if !ok {
				return "", errDecline
			}

			if utf16.IsSurrogate(r) {
				// Only a well-formed pair; encoding/json turns a lone one into U+FFFD.
				if d.pos+1 >= len(d.data) || d.data[d.pos] != '\\' || d.data[d.pos+1] != 'u' {
					return "", errDecline
				}

				d.pos += 2

				low, ok := d.hex4()
				if !ok {
					return "", errDecline
				}

				r = utf16.DecodeRune(r, low)
				if r == utf8.RuneError {
					return "", errDecline
				}
			}

			out = utf8.AppendRune(out, r)
		default:
			return "", errDecline
		}
	}

	return "", errDecline
}

// hex4 reads the four hex digits of a \u escape.
func (d *fastDecoder) hex4() (rune, bool) {
	if d.pos+4 > len(d.data) {
		return 0, false
	}

	var r rune

	for _, c := range d.data[d.pos : d.pos+4] {
		switch {
		case '0' <= c && c <= '9':
			r = r<<4 | rune(c-'0')
		case 'a' <= c && c <= 'f':
			r = r<<4 | rune(c-'a'+10)
		case 'A' <= c && c <= 'F':
			r = r<<4 | rune(c-'A'+10)
		default:
			return 0, false
		}
	}

	d.pos += 4

	return r, true
}

// number reads a JSON number token (RFC 8259 grammar) and returns its text.
func (d *fastDecoder) number() (string, error) {
	d.skipSpace()
	start := d.pos

	if d.peek() == '-' {
		d.pos++
	}

	switch c := d.peek(); {
	case c == '0':
		d.pos++
	case '1' <= c && c <= '9':
		d.digits()
	default:
		return "", errDecline
	}

	if d.peek() == '.' {
		d.pos++

		if !d.digits() {
			return "", errDecline
		}
	}

	if c := d.peek(); c == 'e' || c == 'E' {
		d.pos++

		if c := d.peek(); c == '+' || c == '-' {
			d.pos++
		}

		if !d.digits() {
			return "", errDecline
		}
	}

	return string(d.data[start:d.pos]), nil
}

// integer reads a number that must be an integer of the given size, as encoding/json decodes
// into intN (no fraction, no exponent).
func (d *fastDecoder) integer(bits int) (int64, error) {
	raw, err := d.number()
	if err != nil {
		return 0, err
	}

	i, err := strconv.ParseInt(raw, 10, bits)
	if err != nil {
		return 0, errDecline
	}

	return i, nil
}

// digits skips one or more decimal digits; false if there was none.
func (d *fastDecoder) digits() bool {
	start := d.pos

	for d.pos < len(d.data) && '0' <= d.data[d.pos] && d.data[d.pos] <= '9' {
		d.pos++
	}

	return d.pos > start
}

// literal consumes word if it comes next.
func (d *fastDecoder) literal(word string) bool {
	if len(d.data)-d.pos < len(word) || string(d.data[d.pos:d.pos+len(word)]) != word {
		return false
	}

	d.pos += len(word)

	return true
}

// expect consumes c after optional white space.
func (d *fastDecoder) expect(c byte) error {
	d.skipSpace()

	if d.peek() != c {
		return errDecline
	}

	d.pos++

	return nil
}

// peek returns the next byte, or 0 at the end.
func (d *fastDecoder) peek() byte {
	if d.pos >= len(d.data) {
		return 0
	}

	return d.data[d.pos]
}

// skipSpace skips JSON white space.
func (d *fastDecoder) skipSpace() {
	for d.pos < len(d.data) {
		switch d.data[d.pos] {
		case ' ', '\t', '\n', '\r':
			d.pos++
		default:
			return
		}
	}
}
