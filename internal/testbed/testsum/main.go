// Command testsum reads `go test -json` on stdin and tells what ran. scripts/test pipes the
// whole suite through it:
//
//	go test -json ./... | go run ./internal/testbed/testsum -log test.log
//
// The log gets the plain text of every event (what `go test -v` prints). Stdout gets, as
// they happen, each package's result line, the output of every test that failed, and
// every skip with its reason; at the end a table of how many tests (subtests included)
// passed, failed and were skipped in each package, and one line in the form
//
//	tests: 812 passed, 0 failed, 37 skipped
//
// It exits 1 when a test or a package failed, a package did not build, or no test ran at
// all, so that a suite that ran nothing cannot pass.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

func main() {
	logPath := flag.String("log", "", "write the plain text of every event to this file")
	flag.Parse()
	var log io.Writer = io.Discard
	if *logPath != "" {
		f, err := os.Create(*logPath)
		if err != nil {
			fmt.Fprintf(os.Stderr, "testsum: %v\n", err)
			os.Exit(2)
		}
		defer f.Close()
		log = f
	}
	s := newSummary(os.Stdout, log)
	if err := s.read(os.Stdin); err != nil {
		fmt.Fprintf(os.Stderr, "testsum: reading go test -json: %v\n", err)
		os.Exit(2)
	}
	if !s.report() {
		os.Exit(1)
	}
}

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action      string
	Package     string
	Test        string
	Output      string
	FailedBuild string
	ImportPath  string // build-output and build-fail events
}

// counts is what one package's tests did.
type counts struct {
	passed, failed, skipped int
	result                  string // the package's own action: pass, fail, skip ("no test files")
}

// summary accumulates the events.
type summary struct {
	out, log io.Writer
	pkgs     map[string]*counts
	// output of each running test (package + "\x00" + test), kept until it ends: shown only
	// for a failure or a skip.
	pending map[string][]string
	// failedBuilds are the packages whose test binary did not build.
	failedBuilds map[string]bool
	// stray counts lines that were not JSON (the go command's own messages).
	stray int
}

func newSummary(out, log io.Writer) *summary {
	return &summary{out: out, log: log, pkgs: map[string]*counts{}, pending: map[string][]string{}, failedBuilds: map[string]bool{}}
}

func (s *summary) pkg(name string) *counts {
	c := s.pkgs[name]
	if c == nil {
		c = &counts{}
		s.pkgs[name] = c
	}
	return c
}

// read consumes the stream until EOF.
func (s *summary) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// The go command's own message, such as a setup failure: show it as it is.
			s.stray++
			fmt.Fprintf(s.out, "%s\n", line)
			fmt.Fprintf(s.log, "%s\n", line)
			continue
		}
		s.event(e)
	}
	return sc.Err()
}

func (s *summary) event(e event) {
	if e.Output != "" {
		io.WriteString(s.log, e.Output)
	}
	switch e.Action {
	case "build-output":
		io.WriteString(s.out, e.Output)
		return
	case "build-fail":
		s.failedBuilds[buildPackage(e.ImportPath)] = true
		return
	}
	if e.Package == "" {
		return
	}
	if e.FailedBuild != "" {
		s.failedBuilds[buildPackage(e.FailedBuild)] = true
	}
	c := s.pkg(e.Package)
	key := e.Package + "\x00" + e.Test
	if e.Test == "" {
		switch e.Action {
		case "output":
			// The package's closing lines ("ok", "FAIL", "?   ... [no test files]") and
			// whatever the test binary printed outside a test, such as a panic's trace.
			s.pending[key] = append(s.pending[key], e.Output)
		case "pass", "fail", "skip":
			c.result = e.Action
			for _, l := range s.pending[key] {
				if e.Action == "fail" && !isTestLine(l) || strings.HasPrefix(l, "ok  \t") || strings.HasPrefix(l, "?   \t") || strings.HasPrefix(l, "FAIL\t") {
					io.WriteString(s.out, l)
				}
			}
			delete(s.pending, key)
		}
		return
	}
	switch e.Action {
	case "output":
		s.pending[key] = append(s.pending[key], e.Output)
	case "pass":
		c.passed++
		delete(s.pending, key)
	case "fail":
		c.failed++
		for _, l := range s.pending[key] {
			io.WriteString(s.out, l)
		}
		delete(s.pending, key)
	case "skip":
		c.skipped++
		fmt.Fprintf(s.out, "SKIP %s %s\n", e.Package, e.Test)
		for _, l := range s.pending[key] {
			if !strings.HasPrefix(strings.TrimSpace(l), "=== ") && !strings.HasPrefix(strings.TrimSpace(l), "--- SKIP") {
				io.WriteString(s.out, "    "+strings.TrimLeft(l, " "))
			}
		}
		delete(s.pending, key)
	}
}

// buildPackage returns the package of a build's import path: "x/c" for "x/c [x/c.test]".
func buildPackage(importPath string) string {
	p, _, _ := strings.Cut(importPath, " ")
	return p
}

// isTestLine reports whether l is go test's own line about a test.
func isTestLine(l string) bool {
	t := strings.TrimLeft(l, " ")
	return strings.HasPrefix(t, "--- ") || strings.HasPrefix(t, "=== ")
}

// report prints the table and the total, and reports whether the run passed.
func (s *summary) report() bool {
	names := make([]string, 0, len(s.pkgs))
	width := len("package")
	for n := range s.pkgs {
		names = append(names, n)
		width = max(width, len(n))
	}
	sort.Strings(names)
	var passed, failed, skipped int
	failedPkgs := 0
	fmt.Fprintf(s.out, "\n%-*s %7s %7s %7s\n", width, "package", "passed", "failed", "skipped")
	for _, n := range names {
		c := s.pkgs[n]
		passed += c.passed
		failed += c.failed
		skipped += c.skipped
		note := ""
		switch {
		case c.result == "fail" || s.failedBuilds[n]:
			failedPkgs++
			note = "  FAIL"
		case c.result == "skip" && c.passed+c.failed+c.skipped == 0:
			note = "  (no tests)"
		}
		fmt.Fprintf(s.out, "%-*s %7d %7d %7d%s\n", width, n, c.passed, c.failed, c.skipped, note)
	}
	for n := range s.failedBuilds {
		if s.pkgs[n] == nil {
			failedPkgs++
			fmt.Fprintf(s.out, "%-*s did not build  FAIL\n", width, n)
		}
	}
	fmt.Fprintf(s.out, "tests: %d passed, %d failed, %d skipped\n", passed, failed, skipped)
	switch {
	case failed > 0 || failedPkgs > 0:
		fmt.Fprintf(s.out, "FAIL: %d tests and %d packages failed\n", failed, failedPkgs)
		return false
	case passed == 0:
		fmt.Fprintf(s.out, "FAIL: no test ran\n")
		return false
	}
	return true
}
