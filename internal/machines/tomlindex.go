package machines

import (
	"strconv"
	"strings"
)

// BurntSushi/toml reports syntax errors with a position, but not where a key that parsed fine
// sits: MetaData.Undecoded has no line, and its key-info table has one entry per dotted name,
// so the second [[machine]]'s keys overwrite the first's. The index below fills that gap. It
// is a small scanner that runs only over text the TOML decoder has already accepted, and
// records, for every key path, the line where that key (or table header, or inline table)
// first appears.
//
// A path is a list of segments: key names, and for array elements "\x01" followed by the
// 1-based element number. pathKey joins segments with "\x00", so that quoted keys containing
// '.' or '[' cannot collide with nesting. [loc] builds the same keys on the decoding side.

const (
	pathSep  = "\x00"
	elemMark = "\x01"
)

func elemSeg(i int) string { return elemMark + strconv.Itoa(i) }

func pathKey(segs []string) string { return strings.Join(segs, pathSep) }

// keyLines maps pathKey → line (1-based).
type keyLines map[string]int

// indexKeys scans TOML text. It never fails: on text the decoder rejected it records what it
// can, and it always terminates because every loop consumes at least one byte.
func indexKeys(src string) keyLines {
	s := &tomlScanner{src: src, line: 1, idx: keyLines{}, arrays: map[string]int{}}
	var table []string
	for !s.eof() {
		c := s.peek()
		switch {
		case c == ' ' || c == '\t' || c == '\r' || c == '\n':
			s.next()
		case c == '#':
			s.skipComment()
		case c == '[':
			table = s.header()
		default:
			start := s.pos
			s.keyValue(table)
			if s.pos == start {
				s.next()
			}
		}
	}
	return s.idx
}

type tomlScanner struct {
	src    string
	pos    int
	line   int
	idx    keyLines
	arrays map[string]int // pathKey of an array of tables → elements so far
}

func (s *tomlScanner) eof() bool { return s.pos >= len(s.src) }

func (s *tomlScanner) peek() byte {
	if s.eof() {
		return 0
	}
	return s.src[s.pos]
}

func (s *tomlScanner) next() byte {
	c := s.src[s.pos]
	s.pos++
	if c == '\n' {
		s.line++
	}
	return c
}

func (s *tomlScanner) has(prefix string) bool { return strings.HasPrefix(s.src[s.pos:], prefix) }

// record notes line for every prefix of path from segment from on that has no line yet.
func (s *tomlScanner) record(path []string, from, line int) {
	for i := max(from, 1); i <= len(path); i++ {
		k := pathKey(path[:i])
		if _, ok := s.idx[k]; !ok {
			s.idx[k] = line
		}
	}
}

func (s *tomlScanner) skipBlanks() { // spaces and tabs only
	for !s.eof() && (s.peek() == ' ' || s.peek() == '\t') {
		s.next()
	}
}

// skipSpace skips whitespace, newlines and comments, as allowed inside arrays and (TOML 1.1)
// inline tables.
func (s *tomlScanner) skipSpace() {
	for !s.eof() {
		switch s.peek() {
		case ' ', '\t', '\r', '\n':
			s.next()
		case '#':
			s.skipComment()
		default:
			return
		}
	}
}

func (s *tomlScanner) skipComment() {
	for !s.eof() && s.peek() != '\n' {
		s.next()
	}
}

// header reads "[a.b]" or "[[a.b]]" and returns the resolved path of the table it opens.
func (s *tomlScanner) header() []string {
	line := s.line
	s.next() // '['
	array := s.peek() == '['
	if array {
		s.next()
	}
	segs := s.keyPath()
	s.skipBlanks()
	for n := 0; n < 2 && s.peek() == ']'; n++ {
		s.next()
	}
	// A header names its table from the root; each array of tables along the way means its
	// latest element.
	var path []string
	for i, seg := range segs {
		path = append(path, seg)
		k := pathKey(path)
		if array && i == len(segs)-1 {
			s.arrays[k]++
			s.record(path, 0, line)
			path = append(path, elemSeg(s.arrays[k]))
			s.idx[pathKey(path)] = line
			break
		}
		if n, ok := s.arrays[k]; ok {
			path = append(path, elemSeg(n))
		}
	}
	s.record(path, 0, line)
	return path
}

// keyValue reads "key = value" in table.
func (s *tomlScanner) keyValue(table []string) {
	line := s.line
	segs := s.keyPath()
	s.skipBlanks()
	if len(segs) == 0 || s.peek() != '=' {
		s.skipComment() // not a key/value line; skip the rest of it
		return
	}
	s.next() // '='
	path := append(append([]string(nil), table...), segs...)
	s.record(path, len(table)+1, line)
	s.value(path)
}

// keyPath reads a possibly dotted key; it returns nil if there is no key here.
func (s *tomlScanner) keyPath() []string {
	var segs []string
	for {
		s.skipBlanks()
		var seg string
		switch c := s.peek(); {
		case c == '"' || c == '\'':
			seg = s.str()
		case isBareKeyByte(c):
			start := s.pos
			for !s.eof() && isBareKeyByte(s.peek()) {
				s.next()
			}
			seg = s.src[start:s.pos]
		default:
			return segs
		}
		segs = append(segs, seg)
		s.skipBlanks()
		if s.peek() != '.' {
			return segs
		}
		s.next()
	}
}

func isBareKeyByte(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-'
}

// value skips one value, recording the keys of inline tables inside it under path.
func (s *tomlScanner) value(path []string) {
	s.skipBlanks()
	switch s.peek() {
	case '"', '\'':
		s.str()
	case '[':
		s.array(path)
	case '{':
		s.inlineTable(path)
	default: // number, bool, date-time (which may contain a space)
		for !s.eof() && !strings.ContainsRune(",]}#\n", rune(s.peek())) {
			s.next()
		}
	}
}

func (s *tomlScanner) array(path []string) {
	s.next() // '['
	for n := 0; ; {
		s.skipSpace()
		switch s.peek() {
		case 0:
			if s.eof() {
				return
			}
			s.next()
		case ']':
			s.next()
			return
		case ',':
			s.next()
		default:
			n++
			start := s.pos
			elem := append(append([]string(nil), path...), elemSeg(n))
			s.record(elem, len(elem), s.line)
			s.value(elem)
			if s.pos == start {
				s.next()
			}
		}
	}
}

func (s *tomlScanner) inlineTable(path []string) {
	s.next() // '{'
	for {
		s.skipSpace()
		switch s.peek() {
		case 0:
			if s.eof() {
				return
			}
			s.next()
		case '}':
			s.next()
			return
		case ',':
			s.next()
		default:
			line := s.line
			segs := s.keyPath()
			s.skipBlanks()
			if len(segs) == 0 || s.peek() != '=' {
				if !s.eof() && s.peek() != '}' {
					s.next()
				}
				continue
			}
			s.next() // '='
			full := append(append([]string(nil), path...), segs...)
			s.record(full, len(path)+1, line)
			s.value(full)
		}
	}
}

// str skips a string of any of TOML's four kinds and returns its content (escapes resolved
// where Go agrees with TOML; it is only used to name keys).
func (s *tomlScanner) str() string {
	q := s.peek()
	if s.has(`"""`) || s.has(`'''`) {
		s.pos += 3
		start := s.pos
		for !s.eof() {
			if q == '"' && s.peek() == '\\' {
				s.next()
				if !s.eof() {
					s.next()
				}
				continue
			}
			if s.peek() == q && strings.HasPrefix(s.src[s.pos:], strings.Repeat(string(q), 3)) {
				// Up to two more quotes right before the closing three belong to the content.
				end := s.pos
				s.pos += 3
				for n := 0; n < 2 && s.peek() == q; n++ {
					s.pos++
					end++
				}
				return s.src[start:end]
			}
			s.next()
		}
		return s.src[start:]
	}
	s.next() // opening quote
	start := s.pos
	for !s.eof() && s.peek() != q && s.peek() != '\n' {
		if q == '"' && s.peek() == '\\' {
			s.next()
			if s.eof() || s.peek() == '\n' {
				break
			}
		}
		s.next()
	}
	raw := s.src[start:s.pos]
	if !s.eof() && s.peek() == q {
		s.next()
	}
	if q == '"' && strings.ContainsRune(raw, '\\') {
		if u, err := strconv.Unquote(`"` + raw + `"`); err == nil {
			return u
		}
	}
	return raw
}
