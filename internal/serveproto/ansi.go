package serveproto

import "strings"

// StripANSI removes terminal escape sequences from s: CSI sequences
// ("\x1b[31;1m", "\x1b[0m", "\x1b[K"), OSC sequences ("\x1b]…" ended by
// BEL or "\x1b\\") and other escapes ("\x1b(B", "\x1b="). Nix 2.8 puts
// colour codes into BuildResult error messages (nix 2.8.0
// src/libutil/fmt.hh normaltxt, ANSI_* in src/libutil/ansicolor.hh).
// Everything else, newlines and invalid UTF-8 included, is kept.
func StripANSI(s string) string {
	if strings.IndexByte(s, 0x1b) < 0 {
		return s
	}
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); {
		c := s[i]
		if c != 0x1b {
			b.WriteByte(c)
			i++
			continue
		}
		i++ // ESC
		if i >= len(s) {
			break
		}
		switch s[i] {
		case '[': // CSI: parameter bytes 0x30–0x3f, intermediates 0x20–0x2f, final 0x40–0x7e
			i++
			for i < len(s) && s[i] >= 0x20 && s[i] <= 0x3f {
				i++
			}
			if i < len(s) && s[i] >= 0x40 && s[i] <= 0x7e {
				i++
			}
		case ']': // OSC: up to BEL or ST (ESC \)
			i++
			for i < len(s) {
				if s[i] == 0x07 {
					i++
					break
				}
				if s[i] == 0x1b && i+1 < len(s) && s[i+1] == '\\' {
					i += 2
					break
				}
				i++
			}
		default: // nF/Fp/Fe/Fs escapes: intermediates 0x20–0x2f, then one final byte (ESC ( B, ESC =)
			for i < len(s) && s[i] >= 0x20 && s[i] <= 0x2f {
				i++
			}
			if i < len(s) {
				i++
			}
		}
	}
	return b.String()
}
