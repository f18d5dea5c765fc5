// Command demo starts one builder host per Nix version on the test bed
// (loopback only), writes an offload.toml for them, checks them with the
// hook binary, and then offloads a real build with it: nix-build, with
// max-jobs 0 and build-hook set to our binary, in a private store, builds a
// chain of derivations and a wide fan-in across the builders.
// scripts/demo builds the binary and runs this.
//
//	go run ./internal/testbed/demo -hook ./bin/nix-offload-hook [-keep]
package main

import (
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nix-offload/nix-offload/internal/testbed"
)

func main() {
	hook := flag.String("hook", "bin/nix-offload-hook", "the nix-offload-hook binary")
	keep := flag.Bool("keep", false, "keep the builders running until Ctrl-C")
	flag.Parse()
	os.Exit(run(*hook, *keep))
}

func run(hook string, keep bool) int {
	p := &testbed.Program{}
	defer p.Close()
	hook, err := filepath.Abs(hook)
	if err != nil {
		p.Fatalf("%v", err)
	}

	work := p.TempDir()
	var cfg strings.Builder
	cfg.WriteString("# Written by the nix-offload demo: one builder per Nix version on loopback.\n")
	fmt.Fprintf(&cfg, "[daemon]\nstate-dir = %q\nsocket = %q\n", filepath.Join(work, "state"), filepath.Join(work, "hook.sock"))
	mounts := []string{work, filepath.Dir(hook)}
	for _, nix := range testbed.All(p) {
		b := testbed.StartBuilder(p, nix)
		fmt.Printf("builder %s: Nix %s at %s:%d (its own /nix in %s)\n", b.Name, nix.Version, b.Addr, b.Port, b.Dir)
		fmt.Fprintf(&cfg, "\n[[machine]]\nhost = %q\nport = %d\nuser = %q\nssh-key = %q\nhost-key = %q\n"+
			"systems = [\"x86_64-linux\"]\nparallel-builds = 4\n", b.Addr, b.Port, b.User, b.ClientKey, b.HostKey)
		mounts = append(mounts, filepath.Dir(b.ClientKey))
	}
	conf := filepath.Join(work, "offload.toml")
	if err := os.WriteFile(conf, []byte(cfg.String()), 0o644); err != nil {
		p.Fatalf("%v", err)
	}
	fmt.Printf("\n%s:\n%s\n", conf, cfg.String())

	fmt.Printf("$ nix-offload-hook check -config %s\n", conf)
	cmd := exec.Command(hook, "check", "-config", conf)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	code := 0
	if err := cmd.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: check failed: %v\n", err)
		code = 1
	}

	if code == 0 {
		code = offloadBuild(p, hook, conf, work, mounts)
	}

	if keep {
		fmt.Printf("\nbuilders are up; try: NIX_OFFLOAD_CONFIG=%s %s check\nCtrl-C stops them.\n", conf, hook)
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
	}
	return code
}

// demoExpr is a chain of 5 derivations and 12 independent ones under one
// root; each prints a log line on the machine that builds it.
const demoExpr = `
let
  salt = builtins.getEnv "DEMO_SALT";
  mk = name: deps: derivation {
    inherit name salt;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" ("echo remote log line from ${name}; x=${name}; "
      + builtins.concatStringsSep "" (map (d: "read y < ${d}; x=\"$x $y\"; ") deps)
      + "echo \"$x\" > $out") ];
  };
  chain = builtins.foldl' (prev: i: [ (mk "chain-${toString i}" prev) ]) [] [1 2 3 4 5];
  wide = map (i: mk "wide-${toString i}" []) [1 2 3 4 5 6 7 8 9 10 11 12];
in mk "root" (chain ++ wide)
`

// offloadBuild runs nix-build with everything offloaded through the hook.
func offloadBuild(p *testbed.Program, hook, conf, work string, mounts []string) int {
	nix := testbed.Lookup(p, "2.8")
	store := testbed.NewStore(p)
	expr := filepath.Join(work, "demo.nix")
	if err := os.WriteFile(expr, []byte(demoExpr), 0o644); err != nil {
		p.Fatalf("%v", err)
	}
	// The broker runs in the local Nix's mount namespace: it sees the same
	// /nix as nix-daemon, as in production.
	fmt.Printf("\n$ nix-offload-hook daemon -config %s &   (the broker, Nix %s's namespace)\n", conf, nix.Version)
	broker := nix.Command(store, mounts, hook, "daemon", "-config", conf)
	broker.Stderr = os.Stderr
	if err := broker.Start(); err != nil {
		p.Fatalf("starting the broker: %v", err)
	}
	defer func() {
		broker.Process.Signal(syscall.SIGTERM)
		broker.Wait()
		testbed.KillCommand(broker)
	}()
	testbed.WaitFor(p, time.Minute, "the broker's socket", func() bool {
		_, err := os.Stat(filepath.Join(work, "hook.sock"))
		return err == nil
	})
	time.Sleep(500 * time.Millisecond) // let it warm its connections

	fmt.Printf("\n$ nix-build --max-jobs 0 --option build-hook %s %s   (Nix %s, private store)\n", hook, expr, nix.Version)
	cmd := nix.Command(store, mounts, "nix-build", "--max-jobs", "0", "--no-out-link",
		"--option", "build-hook", hook, "--option", "substituters", "", expr)
	cmd.Env = append(cmd.Env, "NIX_OFFLOAD_CONFIG="+conf, fmt.Sprintf("DEMO_SALT=%d", time.Now().UnixNano()))
	cmd.Stderr = os.Stderr
	start := time.Now()
	out, err := cmd.Output()
	testbed.KillCommand(cmd)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: nix-build failed: %v\n", err)
		return 1
	}
	path := strings.TrimSpace(string(out))
	content, _ := os.ReadFile(filepath.Join(store, strings.TrimPrefix(path, "/nix/")))
	fmt.Printf("\n%s (%d derivations built remotely in %v)\n%s", path, 18, time.Since(start).Round(time.Millisecond), content)

	fmt.Printf("\n$ nix-offload-hook status -config %s\n", conf)
	st := exec.Command(hook, "status", "-config", conf)
	st.Stdout, st.Stderr = os.Stdout, os.Stderr
	if err := st.Run(); err != nil {
		fmt.Fprintf(os.Stderr, "demo: status failed: %v\n", err)
		return 1
	}
	return 0
}
