// Package probe asks a machine about itself: its load per core, the pressure on its CPUs and the
// free space of the filesystem that holds its store. [Command] is a short POSIX shell command
// the broker runs every few seconds in an exec channel of a warm SSH connection
// (internal/pool's Probe), and [Parse] reads its answer.
//
// The answer is read strictly, because the command may not be what runs: a key with a forced
// command (command="nix-store --serve" in authorized_keys) runs that instead, and a login
// shell may print a banner. Anything but the exact form below is an error, which the caller
// reports as "state unknown": it never makes a machine look down or full.
//
//	nix-offload-probe 1
//	loadavg 0.52 0.40 0.30 1/123 4567     /proc/loadavg, or darwin's sysctl vm.loadavg "{ 0.52 0.40 0.30 }"
//	cores 8                               getconf _NPROCESSORS_ONLN, or sysctl hw.ncpu
//	cpu-pressure avg10=1.23 avg60=…       the "some" line of /proc/pressure/cpu, where the kernel has PSI
//	df /dev/sda1 102400 51200 51200 50% /nix   df -Pk /nix/store's last line
//	end
//
// A line whose value is empty ("loadavg ", "df ") means the machine could not say; that part is
// unknown and the rest counts. The cpu-pressure line is absent without PSI.
package probe

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// MaxOutput bounds the answer: more bytes than this are not a probe's answer.
const MaxOutput = 4096

// header and trailer frame the answer.
const (
	header  = "nix-offload-probe 1"
	trailer = "end"
)

// Command returns the shell command that prints the answer for the store directory storeDir
// ("/nix/store"). It runs under /bin/sh whatever the login shell, and prints every line even
// where a tool is missing.
func Command(storeDir string) string {
	script := `echo ` + header + `; ` +
		`if [ -r /proc/loadavg ]; then echo "loadavg $(cat /proc/loadavg)"; else echo "loadavg $(sysctl -n vm.loadavg 2>/dev/null)"; fi; ` +
		`echo "cores $(getconf _NPROCESSORS_ONLN 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null)"; ` +
		`if [ -r /proc/pressure/cpu ]; then sed -n "s/^some /cpu-pressure /p" /proc/pressure/cpu 2>/dev/null; fi; ` +
		`echo "df $(df -Pk ` + storeDir + ` 2>/dev/null | tail -n 1)"; ` +
		`echo ` + trailer
	return "exec /bin/sh -c '" + script + "'"
}

// State is what a machine said about itself. Each Has… tells whether that part is known.
type State struct {
	HasLoad     bool
	Load1       float64 // 1-minute load average
	Cores       int
	HasPressure bool
	Pressure    float64 // PSI cpu "some" avg10: % of the last 10 s some task waited for a CPU
	HasFree     bool
	FreeBytes   uint64 // available to unprivileged users on the store's filesystem
}

// LoadPerCore is the 1-minute load average ÷ cores; valid when HasLoad.
func (s State) LoadPerCore() float64 { return s.Load1 / float64(s.Cores) }

// maxCores bounds a believable core count.
const maxCores = 1 << 16

// Parse reads the answer of [Command]. It returns an error, naming the first thing that is not
// as expected, for anything else: another program's output, a banner, a cut-off answer.
func Parse(out []byte) (State, error) {
	var st State
	if len(out) > MaxOutput {
		return st, fmt.Errorf("answer longer than %d bytes", MaxOutput)
	}
	text, ok := strings.CutSuffix(string(out), "\n")
	if !ok {
		return st, errors.New("answer does not end with a newline")
	}
	lines := strings.Split(text, "\n")
	if lines[0] != header {
		return st, fmt.Errorf("answer starts with %q, not %q", clip(lines[0]), header)
	}
	if len(lines) < 2 || lines[len(lines)-1] != trailer {
		return st, errors.New("answer does not end with " + trailer)
	}
	var load1 float64
	hasLoadavg, seen := false, map[string]bool{}
	for _, line := range lines[1 : len(lines)-1] {
		key, val, _ := strings.Cut(line, " ")
		if seen[key] {
			return State{}, fmt.Errorf("%q twice", clip(key))
		}
		seen[key] = true
		fields := strings.Fields(val)
		var err error
		switch key {
		case "loadavg":
			if len(fields) == 0 {
				break
			}
			load1, err = parseLoadavg(fields)
			hasLoadavg = err == nil
		case "cores":
			if len(fields) == 0 {
				break
			}
			var n int
			n, err = strconv.Atoi(val)
			if err == nil && (n < 1 || n > maxCores) {
				err = fmt.Errorf("%d cores", n)
			}
			st.Cores = n
		case "cpu-pressure":
			st.Pressure, err = parsePressure(fields)
			st.HasPressure = err == nil
		case "df":
			if len(fields) == 0 {
				break
			}
			st.FreeBytes, err = parseDF(fields)
			st.HasFree = err == nil
		default:
			return State{}, fmt.Errorf("unexpected line %q", clip(line))
		}
		if err != nil {
			return State{}, fmt.Errorf("%s: %w", key, err)
		}
	}
	if hasLoadavg && st.Cores > 0 {
		st.HasLoad, st.Load1 = true, load1
	}
	return st, nil
}

// parseLoadavg takes the 1-minute average from /proc/loadavg's fields or darwin's
// "{ 0.52 0.40 0.30 }".
func parseLoadavg(fields []string) (float64, error) {
	if fields[0] == "{" {
		if len(fields) != 5 || fields[4] != "}" {
			return 0, fmt.Errorf("not a load average: %q", clip(strings.Join(fields, " ")))
		}
		fields = fields[1:4]
	} else if len(fields) != 5 {
		return 0, fmt.Errorf("not a load average: %q", clip(strings.Join(fields, " ")))
	}
	for _, f := range fields[:3] {
		if _, err := number(f); err != nil {
			return 0, err
		}
	}
	return number(fields[0])
}

// parsePressure takes avg10 from "avg10=1.23 avg60=0.50 avg300=0.10 total=12345".
func parsePressure(fields []string) (float64, error) {
	if len(fields) != 4 {
		return 0, fmt.Errorf("not a pressure line: %q", clip(strings.Join(fields, " ")))
	}
	var avg10 float64
	for i, name := range []string{"avg10", "avg60", "avg300", "total"} {
		v, ok := strings.CutPrefix(fields[i], name+"=")
		if !ok {
			return 0, fmt.Errorf("expected %s=, got %q", name, clip(fields[i]))
		}
		f, err := number(v)
		if err != nil {
			return 0, err
		}
		if i == 0 {
			if f > 100 {
				return 0, fmt.Errorf("avg10 %v is more than 100%%", f)
			}
			avg10 = f
		}
	}
	return avg10, nil
}

// parseDF takes the available KiB from df -Pk's line "filesystem blocks used available
// capacity% mountpoint", where the filesystem's name and the mount point may hold spaces: the
// capacity is the last field ending in "%", and the three before it are numbers.
func parseDF(fields []string) (uint64, error) {
	c := -1
	for i := len(fields) - 1; i >= 0; i-- {
		if strings.HasSuffix(fields[i], "%") {
			c = i
			break
		}
	}
	if c < 4 || c == len(fields)-1 {
		return 0, fmt.Errorf("not a df -P line: %q", clip(strings.Join(fields, " ")))
	}
	var kib [3]uint64
	for i := range kib {
		n, err := strconv.ParseUint(fields[c-3+i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("not a df -P line: %q", clip(strings.Join(fields, " ")))
		}
		kib[i] = n
	}
	if kib[2] > math.MaxUint64/1024 {
		return 0, fmt.Errorf("%d KiB available is too large", kib[2])
	}
	return kib[2] * 1024, nil
}

// number parses a non-negative finite decimal.
func number(s string) (float64, error) {
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) || strings.ContainsAny(s, "xXpPeEiInN_") {
		return 0, fmt.Errorf("not a number: %q", clip(s))
	}
	return f, nil
}

// clip shortens what an error quotes from the machine.
func clip(s string) string {
	if len(s) > 60 {
		return s[:60] + "…"
	}
	return s
}
