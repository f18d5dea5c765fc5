package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/testbed"
)

const socketActivateTool = "/usr/bin/systemd-socket-activate"

// notifySocket is a stand-in for systemd's notification socket (NOTIFY_SOCKET): it collects
// every state the broker sends.
type notifySocket struct {
	path string
	mu   sync.Mutex
	msgs []string
}

func newNotifySocket(t *testing.T, path string) *notifySocket {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n := &notifySocket{path: path}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			k, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Close(); <-done })
	return n
}

// count returns how many messages contain s.
func (n *notifySocket) count(s string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	k := 0
	for _, m := range n.msgs {
		if strings.Contains(m, s) {
			k++
		}
	}
	return k
}

func (n *notifySocket) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.msgs)
}

// TestUnitsSocketActivation runs the broker the way systemd/nix-offload.socket and
// nix-offload.service say, with systemd's own socket-activation tool standing in for systemd
// (the test bed has no systemd as PID 1): ExecStart=, Environment= and WatchdogSec= from the
// service, ListenStream= and FileDescriptorName= from the socket. It proves that
//   - nothing runs before the first connection: the tool holds the socket alone;
//   - the first hook connection starts the broker, which answers that very connection;
//   - the broker says READY=1 and pings the watchdog (Type=notify, WatchdogSec=; the interval
//     is scaled down from the unit's so that the test sees pings);
//   - a real nix-build through nix-daemon and the hook is built by the activated broker, which
//     reads the local store through nix-daemon (Environment=NIX_REMOTE=daemon);
//   - SIGTERM stops it cleanly (exit 0, STOPPING=1).
//
// What the tool cannot show: ListenStream='s path (the test puts the same path under its own
// directory rather than the host's /run), SocketUser/Group/Mode and DirectoryMode (the broker
// checks each peer's uid itself, tested in internal/broker), RemoveOnStop, Requires/After,
// Restart=, KillMode=, TimeoutStopSec=, StateDirectory= and the sandboxing directives, which
// need systemd as PID 1; systemd-analyze verify checks their syntax (TestMakeInstall), and
// TestServiceWritesNixLogDir that ReadWritePaths= names the log directory the broker writes.
func TestUnitsSocketActivation(t *testing.T) {
	nix := testbed.Lookup(t, "2.8")
	if _, err := os.Stat(socketActivateTool); err != nil {
		testbed.Unavailable(t, "%s is not installed: %v; hint: apt-get install systemd", socketActivateTool, err)
	}
	root := repoRoot(t)
	service := parseUnitFile(t, filepath.Join(root, "systemd", "nix-offload.service"))["Service"]
	socket := parseUnitFile(t, filepath.Join(root, "systemd", "nix-offload.socket"))["Socket"]
	one := func(unit map[string][]string, key string) string {
		t.Helper()
		if len(unit[key]) != 1 {
			t.Fatalf("the unit has %d %s= lines, want 1", len(unit[key]), key)
		}
		return unit[key][0]
	}
	execStart := strings.Fields(one(service, "ExecStart"))
	if execStart[0] != "/usr/local/bin/nix-offload-hook" {
		t.Fatalf("ExecStart= runs %s, want /usr/local/bin/nix-offload-hook (the Makefile and the NixOS module replace that path)", execStart[0])
	}
	listen := one(socket, "ListenStream")
	fdName := one(socket, "FileDescriptorName")
	if _, err := time.ParseDuration(one(service, "WatchdogSec")); err != nil {
		t.Fatalf("WatchdogSec=: %v", err)
	}

	b := testbed.StartBuilder(t, nix)
	env := newOffloadEnv(t, "", b)
	sockPath := filepath.Join(env.dir, listen)
	if err := os.MkdirAll(filepath.Dir(sockPath), 0o755); err != nil {
		t.Fatal(err)
	}
	cfg, err := os.ReadFile(env.config)
	if err != nil {
		t.Fatal(err)
	}
	// [daemon] socket names the socket unit's path, as the NixOS module and the README's
	// example configuration do.
	cfgText := strings.Replace(string(cfg), fmt.Sprintf("socket = %q\n", env.socket), fmt.Sprintf("socket = %q\n", sockPath), 1)
	if cfgText == string(cfg) {
		t.Fatalf("%s names no socket = %q to replace:\n%s", env.config, env.socket, cfg)
	}
	env.socket = sockPath
	if err := os.WriteFile(env.config, []byte(cfgText), 0o644); err != nil {
		t.Fatal(err)
	}

	store := testbed.NewStore(t)
	daemon := nix.Command(store, env.mounts, "nix-daemon", "--option", "build-hook", testbed.HookBinary(t),
		"--option", "max-jobs", "0", "--option", "substituters", "")
	daemon.Env = append(daemon.Env, "NIX_OFFLOAD_CONFIG="+env.config)
	var daemonLog syncBuffer
	daemon.Stderr = &daemonLog
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { testbed.KillCommand(daemon); daemon.Wait() })
	testbed.WaitFor(t, time.Minute, "nix-daemon's socket", func() bool {
		_, err := os.Stat(filepath.Join(store, "var/nix/daemon-socket/socket"))
		return err == nil
	})

	notify := newNotifySocket(t, filepath.Join(env.dir, "notify.sock"))
	const watchdog = time.Second
	argv := []string{socketActivateTool, "-l", sockPath, "--fdname=" + fdName}
	for _, e := range service["Environment"] {
		argv = append(argv, "-E", e)
	}
	// The tool passes on only TERM, PATH, HOME and what -E names, much as systemd starts a
	// service with a clean environment.
	argv = append(argv, "-E", "NIX_OFFLOAD_CONFIG="+env.config, "-E", "NOTIFY_SOCKET="+notify.path,
		"-E", "WATCHDOG_USEC="+strconv.FormatInt(watchdog.Microseconds(), 10),
		"-E", "NIX_CONF_DIR", "-E", "NIX_USER_CONF_FILES", testbed.HookBinary(t))
	argv = append(argv, execStart[1:]...)
	act := nix.Command(store, env.mounts, argv...)
	var actLog syncBuffer
	act.Stdout, act.Stderr = &actLog, &actLog
	if err := act.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		testbed.KillCommand(act)
		if t.Failed() {
			t.Logf("systemd-socket-activate and broker log:\n%s\nnix-daemon log:\n%s", actLog.String(), daemonLog.String())
		}
	})
	exe := func() string {
		p, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", act.Process.Pid))
		return p
	}

	testbed.WaitFor(t, time.Minute, "systemd-socket-activate to listen on "+sockPath, func() bool {
		_, err := os.Lstat(sockPath)
		return err == nil && exe() == socketActivateTool
	})
	// An absence needs a window: nothing but a connection may start the
	// broker, and there is no event for "nothing started it". 300 ms is
	// far longer than the broker takes to exec and notify.
	time.Sleep(300 * time.Millisecond)
	if got := exe(); got != socketActivateTool {
		t.Fatalf("before any connection the process is %s, want %s still waiting", got, socketActivateTool)
	}
	if msgs := notify.all(); len(msgs) > 0 {
		t.Fatalf("the broker notified %q before any connection", msgs)
	}

	// The first connection: `nix-offload-hook status`, a client of the broker's API like the
	// hook. It starts the broker, which answers it.
	start := time.Now()
	code, out, errOut := runCLI(t, "status", "-socket", sockPath)
	if code != exitOK || !strings.Contains(out, machineName(b)) {
		t.Fatalf("status, the first connection: exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("first connection answered by the activated broker in %v", time.Since(start).Round(time.Millisecond))
	if got := exe(); got != testbed.HookBinary(t) {
		t.Errorf("after the first connection the process is %s, want the broker %s", got, testbed.HookBinary(t))
	}
	// The datagram may reach the test's reader just after the answer: wait for it.
	testbed.WaitFor(t, 5*time.Second, "READY=1", func() bool { return notify.count("READY=1") > 0 })
	if notify.count("READY=1") != 1 {
		t.Errorf("READY=1 sent %d times, want once; notifications %q", notify.count("READY=1"), notify.all())
	}
	testbed.WaitFor(t, 5*watchdog, "two watchdog pings", func() bool { return notify.count("WATCHDOG=1") >= 2 })

	// A real build, as on a NixOS machine: nix-build → nix-daemon → hook → activated broker.
	expr := env.writeExpr(t, fmt.Sprintf(`derivation { name = "activated"; salt = %q; system = "x86_64-linux";
		builder = "/bin/sh"; args = ["-c" "echo remote log line from activated; echo built remotely > $out"]; }`, randomHex(8)))
	client := nix.Command(store, env.mounts, "nix-build", "--no-out-link", expr)
	client.Env = append(client.Env, "NIX_REMOTE=daemon")
	outPath, buildErr, err := runCmd(client)
	if err != nil {
		t.Fatalf("nix-build through nix-daemon and the activated broker: %v\n%s", err, buildErr)
	}
	if got := storeFile(t, store, outPath); got != "built remotely" {
		t.Errorf("output %q", got)
	}
	if strings.Contains(buildErr, "without the broker") || strings.Contains(buildErr, "going on without it") {
		t.Errorf("the hook did not use the activated broker:\n%s", buildErr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := brokerapi.Dial(ctx, sockPath)
	if err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	c.Close()
	if err != nil || len(st.Machines) != 1 || st.Machines[0].Builds != 1 {
		t.Errorf("status after the build: %+v, %v; want 1 build on the machine", st, err)
	}

	// SIGTERM, as systemd stops the service.
	if err := act.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- act.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the broker exited with %v after SIGTERM, want status 0", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the broker did not stop within 30 s of SIGTERM")
	}
	if !strings.Contains(actLog.String(), `"socket_activated": true`) {
		t.Errorf("the broker did not take its socket from the activation:\n%s", actLog.String())
	}
	if notify.count("STOPPING=1") != 1 {
		t.Errorf("STOPPING=1 sent %d times, want once", notify.count("STOPPING=1"))
	}
}
