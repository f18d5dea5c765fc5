package main

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
)

// A stream as `go test -json` writes it (Go 1.26): package a passes with one skip, b has a
// failing subtest, c does not build, d has no test files.
const stream = `{"Action":"start","Package":"x/a"}
{"Action":"run","Package":"x/a","Test":"TestOK"}
{"Action":"output","Package":"x/a","Test":"TestOK","Output":"=== RUN   TestOK\n"}
{"Action":"output","Package":"x/a","Test":"TestOK","Output":"    a_test.go:9: quiet on success\n"}
{"Action":"pass","Package":"x/a","Test":"TestOK","Elapsed":0}
{"Action":"run","Package":"x/a","Test":"TestSkip"}
{"Action":"output","Package":"x/a","Test":"TestSkip","Output":"=== RUN   TestSkip\n"}
{"Action":"output","Package":"x/a","Test":"TestSkip","Output":"    a_test.go:12: testbed: no Nix 2.26 here\n"}
{"Action":"output","Package":"x/a","Test":"TestSkip","Output":"--- SKIP: TestSkip (0.00s)\n"}
{"Action":"skip","Package":"x/a","Test":"TestSkip","Elapsed":0}
{"Action":"output","Package":"x/a","Output":"PASS\n"}
{"Action":"output","Package":"x/a","Output":"ok  \tx/a\t0.01s\n"}
{"Action":"pass","Package":"x/a","Elapsed":0.01}
{"Action":"run","Package":"x/b","Test":"TestT"}
{"Action":"run","Package":"x/b","Test":"TestT/sub"}
{"Action":"output","Package":"x/b","Test":"TestT/sub","Output":"    b_test.go:5: want 2, got 3\n"}
{"Action":"output","Package":"x/b","Test":"TestT/sub","Output":"    --- FAIL: TestT/sub (0.00s)\n"}
{"Action":"fail","Package":"x/b","Test":"TestT/sub","Elapsed":0}
{"Action":"output","Package":"x/b","Test":"TestT","Output":"--- FAIL: TestT (0.00s)\n"}
{"Action":"fail","Package":"x/b","Test":"TestT","Elapsed":0}
{"Action":"output","Package":"x/b","Output":"FAIL\n"}
{"Action":"output","Package":"x/b","Output":"FAIL\tx/b\t0.02s\n"}
{"Action":"fail","Package":"x/b","Elapsed":0.02}
{"ImportPath":"x/c [x/c.test]","Action":"build-output","Output":"c/c.go:3:1: syntax error\n"}
{"ImportPath":"x/c [x/c.test]","Action":"build-fail"}
{"Action":"output","Package":"x/c","Output":"FAIL\tx/c [build failed]\n"}
{"Action":"fail","Package":"x/c","Elapsed":0,"FailedBuild":"x/c [x/c.test]"}
{"Action":"output","Package":"x/d","Output":"?   \tx/d\t[no test files]\n"}
{"Action":"skip","Package":"x/d","Elapsed":0}
`

func TestSummary(t *testing.T) {
	var out, log bytes.Buffer
	s := newSummary(&out, &log)
	if err := s.read(strings.NewReader(stream)); err != nil {
		t.Fatal(err)
	}
	if s.report() {
		t.Error("report passed a run with a failed test and a failed build")
	}
	got := out.String()
	for _, want := range []string{
		"SKIP x/a TestSkip\n    a_test.go:12: testbed: no Nix 2.26 here\n", // every skip, with its reason
		"b_test.go:5: want 2, got 3\n",                                     // a failure's output
		"c/c.go:3:1: syntax error\n",                                       // a build failure
		"ok  \tx/a\t0.01s\n",
		"\ntests: 1 passed, 2 failed, 1 skipped\n", // CI reads this line
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "quiet on success") {
		t.Errorf("output shows a passing test's log:\n%s", got)
	}
	for _, row := range []string{
		`(?m)^x/a +1 +0 +1$`,
		`(?m)^x/b +0 +2 +0  FAIL$`,
		`(?m)^x/c +0 +0 +0  FAIL$`,
		`(?m)^x/d +0 +0 +0  \(no tests\)$`,
	} {
		if !regexp.MustCompile(row).MatchString(got) {
			t.Errorf("table lacks the row %q:\n%s", row, got)
		}
	}
	if !strings.Contains(log.String(), "quiet on success") || !strings.Contains(log.String(), "FAIL\tx/c [build failed]") {
		t.Errorf("the log lacks the full text:\n%s", log.String())
	}
}

func TestSummaryPasses(t *testing.T) {
	pass := stream[:strings.Index(stream, `{"Action":"run","Package":"x/b"`)]
	var out bytes.Buffer
	s := newSummary(&out, &bytes.Buffer{})
	if err := s.read(strings.NewReader(pass)); err != nil {
		t.Fatal(err)
	}
	if !s.report() || !strings.Contains(out.String(), "\ntests: 1 passed, 0 failed, 1 skipped\n") {
		t.Errorf("a passing run did not pass:\n%s", out.String())
	}
}

// A run in which no test ran (every package skipped, or `go test` printed only its own
// errors) fails.
func TestSummaryNothingRan(t *testing.T) {
	for name, in := range map[string]string{
		"no tests": `{"Action":"output","Package":"x/d","Output":"?   \tx/d\t[no test files]\n"}` + "\n" + `{"Action":"skip","Package":"x/d"}` + "\n",
		"go error": "go: updates to go.mod needed; to update it:\n\tgo mod tidy\n",
		"empty":    "",
	} {
		var out bytes.Buffer
		s := newSummary(&out, &bytes.Buffer{})
		if err := s.read(strings.NewReader(in)); err != nil {
			t.Fatal(err)
		}
		if s.report() {
			t.Errorf("%s: report passed:\n%s", name, out.String())
		}
	}
}
