package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	sshconfig "github.com/kevinburke/ssh_config"
	gonar "github.com/nix-community/go-nix/pkg/nar"
	"github.com/nix-community/go-nix/pkg/nixbase32"

	"github.com/nix-offload/nix-offload/internal/daemonproto"
	"github.com/nix-offload/nix-offload/internal/engine"
	"github.com/nix-offload/nix-offload/internal/machines"
	"github.com/nix-offload/nix-offload/internal/serveproto"
	"github.com/nix-offload/nix-offload/internal/sshconn"
	"github.com/nix-offload/nix-offload/internal/transport"
)

// checkParallel bounds how many machines are checked at once.
const checkParallel = 8

// checkResult is one machine's row. Durations are zero when the step did
// not run. It is also the -json output, one object per machine.
type checkResult struct {
	Machine    string        `json:"machine"`
	Address    string        `json:"address"`
	HostKey    string        `json:"hostKey,omitempty"`     // "pinned ssh-ed25519 SHA256:…" / "known-hosts …"
	Protocol   string        `json:"protocol,omitempty"`    // protocol and its version: "ssh 2.7", "ssh-ng 1.38"
	Trust      string        `json:"trust,omitempty"`       // ssh-ng: what the daemon says of the user: "trusted", "not trusted", "unknown"
	NixVersion string        `json:"nixVersion,omitempty"`  // remote `nix-store --version`
	Connect    time.Duration `json:"connectNs,omitempty"`   // TCP + SSH handshake + auth
	RoundTrip  time.Duration `json:"roundTripNs,omitempty"` // send, query, fetch a small path
	ClockSkew  *float64      `json:"clockSkewSeconds,omitempty"`
	OK         bool          `json:"ok"`
	Error      string        `json:"error,omitempty"`
	Hint       string        `json:"hint,omitempty"`
}

type checkOptions struct {
	config     string
	builders   string
	json       bool
	configOnly bool
	names      []string
}

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	var opt checkOptions
	fs.StringVar(&opt.config, "config", "", "configuration file (TOML)")
	fs.StringVar(&opt.builders, "builders", "", "Nix machines specification, used when there is no TOML configuration")
	fs.BoolVar(&opt.json, "json", false, "print one JSON object per machine")
	fs.BoolVar(&opt.configOnly, "config-only", false, "only read and check the configuration and list its machines; connect to nothing")
	if err := parseFlags(fs, args, stdout, "check [flags] [MACHINE...]"); err != nil {
		return err
	}
	opt.names = fs.Args()

	if opt.builders == "" {
		opt.builders = defaultBuilders
	}
	cfg, err := loadConfig(opt.config, opt.builders, nixSystem())
	if err != nil {
		return err
	}
	ms, err := selectMachines(cfg.Machines, opt.names)
	if err != nil {
		return err
	}
	for _, w := range keyWarnings(ms) {
		fmt.Fprintf(stderr, "nix-offload-hook: warning: %s\n", w)
	}
	if opt.configOnly {
		return printConfigSummary(stdout, cfg, ms, opt.json)
	}
	if len(ms) == 0 {
		return &configError{fmt.Errorf("no machines configured in %s", cfg.Path)}
	}

	results := make([]checkResult, len(ms))
	sem := make(chan struct{}, checkParallel)
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			results[i] = checkMachine(ctx, m, sshconfig.DefaultUserSettings)
		})
	}
	wg.Wait()
	if err := ctx.Err(); err != nil {
		return err
	}

	if opt.json {
		enc := json.NewEncoder(stdout)
		for _, r := range results {
			if err := enc.Encode(r); err != nil {
				return err
			}
		}
	} else {
		printCheckTable(stdout, results)
	}
	failed := 0
	for _, r := range results {
		if !r.OK {
			failed++
		}
	}
	if failed > 0 {
		return &failedError{fmt.Sprintf("check: %d of %d machines failed", failed, len(results))}
	}
	return nil
}

// selectMachines keeps the machines named on the command line (by Name() or
// Host), all of them if none is named.
func selectMachines(all []machines.Machine, names []string) ([]machines.Machine, error) {
	if len(names) == 0 {
		return all, nil
	}
	var out []machines.Machine
	for _, n := range names {
		i := slices.IndexFunc(all, func(m machines.Machine) bool { return m.Name() == n || m.Host == n })
		if i < 0 {
			known := make([]string, len(all))
			for j, m := range all {
				known[j] = m.Name()
			}
			return nil, usageError{fmt.Sprintf("check: no machine %q (configured: %s)", n, strings.Join(known, ", "))}
		}
		out = append(out, all[i])
	}
	return out, nil
}

// checkMachine runs every check on one machine and never returns an error:
// a failure is recorded in the result with the step that failed.
func checkMachine(ctx context.Context, m machines.Machine, sshCfg sshconn.SSHConfig) checkResult {
	t := sshconn.Resolve(m, sshCfg)
	r := checkResult{Machine: m.Name(), Address: t.Addr}
	fail := func(step string, err error) checkResult {
		r.Error = fmt.Sprintf("%s: %v", step, err)
		r.Hint = hintFor(err)
		return r
	}

	start := time.Now()
	client, err := sshconn.Dial(ctx, t)
	if err != nil {
		return fail("connect", err)
	}
	defer client.Close()
	r.Connect = time.Since(start)
	if t.HostKey != "" {
		r.HostKey = "pinned " + client.HostKey.Type()
	} else {
		r.HostKey = "known-hosts " + client.HostKey.Type()
	}

	if m.ProtocolOrDefault() == machines.ProtocolSSHNG {
		return checkDaemon(ctx, client, m, t, r, fail)
	}

	// Remote Nix version and clock, in one exec. (%N is GNU date; a date
	// without it prints "%N" literally, and the whole seconds still count.)
	// Bounded as the greeting is: a forced command (sshd's command=) runs
	// instead and may never end.
	octx, cancel := context.WithTimeout(ctx, connectTimeout(t))
	t0 := time.Now()
	out, err := client.Output(octx, "nix-store --version && date +%s.%N")
	t1 := time.Now()
	cancel()
	if err != nil {
		return fail("remote nix-store --version", err)
	}
	r.NixVersion, r.ClockSkew = parseVersionAndClock(string(out), t0, t1)

	sess, conn, err := engine.OpenServe(ctx, client, transport.ServeCommand(m.RemoteProgram, m.RemoteStore), t.ConnectTimeout, transport.Options{Name: m.Name()})
	if err != nil {
		return fail("serve handshake", err)
	}
	defer sess.Close()
	stopOnCancel := context.AfterFunc(ctx, func() { client.Close() })
	defer stopOnCancel()
	r.Protocol = "ssh " + conn.ServerVersion().String()

	start = time.Now()
	if err := storeRoundTrip(conn); err != nil {
		return fail("store round trip", err)
	}
	r.RoundTrip = time.Since(start)
	r.OK = true
	return r
}

// checkDaemon checks an ssh-ng machine over the daemon protocol: the
// handshake gives its protocol version, Nix version and what it says of the
// user's trust, and the round trip goes through AddMultipleToStore,
// QueryPathInfo and NarFromPath. There is no exec for the clock: a builder
// whose key is restricted to nix-daemon --stdio runs nothing else.
func checkDaemon(ctx context.Context, client *sshconn.Client, m machines.Machine, t sshconn.Target, r checkResult,
	fail func(string, error) checkResult) checkResult {
	sess, conn, err := engine.OpenDaemon(ctx, client, transport.DaemonCommand(m.RemoteProgram, m.RemoteStore), t.ConnectTimeout, m.Name(), nil)
	if err != nil {
		return fail("daemon handshake", err)
	}
	defer sess.Close()
	r.Protocol = "ssh-ng " + conn.Version().String()
	r.NixVersion = conn.NixVersion()
	r.Trust = conn.Trust().String()
	narBytes, sum, err := checkNAR()
	if err != nil {
		return fail("store round trip", err)
	}
	info := serveproto.PathInfo{
		Path:    serveproto.MakeSourcePath("nix-offload-check", sum),
		NarHash: "sha256:" + nixbase32.EncodeToString(sum[:]),
		NarSize: uint64(len(narBytes)),
		CA:      "fixed:r:sha256:" + nixbase32.EncodeToString(sum[:]),
	}
	start := time.Now()
	err = func() error {
		if err := conn.AddMultipleToStore(ctx, []daemonproto.Item{{Info: info, NAR: bytes.NewReader(narBytes)}}, true); err != nil {
			return fmt.Errorf("sending %s: %w", info.Path, err)
		}
		got, ok, err := conn.QueryPathInfo(ctx, info.Path)
		switch {
		case err != nil:
			return err
		case !ok:
			return fmt.Errorf("machine accepted %s but does not report it valid", info.Path)
		case got.NarSize != info.NarSize || !sameHash(got.NarHash, sum):
			return fmt.Errorf("machine records %s with narSize %d, narHash %s; sent %d, %s",
				info.Path, got.NarSize, got.NarHash, info.NarSize, info.NarHash)
		}
		var back bytes.Buffer
		if _, err := conn.NarFromPath(ctx, got, &back); err != nil {
			return err
		}
		if !bytes.Equal(back.Bytes(), narBytes) {
			return fmt.Errorf("fetched %s back with a different content", info.Path)
		}
		return nil
	}()
	if err != nil {
		return fail("store round trip", err)
	}
	r.RoundTrip = time.Since(start)
	if conn.Trust() == daemonproto.NotTrusted {
		r.Hint = "the machine's nix-daemon does not trust the SSH user: it builds only what it can check " +
			"(content-addressed or signed inputs); add the user to trusted-users for the rest"
	}
	r.OK = true
	return r
}

// connectTimeout is the bound of every wait for a machine's first answer.
func connectTimeout(t sshconn.Target) time.Duration {
	if t.ConnectTimeout > 0 {
		return t.ConnectTimeout
	}
	return sshconn.DefaultConnectTimeout
}

// parseVersionAndClock reads the output of `nix-store --version && date +%s.%N`:
// the version ("2.26.3") and the remote clock minus ours, in seconds, taking
// the middle of the round trip as the moment `date` ran.
func parseVersionAndClock(out string, t0, t1 time.Time) (string, *float64) {
	var ver string
	var skew *float64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "nix-store ") {
			f := strings.Fields(line)
			ver = f[len(f)-1]
			continue
		}
		secs, err := strconv.ParseFloat(line, 64)
		if err != nil {
			secs, err = strconv.ParseFloat(strings.TrimSuffix(line, ".%N"), 64)
		}
		if err == nil {
			mid := t0.Add(t1.Sub(t0) / 2)
			s := math.Round((secs-float64(mid.UnixNano())/1e9)*10) / 10
			skew = &s
		}
	}
	return ver, skew
}

// storeRoundTrip sends a small, unique, content-addressed path to the
// machine, checks that the machine reports it valid with the hash we sent,
// and fetches it back byte for byte.
func storeRoundTrip(conn *serveproto.Conn) error {
	narBytes, sum, err := checkNAR()
	if err != nil {
		return err
	}
	path := serveproto.MakeSourcePath("nix-offload-check", sum)
	info := serveproto.PathInfo{
		Path:    path,
		NarHash: "sha256:" + nixbase32.EncodeToString(sum[:]),
		NarSize: uint64(len(narBytes)),
		CA:      "fixed:r:sha256:" + nixbase32.EncodeToString(sum[:]),
	}
	if conn.ServerVersion().Minor() >= 5 {
		err = conn.AddToStoreNar(info, bytes.NewReader(narBytes))
	} else {
		err = conn.ImportPaths([]serveproto.ExportItem{{Info: info, NAR: bytes.NewReader(narBytes)}})
	}
	if err != nil {
		return fmt.Errorf("sending %s: %w", path, err)
	}
	valid, err := conn.QueryValidPaths([]string{path}, false, false)
	if err != nil {
		return err
	}
	if !slices.Contains(valid, path) {
		return fmt.Errorf("machine accepted %s but does not report it valid", path)
	}
	infos, err := conn.QueryPathInfos([]string{path})
	if err != nil {
		return err
	}
	if len(infos) != 1 || infos[0].Path != path {
		return fmt.Errorf("machine returned no path info for %s", path)
	}
	if infos[0].NarSize != info.NarSize || !sameHash(infos[0].NarHash, sum) {
		return fmt.Errorf("machine records %s with narSize %d, narHash %s; sent %d, %s",
			path, infos[0].NarSize, infos[0].NarHash, info.NarSize, info.NarHash)
	}
	var back bytes.Buffer
	st, err := conn.DumpStorePath(path, &back)
	if err != nil {
		return err
	}
	if st.SHA256 != sum || !bytes.Equal(back.Bytes(), narBytes) {
		return fmt.Errorf("fetched %s back with a different content (narHash %s)", path, st.NixHash())
	}
	return nil
}

// checkNAR makes the NAR of a one-file store path whose content is unique to
// this run, so the round trip always sends bytes.
func checkNAR() ([]byte, [32]byte, error) {
	nonce := make([]byte, 16)
	rand.Read(nonce)
	host, _ := os.Hostname()
	content := fmt.Sprintf("nix-offload check from %s at %s\n%s\n", host, time.Now().UTC().Format(time.RFC3339), hex.EncodeToString(nonce))
	var buf bytes.Buffer
	w, err := gonar.NewWriter(&buf)
	if err != nil {
		return nil, [32]byte{}, err
	}
	if err := w.WriteHeader(&gonar.Header{Path: "/", Type: gonar.TypeRegular, Size: int64(len(content))}); err != nil {
		return nil, [32]byte{}, err
	}
	if _, err := io.WriteString(w, content); err != nil {
		return nil, [32]byte{}, err
	}
	if err := w.Close(); err != nil {
		return nil, [32]byte{}, err
	}
	return buf.Bytes(), sha256.Sum256(buf.Bytes()), nil
}

// sameHash compares a hash as Nix prints it ("sha256:<nix32>", or hex) with
// a digest.
func sameHash(s string, sum [32]byte) bool {
	s = strings.TrimPrefix(s, "sha256:")
	if b, err := nixbase32.DecodeString(s); err == nil && bytes.Equal(b, sum[:]) {
		return true
	}
	b, err := hex.DecodeString(s)
	return err == nil && bytes.Equal(b, sum[:])
}

// hintFor says what to do about the errors people meet first.
func hintFor(err error) string {
	var hk *sshconn.HostKeyError
	var ce *sshconn.ConnectError
	msg := err.Error()
	switch {
	case errors.As(err, &hk) && hk.Problem == sshconn.HostKeyMismatch:
		return "the machine's host key changed or the configured key is wrong; if the change is expected, update host-key or known-hosts"
	case errors.As(err, &hk):
		return "compare the offered key with the machine's /etc/ssh/ssh_host_*_key.pub, then set host-key or add it to known-hosts"
	case strings.Contains(msg, "unable to authenticate"):
		return "the machine did not accept our key: add the public half of ssh-key to the user's authorized_keys"
	case strings.Contains(msg, "lacks a valid signature") || strings.Contains(msg, "not privileged"):
		return "the SSH user must be root or in trusted-users of the machine's Nix"
	case strings.Contains(msg, "command not found") || strings.Contains(msg, "protocol mismatch"):
		return "nix-store must be on the PATH of a non-interactive shell of the SSH user, and the shell must print nothing"
	case errors.As(err, &ce):
		return "is the machine up and is sshd listening on that address?"
	}
	return ""
}

func printCheckTable(w io.Writer, results []checkResult) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MACHINE\tADDRESS\tHOST KEY\tPROTOCOL\tNIX\tCONNECT\tROUND TRIP\tCLOCK SKEW\tVERDICT")
	for _, r := range results {
		skew := "-"
		if r.ClockSkew != nil {
			skew = fmt.Sprintf("%+.0fs", *r.ClockSkew)
			if math.Abs(*r.ClockSkew) < 0.5 {
				skew = "0s"
			}
		}
		verdict := "ok"
		if !r.OK {
			verdict = "FAILED"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Machine, r.Address, dash(r.HostKey),
			dash(r.Protocol), dash(r.NixVersion), ms(r.Connect), ms(r.RoundTrip), skew, verdict)
	}
	tw.Flush()
	for _, r := range results {
		switch {
		case !r.OK:
			fmt.Fprintf(w, "\n%s: %s\n", r.Machine, r.Error)
			if r.Hint != "" {
				fmt.Fprintf(w, "  hint: %s\n", r.Hint)
			}
		case r.Hint != "":
			// A machine that works with a caveat (an untrusted user).
			fmt.Fprintf(w, "\n%s: %s\n  hint: %s\n", r.Machine, r.Trust, r.Hint)
		}
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func ms(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	return fmt.Sprintf("%dms", d.Milliseconds())
}

// nixSystem is the default system for machines-file entries that name none.
func nixSystem() string {
	arch := map[string]string{"amd64": "x86_64", "arm64": "aarch64", "386": "i686"}[runtime.GOARCH]
	if arch == "" {
		arch = runtime.GOARCH
	}
	return arch + "-" + runtime.GOOS
}

// configMachine is one machine as `check -config-only -json` prints it:
// the configuration after defaults, before anything is contacted.
type configMachine struct {
	Machine           string   `json:"machine"`
	Host              string   `json:"host"`
	Port              int      `json:"port,omitempty"`
	User              string   `json:"user,omitempty"`
	SSHKey            string   `json:"sshKey,omitempty"`
	HostKey           string   `json:"hostKey,omitempty"` // "ssh-ed25519 AAAA…" when pinned
	KnownHosts        []string `json:"knownHosts,omitempty"`
	Systems           []string `json:"systems"`
	ParallelBuilds    int      `json:"parallelBuilds"`
	Speed             float64  `json:"speed"`
	Features          []string `json:"features,omitempty"`
	MandatoryFeatures []string `json:"mandatoryFeatures,omitempty"`
	RemoteStore       string   `json:"remoteStore,omitempty"`
	Enabled           bool     `json:"enabled"`
	Source            string   `json:"source,omitempty"`
	MinFreeSpace      uint64   `json:"minFreeSpace,omitempty"` // bytes
	MaxLoad           float64  `json:"maxLoad,omitempty"`      // per core
}

// printConfigSummary is `check -config-only`: the configuration has been
// read and checked (errors never get here), so it says where it came from
// and lists the machines, without connecting to any of them. No machines is
// a valid configuration: the hook declines every build and Nix builds
// locally, and the summary says so.
func printConfigSummary(w io.Writer, cfg *machines.Config, ms []machines.Machine, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		for _, m := range ms {
			if err := enc.Encode(configMachine{
				Machine: m.Name(), Host: m.Host, Port: m.Port, User: m.User, SSHKey: m.SSHKey,
				HostKey: m.HostKey, KnownHosts: m.KnownHosts, Systems: m.Systems,
				ParallelBuilds: m.ParallelBuilds, Speed: m.Speed, Features: m.Features,
				MandatoryFeatures: m.MandatoryFeatures, RemoteStore: m.RemoteStore,
				Enabled: m.Enabled, Source: m.Source, MinFreeSpace: m.MinFreeSpace, MaxLoad: m.MaxLoad,
			}); err != nil {
				return err
			}
		}
		return nil
	}
	stateDir := cfg.Daemon.StateDir
	if stateDir == "" {
		stateDir = machines.DefaultStateDir
	}
	metricsAddr := cfg.Daemon.Metrics
	if metricsAddr == "" {
		metricsAddr = "off"
	}
	fmt.Fprintf(w, "%s: configuration ok; broker socket %s, state dir %s, metrics %s\n",
		cfg.Path, brokerSocket("", cfg), stateDir, metricsAddr)
	if len(ms) == 0 {
		fmt.Fprintln(w, "no machines: the hook declines every build, and Nix builds locally")
		return nil
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MACHINE\tSYSTEMS\tSLOTS\tSPEED\tFEATURES\tMANDATORY\tHOST KEY\tSOURCE")
	for _, m := range ms {
		name := m.Name()
		if !m.Enabled {
			name += " (disabled)"
		}
		hostKey := "known-hosts"
		if m.HostKey != "" {
			hostKey = "pinned " + strings.Fields(m.HostKey)[0]
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\n", name, strings.Join(m.Systems, ","),
			m.ParallelBuilds, strconv.FormatFloat(m.Speed, 'g', -1, 64), dash(strings.Join(m.Features, ",")),
			dash(strings.Join(m.MandatoryFeatures, ",")), hostKey, dash(m.Source))
	}
	return tw.Flush()
}
