package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nix-offload/nix-offload/internal/brokerapi"
	"github.com/nix-offload/nix-offload/internal/machines"
)

// runStatus prints the broker's state.
func runStatus(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	config := fs.String("config", "", "configuration file (TOML)")
	socket := fs.String("socket", "", "the broker's socket (default: [daemon] socket, else "+brokerapi.DefaultSocket+")")
	asJSON := fs.Bool("json", false, "print the status as JSON")
	if err := parseFlags(fs, args, stdout, "status [flags]"); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Sprintf("status: unexpected arguments %q\n\n%s", fs.Args(), usage)}
	}
	if *socket == "" {
		cfg, err := loadConfig(*config, "", nixSystem())
		if err != nil {
			return err
		}
		*socket = brokerSocket("", cfg)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	// As the hook does: a socket that neither root nor this user serves may be anyone's
	// broker, and what it would show is not ours.
	c, err := brokerapi.DialChecked(ctx, *socket, brokerPeer)
	var untrusted *untrustedBrokerError
	if errors.As(err, &untrusted) {
		return fmt.Errorf("%s: %w; hooks refuse it too (whoever can create files in %s can put a socket there)", *socket, err, filepath.Dir(*socket))
	}
	if err != nil {
		return fmt.Errorf("no broker on %s: %w (start one with `nix-offload-hook daemon`; hooks build without it meanwhile)", *socket, err)
	}
	defer c.Close()
	st, err := c.Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st, time.Now())
	return nil
}

func printStatus(w io.Writer, st brokerapi.Status, now time.Time) {
	fmt.Fprintf(w, "broker %s, up %s: %d running, %d queued\n\n", st.Version, now.Sub(st.Started).Round(time.Second), st.Running, st.Queued)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "MACHINE\tSYSTEMS\tSLOTS\tHEALTH\tLOAD/CORE\tSTORE FREE\tSESSIONS\tBUILDS\tFAILED\tSENT\tRECEIVED")
	for _, m := range st.Machines {
		h := "up"
		switch {
		case !m.Enabled:
			h = "disabled"
		case !m.Up:
			h = fmt.Sprintf("down (retry in %s)", m.DownUntil.Sub(now).Round(time.Second))
		}
		load, free := liveColumns(m)
		fmt.Fprintf(tw, "%s\t%s\t%d/%d\t%s\t%s\t%s\t%d busy, %d idle, %d conns\t%d\t%d\t%s\t%s\n",
			m.Name, strings.Join(m.Systems, ","), m.SlotsUsed, m.Slots, h, load, free, m.InUse, m.Idle, m.Conns,
			m.Builds, m.Failed, machines.FormatSize(m.BytesSent), machines.FormatSize(m.BytesRecvd))
	}
	tw.Flush()
	for _, m := range st.Machines {
		if m.Held != "" {
			fmt.Fprintf(w, "\n%s: no new builds: %s", m.Name, m.Held)
		}
		if m.State != nil && m.State.Error != "" {
			fmt.Fprintf(w, "\n%s: load and free space unknown: %s", m.Name, m.State.Error)
		}
		if m.LastError != "" {
			fmt.Fprintf(w, "\n%s: last error %s ago: %s", m.Name, now.Sub(m.LastErrAt).Round(time.Second), m.LastError)
		}
	}
	fmt.Fprintln(w)
}

// liveColumns are the LOAD/CORE and STORE FREE cells of m: what it last said, with its
// limits; "?" where it said nothing, "-" before it was first asked.
func liveColumns(m brokerapi.MachineStatus) (load, free string) {
	load, free = "-", "-"
	if st := m.State; st != nil {
		load, free = "?", "?"
		if st.LoadPerCore != nil {
			load = fmt.Sprintf("%.2f", *st.LoadPerCore)
		}
		if st.FreeBytes != nil {
			free = machines.FormatSize(*st.FreeBytes)
		}
	}
	if m.MaxLoad > 0 {
		load += fmt.Sprintf(" (max %s)", strconv.FormatFloat(m.MaxLoad, 'f', -1, 64))
	}
	if m.MinFreeSpace > 0 {
		free += " (min " + machines.FormatSize(m.MinFreeSpace) + ")"
	}
	return load, free
}
