package testbed

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestBuilderWithRTT: a builder behind the delay proxy is reached through it, every
// round trip to it costs the RTT, and the proxy counts them. A plain and a
// network-namespace builder, since the proxy listens elsewhere for the latter.
func TestBuilderWithRTT(t *testing.T) {
	nix := All(t)[0]
	const rtt = 80 * time.Millisecond
	for _, c := range []struct {
		name string
		opts []BuilderOption
	}{
		{"loopback", []BuilderOption{WithRTT(rtt)}},
		{"netns", []BuilderOption{WithRTT(rtt), WithNetNS()}},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := StartBuilder(t, nix, c.opts...)
			if !strings.HasPrefix(b.Addr, "127.") {
				t.Errorf("Addr %s: want the proxy's loopback address", b.Addr)
			}
			before := b.LinkStats()
			t0 := time.Now()
			if out := b.Run(t, "echo", "hello"); out != "hello\n" {
				t.Fatalf("ssh %s echo hello = %q", b.Name, out)
			}
			took := time.Since(t0)
			st := b.LinkStats()
			turns := st.Turns - before.Turns
			// An OpenSSH login and a command: version exchange, key exchange, service
			// request, authentication (query, then signature), channel, exec: at least 6
			// round trips, each at least rtt.
			if turns < 6 || took < time.Duration(turns)*rtt*3/4 {
				t.Errorf("ssh echo through a %v proxy: %d round trips in %v; want at least 6, each about %v", rtt, turns, took, rtt)
			}
			if st.Conns != before.Conns+1 || st.Up <= before.Up || st.Down <= before.Down {
				t.Errorf("LinkStats %+v after %+v: want one more connection and bytes both ways", st, before)
			}
			t.Logf("ssh %s echo hello through %v RTT: %v, %d round trips", b.Name, rtt, took.Round(time.Millisecond), turns)
		})
	}
}

// TestInitStore: an initialised store has what Nix creates on first use, so that
// processes opening it at once do not race to create it.
func TestInitStore(t *testing.T) {
	for _, nix := range All(t) {
		t.Run(nix.Series(), func(t *testing.T) {
			store := NewStore(t)
			nix.InitStore(t, store)
			// What Nix 2.8 races on; newer Nix makes no profiles link.
			if fi, err := os.Stat(filepath.Join(store, "var/nix/gcroots")); err != nil || !fi.IsDir() {
				t.Errorf("no gcroots directory: %v", err)
			}
			if _, err := os.Stat(filepath.Join(store, "var/nix/db/db.sqlite")); err != nil {
				t.Errorf("no database: %v", err)
			}
			// On a fresh store, about 1 in 25 of four processes started together fails on
			// Nix 2.8 ("creating symlink … File exists"); here none may.
			var wg sync.WaitGroup
			errs := make([]string, 4)
			for i := range errs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if out, err := nix.Command(store, nil, "nix-store", "--init").CombinedOutput(); err != nil {
						errs[i] = err.Error() + ": " + string(out)
					}
				}()
			}
			wg.Wait()
			for _, e := range errs {
				if e != "" {
					t.Errorf("nix-store --init on an initialised store: %s", e)
				}
			}
		})
	}
}
