// Command hooktimes sums up the step times that hooks of ours recorded
// (NIX_OFFLOAD_HOOK_TIMES, internal/stopwatch), such as those the bench
// keeps with -logs:
//
//	go run ./internal/testbed/hooktimes /tmp/logs/*.hook-times.jsonl
//
// Files are grouped by name without the run number ("2.34-wide50-broker-3"
// is in group "2.34-wide50-broker"). For each group it prints, over the
// hook processes that accepted a build, the median and 90th percentile of
// the two spans the hook itself spends on a build's critical path:
//
//   - front: from main to `# accept` written;
//   - back: from the broker's outputs event (or, alone, from the first
//     output staged) to the hook's exit, register-validity included;
//
// and of every step between two marks (the time from one mark to the next,
// named "a→b"), in the order they first appear.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"
)

type line struct {
	Attrs map[string]string `json:"attrs"`
	Steps [][2]any          `json:"steps"`
}

type group struct {
	hooks, accepted int
	spans           map[string][]time.Duration
	order           []string
}

func (g *group) add(name string, d time.Duration) {
	if _, ok := g.spans[name]; !ok {
		g.order = append(g.order, name)
	}
	g.spans[name] = append(g.spans[name], d)
}

var runNumber = regexp.MustCompile(`-[0-9]+\.hook-times\.jsonl$`)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: hooktimes FILE.jsonl…")
		os.Exit(2)
	}
	groups := map[string]*group{}
	var names []string
	for _, file := range os.Args[1:] {
		name := runNumber.ReplaceAllString(filepath.Base(file), "")
		name = strings.TrimSuffix(name, ".jsonl")
		g := groups[name]
		if g == nil {
			g = &group{spans: map[string][]time.Duration{}}
			groups[name] = g
			names = append(names, name)
		}
		if err := read(file, g); err != nil {
			fmt.Fprintf(os.Stderr, "hooktimes: %s: %v\n", file, err)
			os.Exit(1)
		}
	}
	sort.Strings(names)
	for _, name := range names {
		g := groups[name]
		fmt.Printf("\n%s: %d hook processes, %d accepted a build\n\n", name, g.hooks, g.accepted)
		fmt.Println("| span or step | n | median | p90 |")
		fmt.Println("|---|---|---|---|")
		for _, s := range g.order {
			ds := g.spans[s]
			slices.Sort(ds)
			fmt.Printf("| %s | %d | %s | %s |\n", s, len(ds), ms(quantile(ds, 0.5)), ms(quantile(ds, 0.9)))
		}
	}
}

func read(file string, g *group) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var l line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			return err
		}
		g.hooks++
		at := map[string]time.Duration{}
		var steps []string
		for _, s := range l.Steps {
			name, _ := s[0].(string)
			us, _ := s[1].(float64)
			if _, seen := at[name]; !seen {
				at[name] = time.Duration(us) * time.Microsecond
			}
			steps = append(steps, name)
		}
		acc, ok := at["accept"]
		if !ok {
			continue
		}
		g.accepted++
		g.add("front: main → accept", acc)
		back, ok := at["outputs"]
		if !ok {
			back, ok = at["staged"]
		}
		if exit, done := at["exit"]; ok && done {
			g.add("back: outputs → exit", exit-back)
		}
		prev, prevAt := "main", time.Duration(0)
		for i, name := range steps {
			d := time.Duration(l.Steps[i][1].(float64)) * time.Microsecond
			g.add(prev+" → "+name, d-prevAt)
			prev, prevAt = name, d
		}
	}
	return sc.Err()
}

// quantile of sorted ds, nearest rank.
func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	i := int(q*float64(len(ds))+0.5) - 1
	return ds[max(0, min(i, len(ds)-1))]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d)/float64(time.Millisecond)) }
