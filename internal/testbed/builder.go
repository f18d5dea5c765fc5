package testbed

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
)

// Builder is a simulated remote build machine: an sshd on its own loopback address whose
// processes see their own /nix (Dir/nix) and run this Nix, reached as root with a key.
// The fields are set by [StartBuilder] and must not be changed.
type Builder struct {
	Name       string // "b1", "b2"…: unique in this test process; the Host alias in SSHConfig
	Nix        Nix    // the Nix that runs on the host (nix-store --serve, builds)
	Addr       string // 127.0.0.N, the host's own address; 10.213.A.B with [WithNetNS]; the proxy's with [WithRTT]
	Port       int    // sshd's port on Addr; the proxy's with [WithRTT]
	User       string // "root"
	HostKey    string // the host's public key in authorized_keys form: "ssh-ed25519 AAAA…"
	ClientKey  string // path of the unencrypted ed25519 private key the host authorizes
	KnownHosts string // path of a known_hosts file holding "[Addr]:Port ssh-ed25519 …"
	SSHConfig  string // path of an ssh_config with "Host Name" (for ssh -F, NIX_SSHOPTS="-F …")
	Dir        string // the host's directory: Dir/nix is its store, sshd.log its sshd's log

	nixConf  string      // the host's /etc/nix/nix.conf
	forced   string      // WithForcedCommand: the command the client key is restricted to
	wantNet  bool        // WithNetNS
	net      *netLink    // the host's network namespace and link; nil without WithNetNS
	nixTmpfs int64       // WithNixTmpfs: size of the tmpfs that is the host's /nix; 0: Dir/nix
	shape    *LinkShape  // WithRTT, WithRate: the delay proxy's; nil for none
	sshdAddr string      // where sshd listens: Addr and Port unless there is a proxy
	sshdPort int         //
	proxy    *DelayProxy // in front of sshd with WithRTT or WithRate; nil after Stop
	proxyLk  net.Listener
	loadavg  string // WithLoadavg: what the host's /proc/loadavg reads; "": the kernel's

	mu      sync.Mutex
	tb      TB
	cmd     *exec.Cmd     // the running sshd; nil when killed
	done    chan struct{} // closed when cmd has been waited for
	nsFile  *os.File      // holds the namespace of the last sshd, so its id stays unique; nil after Stop
	ns      nsID
	lock    net.Listener // reserves Addr among test processes; nil after Stop
	stopped bool
}

// BuilderOption changes how [StartBuilder] sets up a host.
type BuilderOption func(*Builder)

// WithNixConf adds lines to the host's nix.conf, after the test bed's own, e.g.
// "system-features = kvm big-parallel" for builds that require features.
func WithNixConf(lines string) BuilderOption {
	return func(b *Builder) {
		b.nixConf += strings.TrimSuffix(lines, "\n") + "\n"
	}
}

// WithNetNS puts the host in a network namespace of its own, joined to the test's by a
// veth pair on a /30 of 10.213.0.0/16 that no other builder uses: Addr is the host's end
// of the pair. [Builder.CutLink], [Builder.ShapeLink] and
// [Builder.RestoreLink] then act on that link. Stop (the test's cleanup) removes the pair,
// its route and the namespace's name; the first [RequireRoot] of a later test process
// removes those of a test process that died. Needs ip (iproute2) and nsenter.
func WithNetNS() BuilderOption {
	return func(b *Builder) { b.wantNet = true }
}

// WithForcedCommand restricts the client key to command, as a hardened builder's
// authorized_keys does (`command="nix-daemon --stdio",restrict ssh-ed25519 …`): whatever
// the client asks to run, sshd runs command, with SSH_ORIGINAL_COMMAND set to the request.
// Readiness is then checked by command's answer to the daemon protocol's greeting, so
// command must be a `nix-daemon --stdio` (by name or path, with or without arguments).
// [Builder.Run] and [Builder.SSH] run command too.
func WithForcedCommand(command string) BuilderOption {
	return func(b *Builder) { b.forced = command }
}

// WithDaemonOnly is WithForcedCommand("nix-daemon --stdio"): a builder that offers only
// the daemon protocol, the usual hardening of an ssh-ng builder.
func WithDaemonOnly() BuilderOption { return WithForcedCommand("nix-daemon --stdio") }

// WithNixTmpfs makes the host's /nix a tmpfs of size bytes instead of Dir/nix, for a
// builder whose disk fills up. The store then lives only in the host's mount namespace:
// Dir/nix stays empty, and [Builder.Restart] starts with an empty store.
func WithNixTmpfs(size int64) BuilderOption {
	return func(b *Builder) { b.nixTmpfs = size }
}

// WithRTT puts a [DelayProxy] in front of the host's sshd that adds rtt/2 of delay in
// each direction, so that every round trip to the host takes rtt longer, as over a WAN.
// Addr and Port are then the proxy's (on the host's own loopback address, or on one more
// with [WithNetNS]), and [Builder.LinkStats] counts what went through it. The proxy lives
// as long as the host's address: a killed host refuses nothing, its connections are just
// closed at once. NIX_OFFLOAD_TESTBED_RTT=80ms in the environment gives every builder a
// WithRTT(80ms).
func WithRTT(rtt time.Duration) BuilderOption {
	return func(b *Builder) { b.linkShape().Delay = rtt / 2 }
}

// WithRate caps each direction of each connection to the host at bytesPerSec, through the
// same proxy as [WithRTT] (with no delay unless WithRTT is given too).
func WithRate(bytesPerSec int64) BuilderOption {
	return func(b *Builder) { b.linkShape().Rate = bytesPerSec }
}

// rttEnv names the environment variable that gives every builder of a test process a
// [WithRTT], so that any test (the fault tests, say) runs over a WAN unchanged:
// NIX_OFFLOAD_TESTBED_RTT=80ms go test ….
const rttEnv = "NIX_OFFLOAD_TESTBED_RTT"

func (b *Builder) linkShape() *LinkShape {
	if b.shape == nil {
		b.shape = &LinkShape{}
	}
	return b.shape
}

// LinkStats returns the counts of the host's [WithRTT] or [WithRate] proxy: connections,
// bytes and turns (round trips). It is zero for a host without one.
func (b *Builder) LinkStats() LinkStats {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.proxy == nil {
		return LinkStats{}
	}
	return b.proxy.Stats()
}

// WithLoadavg makes the host's /proc/loadavg read text (e.g. "64.00 64.00 64.00 3/200 999")
// instead of the kernel's, for a builder that is busy although every builder of the test bed
// shares one kernel. The file is bind-mounted over /proc/loadavg in the host's mount
// namespace only; sshd's sessions, and so the machine's state probe, read it.
func WithLoadavg(text string) BuilderOption {
	return func(b *Builder) { b.loadavg = strings.TrimSuffix(text, "\n") + "\n" }
}

var builderSeq atomic.Int64

// StartBuilder starts a builder host running nix and returns once
// `ssh -F SSHConfig Name nix-store --version` works on it (or fails the test, with sshd's
// log, within 20 s). The host stays up until [Builder.Stop], which the test's cleanup
// calls.
//
// The host's sshd runs in a new private mount namespace, set up as for [Nix.Command]:
// Dir/nix is its /nix, /etc/nix holds the test bed's nix.conf, and /root, the login
// user's home, is an empty tmpfs so that the machine's dotfiles (a .bashrc that prints or
// takes time) never reach a session. For a chroot Nix, Dir is also mounted at the same
// path inside the root. sshd permits only public-key logins as root and up to 64 sessions
// and 64 unauthenticated connections, and gives sessions NIX_CONF_DIR=/etc/nix.
func StartBuilder(tb TB, nix Nix, opts ...BuilderOption) *Builder {
	tb.Helper()
	RequireRoot(tb)
	if nix.Root == "" || nix.Version == "" {
		tb.Fatalf("testbed: StartBuilder with a zero Nix; get one from Lookup or All")
	}
	if _, err := os.Stat(filepath.Join(nix.Root, "usr/sbin/sshd")); err != nil {
		hint := "apt-get install openssh-server"
		if nix.chroot() {
			hint = "the root lacks openssh-server: remove " + nix.Root + " and run scripts/testbed-roots"
		}
		unavailable(tb, "testbed: no sshd for %v: %v\nhint: %s", nix, err, hint)
	}
	if _, err := lookTool("ssh"); err != nil {
		unavailable(tb, "testbed: no ssh client on the host\nhint: apt-get install openssh-client")
	}

	if v := os.Getenv(rttEnv); v != "" {
		rtt, err := time.ParseDuration(v)
		if err != nil || rtt < 0 {
			tb.Fatalf("testbed: %s=%q: want a duration such as 20ms", rttEnv, v)
		}
		opts = append([]BuilderOption{WithRTT(rtt)}, opts...) // the test's own WithRTT wins
	}
	b := &Builder{
		Name:    "b" + strconv.FormatInt(builderSeq.Add(1), 10),
		Nix:     nix,
		User:    "root",
		Dir:     tb.TempDir(),
		nixConf: baseNixConf,
		tb:      tb,
	}
	for _, o := range opts {
		o(b)
	}
	// Registered after TempDir, so it runs before Dir is removed.
	tb.Cleanup(b.Stop)
	if err := b.setUp(); err != nil {
		tb.Fatalf("testbed: %s: %v", b.Name, err)
	}

	b.mu.Lock()
	defer b.mu.Unlock()
	for attempt := 1; ; attempt++ {
		err := b.startLocked()
		if err == nil {
			break
		}
		// Seen once in a CI run: an sshd that exits at start with nothing in its log.
		// What the test is about has not started yet; say so and start it again.
		if errors.Is(err, errSSHDExited) && attempt < 3 {
			tb.Logf("testbed: %s (%v): %v; starting it again", b.Name, nix, err)
			continue
		}
		tb.Fatalf("testbed: %s (%v): %v", b.Name, nix, err)
	}
	return b
}

// errSSHDExited is a builder's sshd that exited before it listened.
var errSSHDExited = errors.New("sshd exited before listening")

// setUp reserves an address and writes the keys and configuration files into Dir.
func (b *Builder) setUp() error {
	if err := os.Chmod(b.Dir, 0o755); err != nil {
		return err
	}
	if err := os.Mkdir(filepath.Join(b.Dir, "nix"), 0o755); err != nil {
		return err
	}
	// sshd's privilege separation directory; sshd does not start without it.
	if err := os.MkdirAll(filepath.Join(b.Nix.Root, "run/sshd"), 0o755); err != nil {
		return err
	}

	if b.wantNet {
		l, lock, err := reserveNet()
		if err != nil {
			return err
		}
		// Any port is free in a namespace of its own; not 22, which known_hosts writes
		// without brackets.
		b.net, b.Addr, b.Port, b.lock = l, l.peerAddr, 20000+mrand.IntN(10000), lock
	} else {
		addr, port, lock, err := reserveAddr()
		if err != nil {
			return err
		}
		b.Addr, b.Port, b.lock = addr, port, lock
	}
	b.sshdAddr, b.sshdPort = b.Addr, b.Port
	if b.shape != nil {
		if err := b.startProxy(); err != nil {
			return err
		}
	}

	hostKey, err := writeKey(filepath.Join(b.Dir, "hostkey"))
	if err != nil {
		return err
	}
	clientKey, err := writeKey(filepath.Join(b.Dir, "client_key"))
	if err != nil {
		return err
	}
	b.HostKey = hostKey
	b.ClientKey = filepath.Join(b.Dir, "client_key")
	b.KnownHosts = filepath.Join(b.Dir, "known_hosts")
	b.SSHConfig = filepath.Join(b.Dir, "ssh_config")

	files := []struct {
		name, text string
	}{
		{"authorized_keys", b.authorizedKey(clientKey) + "\n"},
		{"known_hosts", fmt.Sprintf("[%s]:%d %s\n", b.Addr, b.Port, b.HostKey)},
		{"ssh_config", b.sshConfigBlock()},
		{"sshd_config", b.sshdConfig()},
	}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(b.Dir, f.name), []byte(f.text), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// authorizedKey is the authorized_keys line of the client key: the key, restricted to the
// forced command if there is one.
func (b *Builder) authorizedKey(key string) string {
	if b.forced == "" {
		return key
	}
	return fmt.Sprintf("command=%q,restrict %s", b.forced, key)
}

// startProxy puts the delay proxy in front of sshd: on the host's own loopback address,
// or for a host in a network namespace on a loopback address reserved for it.
func (b *Builder) startProxy() error {
	listen := b.Addr
	if b.net != nil {
		addr, _, lock, err := reserveAddr()
		if err != nil {
			return err
		}
		listen, b.proxyLk = addr, lock
	}
	p, err := StartDelayProxy(net.JoinHostPort(listen, "0"), net.JoinHostPort(b.sshdAddr, strconv.Itoa(b.sshdPort)), *b.shape)
	if err != nil {
		return fmt.Errorf("delay proxy: %v", err)
	}
	b.proxy, b.Addr, b.Port = p, listen, p.Addr().Port
	return nil
}

// sshConfigBlock returns the "Host Name" block of an ssh_config that reaches b.
func (b *Builder) sshConfigBlock() string {
	return fmt.Sprintf(`Host %s
  HostName %s
  Port %d
  User %s
  IdentityFile %s
  IdentitiesOnly yes
  UserKnownHostsFile %s
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  UpdateHostKeys no
  BatchMode yes
  ConnectTimeout 10
  ControlMaster no
  ControlPath none
  LogLevel ERROR
`, b.Name, b.Addr, b.Port, b.User, b.ClientKey, b.KnownHosts)
}

func (b *Builder) sshdConfig() string {
	return fmt.Sprintf(`# builder %[1]s, written by internal/testbed
Port %[2]d
ListenAddress %[3]s
AddressFamily inet
HostKey %[4]s/hostkey
PidFile none
AuthorizedKeysFile %[4]s/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxSessions 64
MaxStartups 64
UseDNS no
PrintMotd no
PrintLastLog no
SetEnv NIX_CONF_DIR=/etc/nix NIX_USER_CONF_FILES=
LogLevel VERBOSE
`, b.Name, b.sshdPort, b.sshdAddr, b.Dir)
}

// writeKey writes a new ed25519 private key to path (and its public half to path.pub) and
// returns the public key in authorized_keys form.
func writeKey(path string) (string, error) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", err
	}
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(path, pem.EncodeToMemory(block), 0o600); err != nil {
		return "", err
	}
	sshPub, err := ssh.NewPublicKey(pub)
	if err != nil {
		return "", err
	}
	line := strings.TrimSpace(string(ssh.MarshalAuthorizedKey(sshPub)))
	return line, os.WriteFile(path+".pub", []byte(line+"\n"), 0o644)
}

// addrLockPrefix names the abstract unix sockets that reserve builder addresses.
const addrLockPrefix = "@nix-offload-testbed/"

// reserveAddr picks a loopback address no other builder (of any test process) uses and a
// port that is free on it. The address stays reserved until lock is closed.
func reserveAddr() (addr string, port int, lock net.Listener, err error) {
	first := mrand.IntN(253)
	for i := range 253 {
		addr = "127.0.0." + strconv.Itoa(2+(first+i)%253)
		lock, err := net.Listen("unix", addrLockPrefix+addr)
		if err != nil {
			continue // another builder has it
		}
		for range 32 {
			port = 20000 + mrand.IntN(10000)
			l, err := net.Listen("tcp4", net.JoinHostPort(addr, strconv.Itoa(port)))
			if err == nil {
				l.Close()
				return addr, port, lock, nil
			}
		}
		lock.Close()
	}
	return "", 0, nil, errors.New("no free address in 127.0.0.2-254 (253 builders running?)")
}

// readyTimeout bounds how long StartBuilder and Restart wait for sshd to serve
// nix-store --version. It takes about 0.5 s, but up to 3.5 s was seen on a 2-CPU machine
// with a load of 9; an sshd that fails exits and is reported at once.
const readyTimeout = 20 * time.Second

// startLocked starts sshd and waits until it serves nix-store --version.
func (b *Builder) startLocked() error {
	logPath := filepath.Join(b.Dir, "sshd.log")
	logf, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	spec := nsSpec{
		root:    b.Nix.Root,
		store:   filepath.Join(b.Dir, "nix"),
		mounts:  []string{b.Dir},
		nixConf: b.nixConf,
		// Hiding /root would hide Dir too if it lay there.
		hideHome:   !strings.HasPrefix(b.Dir+"/", "/root/") || b.Nix.chroot(),
		storeTmpfs: b.nixTmpfs,
	}
	if b.loadavg != "" {
		spec.loadavg = filepath.Join(b.Dir, "loadavg")
		if err := os.WriteFile(spec.loadavg, []byte(b.loadavg), 0o644); err != nil {
			return err
		}
	}
	if b.net != nil {
		spec.netns = b.net.nsPath()
	}
	if err := spec.check(); err != nil {
		return err
	}
	cmd := newNSCommand(spec, []string{"/usr/sbin/sshd", "-D", "-e", "-f", filepath.Join(b.Dir, "sshd_config")})
	cmd.Env = []string{"PATH=" + defaultPath, "LC_ALL=C"}
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait() // its exit is reported by readiness, Kill and Stop
		close(done)
	}()
	fail := func(err error) error {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return fmt.Errorf("%v\nsshd.log (%s):\n%s", err, logPath, tail(logPath, 4096))
	}

	// The process made its namespace before exec, so this is the builder's. Holding it
	// open keeps the namespace's id from being reused while we look for its processes.
	nsFile, err := os.Open("/proc/" + strconv.Itoa(cmd.Process.Pid) + "/ns/mnt")
	if err != nil {
		return fail(fmt.Errorf("sshd exited at once: %v", err))
	}
	ns, err := nsOfFile(nsFile)
	if err != nil || sharedNS(ns) {
		nsFile.Close()
		return fail(fmt.Errorf("sshd is not in a namespace of its own (%v)", err))
	}
	if b.nsFile != nil {
		b.nsFile.Close()
	}
	b.cmd, b.done, b.nsFile, b.ns = cmd, done, nsFile, ns

	if err := b.waitReady(done); err != nil {
		kerr := b.killLocked()
		return fmt.Errorf("%w%s\nsshd.log (%s):\n%s", err, errSuffix(kerr), logPath, tail(logPath, 4096))
	}
	return nil
}

// waitReady waits until sshd accepts connections and then until nix-store --version
// works over ssh.
func (b *Builder) waitReady(done <-chan struct{}) error {
	ctx, cancel := context.WithTimeout(context.Background(), readyTimeout)
	defer cancel()
	// sshd itself, not a proxy in front of it, which accepts at once.
	hostport := net.JoinHostPort(b.sshdAddr, strconv.Itoa(b.sshdPort))
	for {
		c, err := (&net.Dialer{Timeout: 200 * time.Millisecond}).DialContext(ctx, "tcp4", hostport)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-done:
			return errSSHDExited
		case <-ctx.Done():
			return fmt.Errorf("sshd does not accept connections on %s after %v: %v", hostport, readyTimeout, err)
		case <-time.After(10 * time.Millisecond):
		}
	}
	if b.forced != "" {
		return b.waitDaemonReady(ctx)
	}
	cmd := b.sshCommand(ctx, "nix-store", "--version")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ssh -F %s %s nix-store --version: %v\n%s", b.SSHConfig, b.Name, err, stderr.Bytes())
	}
	if !strings.Contains(stdout.String(), b.Nix.Version) {
		return fmt.Errorf("ssh %s nix-store --version printed %q, want Nix %s", b.Name, stdout.String(), b.Nix.Version)
	}
	return nil
}

// waitDaemonReady checks a forced `nix-daemon --stdio` by its greeting: the client's magic
// and protocol 1.34 go in, the daemon's magic must come out. Only then does stdin end (the
// daemon stops at once when its stdin hangs up, even before it greets), and the daemon with it.
func (b *Builder) waitDaemonReady(ctx context.Context) error {
	cmd := b.sshCommand(ctx)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	var in [16]byte
	binary.LittleEndian.PutUint64(in[:8], 0x6e697863)
	binary.LittleEndian.PutUint64(in[8:], 1<<8|34)
	var out [8]byte
	_, werr := stdin.Write(in[:])
	n, rerr := io.ReadFull(stdout, out[:])
	stdin.Close()
	_ = cmd.Wait() // the daemon exits non-zero when its stdin ends mid-handshake
	if werr != nil || rerr != nil || binary.LittleEndian.Uint64(out[:]) != 0x6478696f {
		return fmt.Errorf("ssh -F %s %s (forced command %q) did not answer the daemon protocol's greeting: stdout %q (%v, %v)\n%s",
			b.SSHConfig, b.Name, b.forced, out[:n], werr, rerr, stderr.Bytes())
	}
	return nil
}

// Stop ends the host: SIGKILL to sshd and every process of the host (its sessions and
// their builds), then releases its namespace, whose mounts go with it, and its address.
// Dir stays until the test's cleanup removes it. Stop is idempotent; the test's cleanup
// calls it, and it fails the test if processes survive.
func (b *Builder) Stop() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.stopped {
		return
	}
	b.stopped = true
	err := b.killLocked()
	if b.nsFile != nil {
		b.nsFile.Close()
		b.nsFile = nil
	}
	if b.proxy != nil {
		err = errors.Join(err, b.proxy.Close())
		b.proxy = nil
	}
	if b.proxyLk != nil {
		b.proxyLk.Close()
		b.proxyLk = nil
	}
	if b.net != nil {
		// Before the lock goes: another builder may take the /30 from then on.
		err = errors.Join(err, b.net.remove())
		b.net = nil
	}
	if b.lock != nil {
		b.lock.Close()
		b.lock = nil
	}
	if err != nil {
		b.tb.Errorf("testbed: stopping %s: %v", b.Name, err)
	}
}

// Kill makes the host die as a machine would: SIGKILL to sshd and every process of the
// host, at once, without closing anything cleanly. Connections to it break and new ones
// are refused. Dir (the store) is kept, and so are the address and port:
// [Builder.Restart] brings the same machine back.
func (b *Builder) Kill() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if err := b.killLocked(); err != nil {
		b.tb.Errorf("testbed: killing %s: %v", b.Name, err)
	}
}

func (b *Builder) killLocked() error {
	if b.cmd == nil {
		return nil
	}
	_ = syscall.Kill(-b.cmd.Process.Pid, syscall.SIGKILL)
	err := killNS(b.ns, killTimeout)
	<-b.done
	b.cmd, b.done = nil, nil
	return err
}

// Restart starts a killed host again, with the same address, keys and store, as a machine
// that reboots. It fails the test if the host is running or stopped.
func (b *Builder) Restart(tb TB) {
	tb.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.stopped:
		tb.Fatalf("testbed: Restart of %s after Stop", b.Name)
	case b.cmd != nil:
		tb.Fatalf("testbed: Restart of %s, which is running; Kill it first", b.Name)
	}
	if err := b.startLocked(); err != nil {
		tb.Fatalf("testbed: restarting %s: %v", b.Name, err)
	}
}

// CutLink takes the builder's end of its link down ([WithNetNS] only): packets between
// the host and everyone else are dropped from then on, with no reset or error either way,
// as when a cable is pulled. Established connections hang until a timeout or keepalive
// notices; new ones time out. [Builder.RestoreLink] undoes it. Call it from the test's
// goroutine: it fails the test.
func (b *Builder) CutLink() { b.link("CutLink", (*netLink).cut) }

// RestoreLink brings the link up again and removes the shaping of [Builder.ShapeLink]
// ([WithNetNS] only). Connections that broke meanwhile stay broken.
func (b *Builder) RestoreLink() { b.link("RestoreLink", (*netLink).restore) }

// ShapeLink makes the link slow and lossy in both directions ([WithNetNS] only): a tbf
// qdisc sends at most rateBits bits per second and queues at most limitBytes; what does
// not fit is dropped, so TCP retransmits. (netem is not available on the test bed's
// kernel, so there is no random loss or fixed delay.) [Builder.RestoreLink] removes it.
func (b *Builder) ShapeLink(rateBits int64, limitBytes int) {
	b.link("ShapeLink", func(l *netLink) error { return l.shape(rateBits, limitBytes) })
}

// LinkDrops returns how many packets the queues of [Builder.ShapeLink] dropped so far,
// both directions together ([WithNetNS] only).
func (b *Builder) LinkDrops() int64 {
	var n int64
	b.link("LinkDrops", func(l *netLink) (err error) {
		n, err = l.drops()
		return err
	})
	return n
}

func (b *Builder) link(what string, f func(*netLink) error) {
	b.tb.Helper()
	b.mu.Lock()
	l := b.net
	b.mu.Unlock()
	if l == nil {
		b.tb.Fatalf("testbed: %s on %s, which has no link of its own (start it WithNetNS)", what, b.Name)
		return
	}
	if err := f(l); err != nil {
		b.tb.Fatalf("testbed: %s on %s: %v", what, b.Name, err)
	}
}

// Processes returns the pids of the processes running in the host, sshd included, sorted:
// none once it is killed or stopped.
func (b *Builder) Processes() []int {
	b.mu.Lock()
	ns, ok := b.ns, b.nsFile != nil
	b.mu.Unlock()
	if !ok {
		return nil
	}
	return pidsIn(ns)
}

// SSH returns a command that runs argv on the host through `ssh -F SSHConfig -- Name`. As
// with ssh, the remote login shell (bash) parses argv joined by spaces. Stdin is empty
// unless the caller sets one.
func (b *Builder) SSH(argv ...string) *exec.Cmd {
	return b.sshCommand(context.Background(), argv...)
}

func (b *Builder) sshCommand(ctx context.Context, argv ...string) *exec.Cmd {
	return exec.CommandContext(ctx, mustTool("ssh"), append([]string{"-F", b.SSHConfig, "--", b.Name}, argv...)...)
}

// Run runs a command on the host, as [Builder.SSH] does, and returns its stdout. It fails
// the test, with the command's stderr, if ssh or the command fails.
func (b *Builder) Run(tb TB, argv ...string) string {
	tb.Helper()
	cmd := b.SSH(argv...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("testbed: on %s: %s: %v\n%s", b.Name, strings.Join(argv, " "), err, stderr.Bytes())
	}
	return stdout.String()
}

// SSHConfigFile writes one ssh_config with the Host blocks of all the builders, for
// clients that take a single file, such as Nix's own hook with
// NIX_SSHOPTS="-F <file>" and --builders 'ssh://b1 …; ssh://b2 …'.
func SSHConfigFile(tb TB, builders ...*Builder) string {
	tb.Helper()
	var buf strings.Builder
	for _, b := range builders {
		buf.WriteString(b.sshConfigBlock())
	}
	path := filepath.Join(tb.TempDir(), "ssh_config")
	if err := os.WriteFile(path, []byte(buf.String()), 0o644); err != nil {
		tb.Fatalf("testbed: %v", err)
	}
	return path
}

// tail returns the last n bytes of the file at path, or why it cannot.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(-n, 2)
	}
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(f)
	return buf.String()
}

func errSuffix(err error) string {
	if err == nil {
		return ""
	}
	return " (and " + err.Error() + ")"
}
