package testbed

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// linkExists reports whether the test's namespace has a network interface of that name.
func linkExists(name string) bool {
	return exec.Command(mustTool("ip"), "link", "show", name).Run() == nil
}

// sshWithin runs `true` on b over ssh and reports how it ended within limit.
func sshWithin(b *Builder, limit time.Duration) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	cmd := b.sshCommand(ctx, "true")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	if err != nil && ctx.Err() != nil {
		err = ctx.Err()
	} else if err != nil {
		err = errors.New(strings.TrimSpace(stderr.String()))
	}
	return time.Since(start), err
}

// TestBuilderNetNS: a builder in a network namespace of its own is reached through its
// link; a cut link drops packets silently (no refusal), a restored one works again, a
// shaped one is slow, and Stop leaves nothing behind.
func TestBuilderNetNS(t *testing.T) {
	for _, n := range All(t)[:min(2, len(All(t)))] { // the host's Nix and a chroot one
		t.Run(n.Version, func(t *testing.T) {
			b := StartBuilder(t, n, WithNetNS())
			l := b.net
			if !strings.HasPrefix(b.Addr, "10.213.") {
				t.Errorf("builder at %s, want 10.213.x.y", b.Addr)
			}
			if out := b.Run(t, "cat", "/proc/net/dev"); !strings.Contains(out, l.peerIf) {
				t.Errorf("a session does not see the builder's end %s:\n%s", l.peerIf, out)
			}
			if _, err := os.Stat(netnsDir + "/" + l.name); err != nil {
				t.Errorf("network namespace: %v", err)
			}

			b.CutLink()
			took, err := sshWithin(b, 2*time.Second)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("ssh over a cut link ended after %v with %v, want a hang until our 2 s deadline", took, err)
			}
			b.RestoreLink()
			if took, err := sshWithin(b, 20*time.Second); err != nil {
				t.Errorf("ssh after RestoreLink: %v (after %v)", err, took)
			}

			// 1 MiB at 2 Mbit/s takes 4 s or more; without shaping, well under a second.
			b.ShapeLink(2_000_000, 16_000)
			start := time.Now()
			cmd := b.SSH("head -c 1048576 /dev/zero")
			out, err := cmd.Output()
			took = time.Since(start)
			if err != nil || len(out) != 1<<20 {
				t.Errorf("1 MiB over a shaped link: %d bytes, %v", len(out), err)
			}
			t.Logf("1 MiB over a 2 Mbit/s link with a 16 kB queue: %v", took.Round(time.Millisecond))
			if took < 3*time.Second {
				t.Errorf("1 MiB over a 2 Mbit/s link took %v, want at least 3 s", took)
			}
			t.Logf("the shaped link dropped %d packets", b.LinkDrops())
			b.RestoreLink()

			b.Stop()
			if linkExists(l.hostIf) {
				t.Errorf("%s survives Stop", l.hostIf)
			}
			if _, err := os.Stat(netnsDir + "/" + l.name); err == nil {
				t.Errorf("network namespace %s survives Stop", l.name)
			}
			if out, _ := exec.Command(mustTool("ip"), "route", "show", l.network).Output(); len(bytes.TrimSpace(out)) > 0 {
				t.Errorf("routes to %s survive Stop: %s", l.network, out)
			}
		})
	}
}

// TestReapNets: the namespace and link of a test process that died are removed; ours
// stay.
func TestReapNets(t *testing.T) {
	RequireRoot(t)
	if _, err := lookTool("ip"); err != nil {
		unavailable(t, "testbed: no ip: apt-get install iproute2")
	}
	// Owner "2147483646.7" names no process: the owner is dead.
	dead := newNetLink(netSubnets-1, "2147483646.7")
	if err := dead.create(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = dead.remove() })
	mine, lock, err := reserveNet()
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()
	defer mine.remove()
	// Another test process's first RequireRoot may remove the dead owner's namespace
	// before this call does, so the count says nothing; that it is gone does.
	if _, err := reapNets(); err != nil {
		t.Errorf("reapNets: %v", err)
	}
	if linkExists(dead.hostIf) {
		t.Errorf("the dead owner's %s survives reapNets", dead.hostIf)
	}
	if _, err := os.Stat(netnsDir + "/" + dead.name); err == nil {
		t.Errorf("the dead owner's %s survives reapNets", dead.name)
	}
	if !linkExists(mine.hostIf) {
		t.Errorf("reapNets removed %s, whose owner lives", mine.hostIf)
	}
}

// TestBuilderNixTmpfs: a builder with a small tmpfs as /nix runs out of space.
func TestBuilderNixTmpfs(t *testing.T) {
	b := StartBuilder(t, All(t)[0], WithNixTmpfs(16<<20))
	cmd := b.SSH("head -c 33554432 /dev/zero > /nix/big")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err == nil || !strings.Contains(stderr.String(), "No space left on device") {
		t.Errorf("writing 32 MiB to a 16 MiB /nix: %v, %q", err, stderr.String())
	}
	if _, err := os.Stat(b.Dir + "/nix/big"); err == nil {
		t.Errorf("the tmpfs store reached Dir/nix")
	}
}
