package machines

import "strings"

// aliases maps names people bring from elsewhere (NixOS nix.buildMachines, ssh_config, the
// machines file), normalised as by [normKey], to our key.
var aliases = map[string]string{
	"hostname":           "host",
	"sshuser":            "user",
	"username":           "user",
	"identityfile":       "ssh-key",
	"sshkeyfile":         "ssh-key",
	"publichostkey":      "host-key",
	"sshpublichostkey":   "host-key",
	"userknownhostsfile": "known-hosts",
	"knownhostsfile":     "known-hosts",
	"globalknownhosts":   "known-hosts",
	"system":             "systems",
	"platforms":          "systems",
	"maxjobs":            "parallel-builds",
	"jobs":               "parallel-builds",
	"slots":              "parallel-builds",
	"speedfactor":        "speed",
	"supportedfeatures":  "features",
	"systemfeatures":     "features",
	"disabled":           "enabled",
	"store":              "remote-store",
	"timeout":            "connect-timeout",
	"statedirectory":     "state-dir",
	"socketpath":         "socket",
	"builder":            "machine",
	"builders":           "machine",
}

// normKey folds case and drops '-' and '_', so that sshKey, ssh_key and SSH-Key meet ssh-key.
func normKey(s string) string {
	return strings.Map(func(r rune) rune {
		if r == '-' || r == '_' {
			return -1
		}
		return r
	}, strings.ToLower(s))
}

// suggest returns the key of known that key was most likely meant to be, or "".
func suggest(key string, known []string) string {
	n := normKey(key)
	for _, k := range known {
		if normKey(k) == n {
			return k
		}
	}
	if a, ok := aliases[n]; ok {
		for _, k := range known {
			if k == a {
				return k
			}
		}
	}
	best, bestDist := "", -1
	for _, k := range known {
		d := editDistance(strings.ToLower(key), k)
		if bestDist < 0 || d < bestDist {
			best, bestDist = k, d
		}
	}
	limit := 1
	switch {
	case len(best) > 10:
		limit = 3
	case len(best) > 4:
		limit = 2
	}
	if bestDist < 0 || bestDist > limit {
		return ""
	}
	return best
}

// maxSuggestLen bounds the work editDistance does for a pathological key.
const maxSuggestLen = 64

// editDistance is the optimal-string-alignment distance between a and b (insertions,
// deletions, substitutions and swaps of neighbours each cost 1), on bytes.
func editDistance(a, b string) int {
	if len(a) > maxSuggestLen || len(b) > maxSuggestLen {
		return maxSuggestLen
	}
	// Three rows are enough: the swap looks two rows back.
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}
