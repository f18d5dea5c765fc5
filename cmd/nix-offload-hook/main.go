// Command nix-offload-hook is a drop-in replacement for Nix's remote build
// hook, and the tools around it.
//
//	nix-offload-hook check [-config FILE] [-config-only] [-json] [MACHINE…]
//	                                                           test every machine (or just read the configuration)
//	nix-offload-hook daemon [-config FILE] [-socket PATH]      run the broker
//	nix-offload-hook build [flags] INSTALLABLE…                build a derivation graph across the machines
//	nix-offload-hook status [-json]                            show the broker's state
//	nix-offload-hook version                                   print the version
//	nix-offload-hook <verbosity>                               hook mode (build-hook = …)
//
// Exit codes: 0 success; 1 a command failed (for check: some machine failed);
// 2 usage or configuration error.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"syscall"
)

const (
	exitOK     = 0
	exitFailed = 1
	exitUsage  = 2
)

// usageError marks errors that should exit with exitUsage.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run dispatches to a subcommand and maps its error to an exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var err error
	switch {
	case len(args) == 0:
		err = usageError{"no command given\n\n" + usage}
	case args[0] == "check":
		err = runCheck(ctx, args[1:], stdout, stderr)
	case args[0] == "daemon":
		err = runDaemon(ctx, args[1:], stdout, stderr)
	case args[0] == "build":
		err = runBuild(ctx, args[1:], stdout, stderr)
	case args[0] == "status":
		err = runStatus(ctx, args[1:], stdout)
	case args[0] == "version":
		fmt.Fprintln(stdout, "nix-offload-hook", version())
	case args[0] == "help" || args[0] == "-h" || args[0] == "--help":
		fmt.Fprint(stdout, usage)
	case isHookInvocation(args):
		err = runHook(ctx, args)
	default:
		err = usageError{fmt.Sprintf("unknown command %q\n\n%s", args[0], usage)}
	}
	if err == nil || errors.Is(err, errHelpShown) {
		return exitOK
	}
	if errors.Is(err, context.Canceled) {
		return exitFailed
	}
	var said *saidError
	if !errors.As(err, &said) {
		fmt.Fprintf(stderr, "nix-offload-hook: %v\n", err)
	}
	var ue usageError
	var ce *configError
	if errors.As(err, &ue) || errors.As(err, &ce) {
		return exitUsage
	}
	var xe *exitCodeError
	if errors.As(err, &xe) {
		return xe.code
	}
	return exitFailed
}

// isHookInvocation reports whether Nix started us as its build hook: every
// Nix version appends the verbosity (a small number) as the last argument,
// after any extra arguments from a list-valued build-hook setting.
func isHookInvocation(args []string) bool {
	if len(args) == 0 {
		return false
	}
	n, err := strconv.Atoi(args[len(args)-1])
	return err == nil && n >= 0 && n <= 7
}

// saidError is an error that was already reported where its reader looks (the hook's
// @nix log, which is stderr too): printing it again would show it twice.
type saidError struct{ err error }

func (e *saidError) Error() string { return e.err.Error() }
func (e *saidError) Unwrap() error { return e.err }

// errHelpShown ends a command whose -h or -help printed its flags: exit 0.
var errHelpShown = errors.New("help shown")

// parseFlags parses a subcommand's flags. -h and -help print synopsis and the flags to stdout
// (errHelpShown); any other mistake is a usage error that names the subcommand.
func parseFlags(fs *flag.FlagSet, args []string, stdout io.Writer, synopsis string) error {
	fs.SetOutput(io.Discard)
	err := fs.Parse(args)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprintf(stdout, "usage: nix-offload-hook %s\n\nflags:\n", synopsis)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		return errHelpShown
	}
	if err != nil {
		return usageError{fmt.Sprintf("%s: %v\n\n%s", fs.Name(), err, usage)}
	}
	return nil
}

// failedError is a command that ran and reports failure (exit 1) after it
// already printed why.
type failedError struct{ msg string }

func (e *failedError) Error() string { return e.msg }

const usage = `usage:
  nix-offload-hook check [-config FILE] [-builders SPEC] [-config-only] [-json] [MACHINE...]
      connect to every configured machine (or the named ones) and test it:
      host key, serve protocol, remote Nix, a store round trip, clock skew
  nix-offload-hook daemon [-config FILE] [-builders SPEC] [-socket PATH] [-drain DURATION] [-debug]
      run the broker: warm connections to every machine, one queue and one
      set of slots for every hook of the host (systemd: nix-offload.socket)
  nix-offload-hook build [-config FILE] [-socket PATH] [-keep-going] [-json] [-no-link | -out-link PATH]
                         [-fetch requested|all|none] [-A ATTR]... INSTALLABLE...
      build whole derivation graphs on the machines: every derivation whose
      inputs are built runs at once, intermediates stay on the builders, only
      what -fetch asks comes home; INSTALLABLE is /nix/store/...drv[^OUTPUTS]
      or a .nix file with -A; exit 100 when a build failed, 101 timed out
  nix-offload-hook build [-config FILE] [-socket PATH] [-json] [-no-link | -out-link PATH] -follow ID
      follow the broker's graph ID (printed when it was submitted) to its
      end, then fetch and link as if it had been submitted here
  nix-offload-hook status [-config FILE] [-socket PATH] [-json]
      the broker's machines, slots, queue, health and traffic
  nix-offload-hook version
  nix-offload-hook VERBOSITY
      build hook mode: set build-hook = /path/to/nix-offload-hook in nix.conf

configuration: -config, else $NIX_OFFLOAD_CONFIG, else /etc/nix/offload.toml,
else Nix's machines file (-builders, default @/etc/nix/machines)
`
