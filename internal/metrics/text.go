package metrics

import (
	"bytes"
	"cmp"
	"errors"
	"io"
	"math"
	"net/http"
	"slices"
	"strconv"
)

// ContentType is the media type of what [Registry.WriteText] writes.
const ContentType = "text/plain; version=0.0.4; charset=utf-8"

// flushAt is how much WriteText buffers before it writes to its writer.
const flushAt = 32 << 10

// WriteText writes every family with at least one series in the text exposition format (see
// the package documentation). An error from w ends it. A GaugeFunc that returns bad samples
// does not: WriteText leaves those samples out, writes everything else, and returns an error
// that names them.
func (r *Registry) WriteText(w io.Writer) error {
	type named struct {
		name string
		f    family
	}
	r.mu.Lock()
	fs := make([]named, 0, len(r.families))
	for name, f := range r.families {
		fs = append(fs, named{name, f})
	}
	r.mu.Unlock()
	slices.SortFunc(fs, func(a, b named) int { return cmp.Compare(a.name, b.name) })

	var (
		b    []byte
		errs []error
	)
	for _, f := range fs {
		var err error
		if b, err = f.f.appendText(b); err != nil {
			errs = append(errs, err)
		}
		if len(b) >= flushAt {
			if _, err := w.Write(b); err != nil {
				return err
			}
			b = b[:0]
		}
	}
	if len(b) > 0 {
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	return errors.Join(errs...)
}

// Handler returns an HTTP handler that answers GET and HEAD with the exposition, for
// Prometheus to scrape. The exposition is made in full before the answer starts, so a
// GaugeFunc's bad samples give a 500 with the error as its body rather than half a page.
func (r *Registry) Handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method != http.MethodGet && req.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "metrics: use GET", http.StatusMethodNotAllowed)
			return
		}
		var buf bytes.Buffer
		if err := r.WriteText(&buf); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", ContentType)
		w.Header().Set("Content-Length", strconv.Itoa(buf.Len()))
		if req.Method == http.MethodGet {
			w.Write(buf.Bytes())
		}
	})
}

// appendHeader appends the # HELP (if there is help) and # TYPE lines of d.
func appendHeader(b []byte, d desc) []byte {
	if d.help != "" {
		b = append(b, "# HELP "...)
		b = append(b, d.name...)
		b = append(b, ' ')
		b = appendEscaped(b, d.help, false)
		b = append(b, '\n')
	}
	b = append(b, "# TYPE "...)
	b = append(b, d.name...)
	b = append(b, ' ')
	b = append(b, d.typ...)
	return append(b, '\n')
}

// appendSample appends one line: name+suffix, the labels names=values (and le, if not ""),
// and v.
func appendSample(b []byte, name, suffix string, names, values []string, le string, v float64) []byte {
	b = append(b, name...)
	b = append(b, suffix...)
	if len(names) > 0 || le != "" {
		b = append(b, '{')
		for i, n := range names {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendLabel(b, n, values[i])
		}
		if le != "" {
			if len(names) > 0 {
				b = append(b, ',')
			}
			b = appendLabel(b, "le", le)
		}
		b = append(b, '}')
	}
	b = append(b, ' ')
	b = appendFloat(b, v)
	return append(b, '\n')
}

func appendLabel(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, '=', '"')
	b = appendEscaped(b, value, true)
	return append(b, '"')
}

// appendEscaped appends s with backslash and newline escaped, and the double quote too if
// quote is set (label values; help texts keep theirs).
func appendEscaped(b []byte, s string, quote bool) []byte {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c == '\\':
			b = append(b, `\\`...)
		case c == '\n':
			b = append(b, `\n`...)
		case c == '"' && quote:
			b = append(b, `\"`...)
		default:
			b = append(b, c)
		}
	}
	return b
}

// appendFloat appends v as Prometheus reads it: +Inf, -Inf and NaN by name, integers that a
// float64 holds exactly (|v| ≤ 2^53) in plain digits, and anything else in the shortest form
// that parses back to v.
func appendFloat(b []byte, v float64) []byte {
	switch {
	case math.IsNaN(v):
		return append(b, "NaN"...)
	case math.IsInf(v, +1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	case v == math.Trunc(v) && math.Abs(v) <= 1<<53:
		return strconv.AppendInt(b, int64(v), 10)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}
