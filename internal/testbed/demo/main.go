// Command demo starts one builder host per Nix version on the test bed
// (loopback only), writes an offload.toml for them and runs the hook binary
// against them. scripts/demo builds the binary and runs this.
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

	var cfg strings.Builder
	cfg.WriteString("# Written by the nix-offload demo: one builder per Nix version on loopback.\n")
	for _, nix := range testbed.All(p) {
		b := testbed.StartBuilder(p, nix)
		fmt.Printf("builder %s: Nix %s at %s:%d (its own /nix in %s)\n", b.Name, nix.Version, b.Addr, b.Port, b.Dir)
		fmt.Fprintf(&cfg, "\n[[machine]]\nhost = %q\nport = %d\nuser = %q\nssh-key = %q\nhost-key = %q\n"+
			"systems = [\"x86_64-linux\"]\nparallel-builds = 4\n", b.Addr, b.Port, b.User, b.ClientKey, b.HostKey)
	}
	conf := filepath.Join(p.TempDir(), "offload.toml")
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

	if keep {
		fmt.Printf("\nbuilders are up; try: NIX_OFFLOAD_CONFIG=%s %s check\nCtrl-C stops them.\n", conf, hook)
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
		<-sig
	}
	return code
}
