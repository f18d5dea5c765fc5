package main

// Faults on the test bed: builders that die, links that are cut or lossy,
// a broker restarted under running builds, an interrupted nix-build, a full
// disk and a silent build. Each test checks what a user sees: the exit
// status and the words of the message, and that nothing hangs (every wait
// has a generous bound that fails with what was seen so far).
//
// The bed's kernel has no netem (and no tc classifiers or actions, nor
// iptables or nft), so a lossy link is a tbf qdisc with a small rate and a
// small queue (tail drops, hence real TCP retransmissions, and queueing
// delay), and a cut link is the builder's end of its veth pair taken down:
// packets vanish and nobody sends a reset (see internal/testbed/netns.go).

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

// faultMachine is one builder in a fault test's configuration.
type faultMachine struct {
	b     *testbed.Builder
	slots int
	extra string // more lines for its [[machine]] table
}

// newFaultEnv writes offload.toml for the machines; keepAlive, if set, is
// [ssh] server-alive-interval, so that a dead link is noticed within a
// test's patience.
func newFaultEnv(t *testing.T, keepAlive string, ms ...faultMachine) offloadEnv {
	t.Helper()
	dir := t.TempDir()
	var cfg strings.Builder
	// A socket of the test's own: on the default one a broker of the machine could answer.
	socket := filepath.Join(dir, "hook.sock")
	fmt.Fprintf(&cfg, "[daemon]\nsocket = %q\nstate-dir = %q\n\n", socket, filepath.Join(dir, "state"))
	if keepAlive != "" {
		fmt.Fprintf(&cfg, "[ssh]\nserver-alive-interval = %q\n\n", keepAlive)
	}
	mounts := []string{dir, filepath.Dir(testbed.HookBinary(t))}
	for _, m := range ms {
		cfg.WriteString(machineTOML(m.b, true))
		fmt.Fprintf(&cfg, "parallel-builds = %d\n%s\n", m.slots, m.extra)
		mounts = append(mounts, filepath.Dir(m.b.ClientKey))
	}
	p := filepath.Join(dir, "offload.toml")
	if err := os.WriteFile(p, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return offloadEnv{dir: dir, config: p, socket: socket, mounts: mounts}
}

// withBroker starts a broker for store on the socket env's configuration
// names.
func withBroker(t *testing.T, nix testbed.Nix, store string, env offloadEnv) *brokerEnv {
	t.Helper()
	e := &brokerEnv{offloadEnv: env}
	e.start(t, nix, store)
	return e
}

// bgBuild is a nix-build running in the background.
type bgBuild struct {
	cmd            *exec.Cmd
	stdout, stderr syncBuffer
	done           chan struct{}
	err            error
}

// startBuild starts nix-build with our hook and everything offloaded.
func startBuild(t *testing.T, nix testbed.Nix, store string, env offloadEnv, args ...string) *bgBuild {
	t.Helper()
	argv := append([]string{"nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", testbed.HookBinary(t), "--option", "substituters", ""}, args...)
	bb := &bgBuild{cmd: nix.Command(store, env.mounts, argv...), done: make(chan struct{})}
	bb.cmd.Env = append(bb.cmd.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	bb.cmd.Stdout, bb.cmd.Stderr = &bb.stdout, &bb.stderr
	if err := bb.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(bb.cmd); <-bb.done })
	go func() {
		bb.err = bb.cmd.Wait()
		close(bb.done)
	}()
	return bb
}

// wait returns nix-build's outputs, stderr and error once it has exited,
// and fails the test if it is still running after limit: a bound on a
// hang, not a timing assertion.
func (bb *bgBuild) wait(t *testing.T, limit time.Duration) (string, string, error) {
	t.Helper()
	select {
	case <-bb.done:
	case <-time.After(limit):
		testbed.KillCommand(bb.cmd)
		t.Fatalf("nix-build still running after %v (a hang); it said:\n%s", limit, bb.stderr.String())
	}
	return strings.TrimSpace(bb.stdout.String()), bb.stderr.String(), bb.err
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// markedExpr builds in a moment, except on a machine whose store has the
// file .slow, where it sleeps until it is killed: a test removes the mark
// from the machine that should finish the build.
func markedExpr(salt string) string {
	return fmt.Sprintf(`derivation { name = "marked"; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
		args = ["-c" "echo started; if [ -e /nix/.slow ]; then /bin/sleep 300; fi; echo finished; echo done > $out"]; }`, salt)
}

func mark(t *testing.T, b *testbed.Builder, slow bool) {
	t.Helper()
	p := filepath.Join(b.Dir, "nix", ".slow")
	var err error
	if slow {
		err = os.WriteFile(p, nil, 0o644)
	} else {
		err = os.Remove(p)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// runningOn waits until one of the builders runs a sleeper and returns it
// and the other one.
func runningOn(t *testing.T, b1, b2 *testbed.Builder) (busy, other *testbed.Builder) {
	t.Helper()
	testbed.WaitFor(t, time.Minute, "the build to run on a builder", func() bool {
		return len(sleepers(b1)) > 0 || len(sleepers(b2)) > 0
	})
	if len(sleepers(b1)) > 0 {
		return b1, b2
	}
	return b2, b1
}

// TestFaultMachineLostMidBuild: the machine running a build dies (every
// process killed) or its link is cut (packets vanish); with another capable
// machine the build finishes there, through the broker and in embedded
// mode, and the log says which machine was lost.
func TestFaultMachineLostMidBuild(t *testing.T) {
	for _, mode := range []string{"broker", "embedded"} {
		for _, fault := range []string{"killed", "cut link"} {
			t.Run(mode+"/"+fault, func(t *testing.T) {
				local := testbed.Lookup(t, "2.8")
				var opts []testbed.BuilderOption
				if fault == "cut link" {
					opts = append(opts, testbed.WithNetNS())
				}
				b1 := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"), opts...)
				b2 := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"), opts...)
				mark(t, b1, true)
				mark(t, b2, true)
				store := testbed.NewStore(t)
				env := newFaultEnv(t, "1s", faultMachine{b: b1, slots: 2}, faultMachine{b: b2, slots: 2})
				var broker *brokerEnv
				if mode == "broker" {
					broker = withBroker(t, local, store, env)
				}
				expr := env.writeExpr(t, markedExpr(randomHex(8)))
				bb := startBuild(t, local, store, env, expr)
				busy, other := runningOn(t, b1, b2)
				mark(t, other, false)
				faulted := time.Now()
				if fault == "killed" {
					busy.Kill()
				} else {
					busy.CutLink()
				}
				out, errOut, err := bb.wait(t, time.Minute)
				took := time.Since(faulted)
				t.Logf("nix-build said:\n%s", errOut)
				t.Logf("%s %s (%s): nix-build done %v later", busy.Name, fault, mode, took.Round(time.Millisecond))
				if err != nil {
					t.Fatalf("nix-build failed although %s could build it: %v", machineName(other), err)
				}
				if got := storeFile(t, store, out); got != "done" {
					t.Errorf("output %q, want done", got)
				}
				runNix(t, local, store, env, "nix-store", "--verify-path", out)
				want := fmt.Sprintf("lost '%s' while building", machineName(busy))
				if !strings.Contains(errOut, want) || !strings.Contains(errOut, "trying another machine") {
					t.Errorf("nix-build's log lacks %q … trying another machine", want)
				}
				if fault == "cut link" {
					// A dead link ends the stream without a word: the
					// message must say why the connection was given up.
					if want := machineName(busy) + " stopped answering: no reply to 3 keepalives"; !strings.Contains(errOut, want) {
						t.Errorf("nix-build's log lacks %q", want)
					}
					if took > 30*time.Second {
						t.Errorf("a cut link was noticed only %v later, with keepalives every second", took)
					}
				}
				if broker != nil {
					st := broker.status(t)
					for _, m := range st.Machines {
						if m.Name == machineName(other) && m.Builds != 1 {
							t.Errorf("status: %s has %d builds, want 1", m.Name, m.Builds)
						}
					}
					if used := slotsUsed(st); used != 0 {
						t.Errorf("status: %d slots used after the build", used)
					}
				}
			})
		}
	}
}

// TestFaultLossyLink: inputs and outputs of a few MiB cross a slow link
// that drops what does not fit in a small queue. The build finishes there,
// or on the other machine after a clear message; it never hangs, and the
// output is whole (its NAR hash checks).
func TestFaultLossyLink(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	slow := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"), testbed.WithNetNS())
	spare := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"))
	store := testbed.NewStore(t)
	// The lossy machine is the fast one, so it is tried first.
	env := newFaultEnv(t, "2s", faultMachine{b: slow, slots: 2, extra: "speed = 10.0"}, faultMachine{b: spare, slots: 2})
	broker := withBroker(t, local, store, env)

	blob := make([]byte, 3<<20)
	rand.Read(blob)
	if err := os.WriteFile(filepath.Join(env.dir, "blob.bin"), blob, 0o644); err != nil {
		t.Fatal(err)
	}
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "copied"; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
		args = ["-c" "echo copying; /bin/cat ${./blob.bin} > $out; /usr/bin/head -c 3145728 /dev/urandom >> $out"]; }`, randomHex(8)))
	// 24 Mbit/s, at most 8 full packets queued: 6 MiB cross it in about 2 s
	// without loss.
	slow.ShapeLink(24_000_000, 12_000)
	start := time.Now()
	bb := startBuild(t, local, store, env, expr)
	out, errOut, err := bb.wait(t, 2*time.Minute)
	took := time.Since(start)
	t.Logf("nix-build said:\n%s", errOut)
	if err != nil {
		t.Fatalf("nix-build over a lossy link: %v", err)
	}
	runNix(t, local, store, env, "nix-store", "--verify-path", out)
	got, err := os.ReadFile(filepath.Join(store, strings.TrimPrefix(out, "/nix/")))
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 6<<20 || !bytes.Equal(got[:len(blob)], blob) {
		t.Errorf("output has %d bytes, want 6 MiB starting with the input", len(got))
	}
	where := machineName(slow)
	if strings.Contains(errOut, "trying another machine") {
		if !strings.Contains(errOut, "lost '"+machineName(slow)+"'") {
			t.Errorf("failed over without naming the lossy machine")
		}
		where = machineName(spare)
	}
	st := broker.status(t)
	for _, m := range st.Machines {
		if m.Name == where && m.Builds != 1 {
			t.Errorf("status: %s has %d builds, want 1 (%+v)", m.Name, m.Builds, st.Machines)
		}
	}
	drops := slow.LinkDrops()
	t.Logf("3 MiB in and 6 MiB out over a 24 Mbit/s link with an 8-packet queue: %v, %d packets dropped, built on %s",
		took.Round(time.Millisecond), drops, where)
	if drops == 0 {
		t.Errorf("the link dropped nothing: the test did not test a lossy link")
	}
}

// TestFaultBrokerRestart: the broker stops (SIGTERM) or dies (SIGKILL)
// while builds run. Running hooks finish through it or go on without it,
// nix-build succeeds, and once the broker is back new builds go through
// it.
func TestFaultBrokerRestart(t *testing.T) {
	for sig, name := range map[syscall.Signal]string{syscall.SIGTERM: "SIGTERM", syscall.SIGKILL: "SIGKILL"} {
		t.Run(name, func(t *testing.T) {
			local := testbed.Lookup(t, "2.8")
			b := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"))
			store := testbed.NewStore(t)
			env := newFaultEnv(t, "", faultMachine{b: b, slots: 2})
			broker := withBroker(t, local, store, env)
			slowSet := func(salt string) string {
				return env.writeExpr(t, fmt.Sprintf(`let mk = n: derivation { name = "slow${n}"; salt = %q; system = "x86_64-linux";
					builder = "/bin/sh"; args = ["-c" "echo slow ${n}; /bin/sleep 3; echo ${n} > $out"]; };
					in [ (mk "1") (mk "2") (mk "3") ]`, salt))
			}
			bb := startBuild(t, local, store, env, slowSet(randomHex(8)))
			testbed.WaitFor(t, time.Minute, "two builds running and one queued", func() bool {
				st := broker.status(t)
				return st.Running == 3 && slotsUsed(st) == 2
			})
			if sig == syscall.SIGTERM {
				broker.stop(t)
			} else {
				testbed.KillCommand(broker.cmd)
				broker.cmd.Wait()
			}
			stopped := time.Now()
			broker.start(t, local, store)
			t.Logf("broker back %v after %s", time.Since(stopped).Round(time.Millisecond), name)

			out, errOut, err := bb.wait(t, time.Minute)
			t.Logf("nix-build across the restart said:\n%s", errOut)
			if err != nil {
				t.Fatalf("nix-build across a broker %s: %v", name, err)
			}
			if outs := strings.Fields(out); len(outs) != 3 {
				t.Errorf("outputs %q, want 3", outs)
			}
			switch sig {
			case syscall.SIGTERM:
				if !strings.Contains(errOut, "the broker gave '") {
					t.Errorf("the queued build was not handed back")
				}
			case syscall.SIGKILL:
				if !strings.Contains(errOut, "going on without it") || !strings.Contains(errOut, "without the broker") {
					t.Errorf("the hooks did not say they went on without the broker")
				}
			}

			// New builds go through the new broker.
			out, errOut, err = startBuild(t, local, store, env, env.writeExpr(t, graphExpr(randomHex(8)))).wait(t, time.Minute)
			if err != nil {
				t.Fatalf("nix-build after the restart: %v\n%s", err, errOut)
			}
			if got := storeFile(t, store, out); got != graphRoot {
				t.Errorf("root output %q", got)
			}
			if strings.Contains(errOut, "going on without it") || strings.Contains(errOut, "without the broker") {
				t.Errorf("a build after the restart did not use the new broker:\n%s", errOut)
			}
			if st := broker.status(t); len(st.Machines) != 1 || st.Machines[0].Builds != 8 {
				t.Errorf("new broker's status: %+v, want the 8 new builds", st.Machines)
			}
		})
	}
}

// TestFaultInterruptThroughBroker: Ctrl-C on nix-build stops the remote
// build and frees the broker's slot within a second.
func TestFaultInterruptThroughBroker(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"))
	store := testbed.NewStore(t)
	env := newFaultEnv(t, "", faultMachine{b: b, slots: 2})
	broker := withBroker(t, local, store, env)
	mark(t, b, true)
	bb := startBuild(t, local, store, env, env.writeExpr(t, markedExpr(randomHex(8))))
	testbed.WaitFor(t, time.Minute, "the build to run on the builder", func() bool { return len(sleepers(b)) > 0 })
	if used := slotsUsed(broker.status(t)); used != 1 {
		t.Errorf("%d slots used during the build, want 1", used)
	}
	// Ctrl-C: SIGINT to nix-build's process group.
	syscall.Kill(-bb.cmd.Process.Pid, syscall.SIGINT)
	interrupted := time.Now()
	var exited, gone, freed time.Duration
	testbed.WaitFor(t, 10*time.Second, "nix-build to exit, the remote build to stop and the slot to be free", func() bool {
		if exited == 0 {
			select {
			case <-bb.done:
				exited = time.Since(interrupted)
			default:
			}
		}
		if gone == 0 && len(sleepers(b)) == 0 {
			gone = time.Since(interrupted)
		}
		if freed == 0 && slotsUsed(broker.status(t)) == 0 {
			freed = time.Since(interrupted)
		}
		return exited > 0 && gone > 0 && freed > 0
	})
	t.Logf("after SIGINT: nix-build exited %v, remote build gone %v, slot free %v", exited.Round(time.Millisecond),
		gone.Round(time.Millisecond), freed.Round(time.Millisecond))
	if gone > time.Second || freed > time.Second {
		t.Errorf("remote build gone %v and slot free %v after Ctrl-C, want both within a second", gone, freed)
	}
	if code := exitCode(bb.err); code == 0 {
		t.Errorf("an interrupted nix-build exited 0")
	}
}

// TestFaultFullDisk: a builder whose disk is full fails the build with the
// machine's own words and names the machine; nothing is left in the local
// store.
func TestFaultFullDisk(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.26"), testbed.WithNixTmpfs(32<<20))
	store := testbed.NewStore(t)
	env := newFaultEnv(t, "", faultMachine{b: b, slots: 2})
	withBroker(t, local, store, env)

	t.Run("output", func(t *testing.T) {
		expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "huge"; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
			args = ["-c" "echo filling the disk; /usr/bin/head -c 67108864 /dev/zero > $out"]; }`, randomHex(8)))
		drv := strings.TrimSpace(runNix(t, local, store, env, "nix-instantiate", expr))
		outPath := strings.TrimSpace(runNix(t, local, store, env, "nix-store", "-q", "--outputs", drv))
		_, errOut, err := startBuild(t, local, store, env, drv).wait(t, time.Minute)
		t.Logf("nix-build said:\n%s", errOut)
		if err == nil {
			t.Fatal("a build that overfills its machine's disk succeeded")
		}
		if code := exitCode(err); code != 100 {
			t.Errorf("nix-build exit %d, want 100 (build failure)", code)
		}
		for _, want := range []string{"No space left on device", "on '" + machineName(b) + "' failed"} {
			if !strings.Contains(errOut, want) {
				t.Errorf("nix-build's message lacks %q", want)
			}
		}
		assertAbsent(t, local, store, env, outPath)
	})

	t.Run("inputs", func(t *testing.T) {
		big := make([]byte, 40<<20)
		rand.Read(big)
		if err := os.WriteFile(filepath.Join(env.dir, "big.bin"), big, 0o644); err != nil {
			t.Fatal(err)
		}
		expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "big-input"; salt = %q; system = "x86_64-linux"; builder = "/bin/sh";
			args = ["-c" "read x < ${./big.bin}; echo > $out"]; }`, randomHex(8)))
		drv := strings.TrimSpace(runNix(t, local, store, env, "nix-instantiate", expr))
		outPath := strings.TrimSpace(runNix(t, local, store, env, "nix-store", "-q", "--outputs", drv))
		_, errOut, err := startBuild(t, local, store, env, drv).wait(t, time.Minute)
		t.Logf("nix-build said:\n%s", errOut)
		if err == nil {
			t.Fatal("a build whose inputs overfill its machine's disk succeeded")
		}
		for _, want := range []string{"No space left on device", machineName(b)} {
			if !strings.Contains(errOut, want) {
				t.Errorf("nix-build's message lacks %q", want)
			}
		}
		assertAbsent(t, local, store, env, outPath)
	})
}

// assertAbsent checks that a store path is neither valid nor on disk in
// the local store.
func assertAbsent(t *testing.T, nix testbed.Nix, store string, env offloadEnv, path string) {
	t.Helper()
	if _, err := os.Lstat(filepath.Join(store, strings.TrimPrefix(path, "/nix/"))); err == nil {
		t.Errorf("%s exists in the local store after the failure", path)
	}
	cmd := nix.Command(store, env.mounts, "nix-store", "--check-validity", path)
	if err := cmd.Run(); err == nil {
		t.Errorf("%s is valid in the local store after the failure", path)
	}
}

// TestFaultSilentBuildThroughBroker: max-silent-time reaches the machine
// through the broker; the build stops with a clear message and Nix's
// timeout status.
func TestFaultSilentBuildThroughBroker(t *testing.T) {
	local := testbed.Lookup(t, "2.8")
	b := testbed.StartBuilder(t, testbed.Lookup(t, "2.34"))
	store := testbed.NewStore(t)
	env := newFaultEnv(t, "", faultMachine{b: b, slots: 2})
	broker := withBroker(t, local, store, env)
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "silent"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo going quiet; /bin/sleep 60; echo > $out"]; }`, randomHex(8)))
	start := time.Now()
	_, errOut, err := startBuild(t, local, store, env, "--option", "max-silent-time", "2", expr).wait(t, time.Minute)
	t.Logf("failed after %v; nix-build said:\n%s", time.Since(start).Round(time.Millisecond), errOut)
	if err == nil {
		t.Fatal("a silent build succeeded despite max-silent-time")
	}
	if code := exitCode(err); code != 101 {
		t.Errorf("nix-build exit %d, want 101 (timed out)", code)
	}
	if !strings.Contains(errOut, "silence") && !strings.Contains(errOut, "timed out") {
		t.Errorf("no timeout reason in nix-build's message")
	}
	if !strings.Contains(errOut, machineName(b)) {
		t.Errorf("the timeout does not name the machine")
	}
	testbed.WaitFor(t, 10*time.Second, "the remote build to stop", func() bool { return len(sleepers(b)) == 0 })
	testbed.WaitFor(t, 10*time.Second, "the slot to be free", func() bool { return slotsUsed(broker.status(t)) == 0 })
}
