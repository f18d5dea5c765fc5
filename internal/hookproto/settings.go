package hookproto

import (
	"fmt"
	"io"
	"math"
	"strconv"
	"time"
)

// Settings is the settings block Nix sends first: every setting it knows,
// overridden or not, by name, each value as the text `nix show-config`
// prints (nix 2.8.0 src/libstore/build/hook-instance.cc, HookInstance;
// same layout through 2.35).
//
// It holds secrets when the user has any (access-tokens, in clear text):
// never log it whole.
//
// The accessors return def when a setting is absent, which it is when the
// Nix version does not know it, and also when its text does not parse; the
// Parse methods tell the two apart.
type Settings map[string]string

// ReadSettings reads the settings block, `{u64 1, string name, string
// value}*` ended by `u64 0`. Nix writes it when the hook starts but
// flushes it only with the first "try", so this returns only then.
//
// Names must be unique and non-empty. A stream that ends inside the block,
// even before its first byte, is a [*ReadError] wrapping
// [io.ErrUnexpectedEOF]; see [MaxSettings], [MaxSettingNameLen] and
// [MaxSettingValueLen] for the limits.
func ReadSettings(r io.Reader) (Settings, error) {
	d := newDecoder(r, "settings")
	s := Settings{}
	for i := 0; ; i++ {
		field := fmt.Sprintf("setting %d", i)
		more, err := d.u64(field + ": marker")
		if err != nil {
			return nil, err
		}
		switch more {
		case 0:
			return s, nil
		case 1:
		default:
			return nil, d.failf(field+": marker", "got %d, want 1 (a setting) or 0 (the end)", more)
		}
		if i == MaxSettings {
			return nil, d.failf(field, "more than %d settings", MaxSettings)
		}
		name, err := d.str(field+": name", MaxSettingNameLen)
		if err != nil {
			return nil, err
		}
		if name == "" {
			return nil, d.failf(field+": name", "empty")
		}
		field = fmt.Sprintf("setting %d (%q)", i, name)
		value, err := d.str(field+": value", MaxSettingValueLen)
		if err != nil {
			return nil, err
		}
		if _, dup := s[name]; dup {
			return nil, d.failf(field, "sent twice")
		}
		s[name] = value
	}
}

// String returns the setting's text, or def if Nix did not send it.
func (s Settings) String(name, def string) string {
	if v, ok := s[name]; ok {
		return v
	}
	return def
}

// Bool returns a boolean setting ("true" or "false", as Nix prints them),
// or def if it is absent or neither.
func (s Settings) Bool(name string, def bool) bool {
	v, ok, err := s.ParseBool(name)
	if !ok || err != nil {
		return def
	}
	return v
}

// Uint returns an unsigned decimal setting ("max-jobs", "cores",
// "max-build-log-size"), or def if it is absent or not a number.
func (s Settings) Uint(name string, def uint64) uint64 {
	v, ok, err := s.ParseUint(name)
	if !ok || err != nil {
		return def
	}
	return v
}

// Seconds returns a setting in whole seconds ("max-silent-time",
// "timeout") as a duration, or def if it is absent or not a number. 0
// means no limit, as in Nix.
func (s Settings) Seconds(name string, def time.Duration) time.Duration {
	v, ok, err := s.ParseSeconds(name)
	if !ok || err != nil {
		return def
	}
	return v
}

// ParseBool is [Settings.Bool] with the cases apart: ok is false if the
// setting is absent, err is set if its text is neither "true" nor "false".
func (s Settings) ParseBool(name string) (v, ok bool, err error) {
	text, ok := s[name]
	if !ok {
		return false, false, nil
	}
	switch text {
	case "true":
		return true, true, nil
	case "false":
		return false, true, nil
	}
	return false, true, fmt.Errorf("hookproto: setting %s = %q: want true or false", name, text)
}

// ParseUint is [Settings.Uint] with the cases apart.
func (s Settings) ParseUint(name string) (v uint64, ok bool, err error) {
	text, ok := s[name]
	if !ok {
		return 0, false, nil
	}
	v, err = strconv.ParseUint(text, 10, 64)
	if err != nil {
		return 0, true, fmt.Errorf("hookproto: setting %s = %q: want an unsigned decimal number", name, text)
	}
	return v, true, nil
}

// ParseSeconds is [Settings.Seconds] with the cases apart. Negative
// values and values too large for a [time.Duration] are errors.
func (s Settings) ParseSeconds(name string) (v time.Duration, ok bool, err error) {
	n, ok, err := s.ParseUint(name)
	if !ok || err != nil {
		return 0, ok, err
	}
	if n > math.MaxInt64/uint64(time.Second) {
		return 0, true, fmt.Errorf("hookproto: setting %s = %d seconds: too large", name, n)
	}
	return time.Duration(n) * time.Second, true, nil
}
