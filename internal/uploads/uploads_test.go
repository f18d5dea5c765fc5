package uploads

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// Builds that need the same path on one machine send it once; the others
// wait for that upload and take over if it fails.
func TestUploadsSendAPathOnce(t *testing.T) {
	u := New(4)
	ctx := context.Background()
	var uploads atomic.Int32
	release := make(chan struct{})
	var wg sync.WaitGroup
	for range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			up, done, err := u.Claim(ctx, "/nix/store/p")
			if err != nil {
				t.Error(err)
				return
			}
			if up {
				uploads.Add(1)
				<-release
				done(nil)
			}
		}()
	}
	// Every other claim waits for the one upload before it ends.
	testbed.WaitFor(t, 10*time.Second, "9 claims waiting for the upload", func() bool { return u.Waiting("/nix/store/p") == 9 })
	close(release)
	wg.Wait()
	if n := uploads.Load(); n != 1 {
		t.Errorf("%d uploads of one path by 10 builds, want 1", n)
	}

	// A failed upload hands the path to a waiting build.
	up, done, _ := u.Claim(ctx, "/nix/store/q")
	if !up {
		t.Fatal("first claim of q does not upload")
	}
	got := make(chan bool)
	go func() {
		up, done2, err := u.Claim(ctx, "/nix/store/q")
		if err == nil && up {
			done2(nil)
		}
		got <- up
	}()
	// Fail the upload only once the other claim waits for it: had it come later, it
	// would upload anyway, and the test would show nothing.
	testbed.WaitFor(t, 10*time.Second, "a claim waiting for q", func() bool { return u.Waiting("/nix/store/q") == 1 })
	done(errors.New("connection lost"))
	if !<-got {
		t.Error("after a failed upload the waiting build did not take over")
	}
}

// The number of parallel upload streams to a machine is bounded.
func TestUploadsBoundStreams(t *testing.T) {
	u := New(2)
	ctx := context.Background()
	_, d1, _ := u.Claim(ctx, "/nix/store/a")
	_, d2, _ := u.Claim(ctx, "/nix/store/b")
	short, cancel := context.WithTimeout(ctx, 30*time.Millisecond)
	defer cancel()
	if _, _, err := u.Claim(short, "/nix/store/c"); err == nil {
		t.Error("a third stream started while two were running")
	}
	d1(nil)
	if up, d3, err := u.Claim(ctx, "/nix/store/c"); err != nil || !up {
		t.Errorf("after one stream ended: upload %v, %v", up, err)
	} else {
		d3(nil)
	}
	d2(nil)
}

// The machine's valid table knows a path once it was seen valid there
// (sent and accepted, found by a query, built there), not while it is on
// its way, and forgets it when it is found gone.
func TestUploadsKnowWhatIsValid(t *testing.T) {
	u := New(1)
	tr := For(nil, u)
	const a, b = "/nix/store/a", "/nix/store/b"
	_, done, err := u.Claim(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	if tr.Known([]string{a}) {
		t.Error("a path on its way is known")
	}
	done(nil)
	tr.Present([]string{a, b})
	if !tr.Known([]string{a, b}) {
		t.Error("paths built there are not known")
	}
	tr.Forget([]string{b})
	if tr.Known([]string{a, b}) || !tr.Known([]string{a}) {
		t.Error("a path found gone is still known, or forgetting it forgot another")
	}
}

// ClaimAll claims a whole flight of paths with one stream, or nothing if
// another build is sending one of them; a build claiming one of its paths
// waits for that flight, and the stream is free once every path is done.
func TestUploadsClaimAll(t *testing.T) {
	u := New(2)
	ctx := context.Background()
	a, b, c := "/nix/store/a", "/nix/store/b", "/nix/store/c"
	ok, done, err := u.ClaimAll(ctx, []string{a, b})
	if err != nil || !ok {
		t.Fatalf("ClaimAll of free paths: %v, %v", ok, err)
	}
	// Another build needs b: it waits for this flight, and then b is sent.
	got := make(chan bool)
	go func() {
		up, _, err := u.Claim(ctx, b)
		if err != nil {
			t.Error(err)
		}
		got <- up
	}()
	testbed.WaitFor(t, 10*time.Second, "a claim waiting for b", func() bool { return u.Waiting(b) == 1 })
	// A flight with a path another flight is sending claims nothing, and
	// gives its stream back at once.
	for range 3 {
		if ok, _, err := u.ClaimAll(ctx, []string{c, a}); ok || err != nil {
			t.Fatalf("ClaimAll of a path in flight: %v, %v", ok, err)
		}
	}
	done(a, nil)
	done(a, errors.New("told twice: ignored"))
	done(b, nil)
	if up := <-got; up {
		t.Error("b was claimed again after the flight sent it")
	}
	// Both streams are free again, and nothing is claimed.
	ok1, done1, err1 := u.ClaimAll(ctx, []string{c, a})
	ok2, done2, err2 := u.ClaimAll(ctx, []string{b})
	if !ok1 || !ok2 || err1 != nil || err2 != nil {
		t.Fatalf("two flights after the first: %v %v, %v %v", ok1, err1, ok2, err2)
	}
	// With both streams taken, a cancelled wait for one claims nothing.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if ok, _, err := u.ClaimAll(cctx, []string{"/nix/store/d"}); ok || !errors.Is(err, context.Canceled) {
		t.Errorf("ClaimAll with the streams taken and ctx cancelled: %v, %v", ok, err)
	}
	done1(c, nil)
	done1(a, nil)
	done2(b, nil)
}
