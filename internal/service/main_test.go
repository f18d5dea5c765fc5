package service

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The test binary doubles as the other process of the cross-process tests: with helperEnv set
// it runs helperMain instead of the tests (the os/exec TestHelperProcess pattern).
const (
	helperEnv   = "NIX_OFFLOAD_SERVICE_TEST_HELPER" // mode: "serve" or "connect"
	sockEnv     = "NIX_OFFLOAD_SERVICE_TEST_SOCK"   // the path to listen on or connect to
	fakePIDEnv  = "NIX_OFFLOAD_SERVICE_TEST_FAKE_LISTEN_PID"
	listenError = 3 // exit status of "serve" when Listen fails
)

func TestMain(m *testing.M) {
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(helperMain(mode))
	}
	goleak.VerifyTestMain(m)
}

// helperMain runs one side of a cross-process test:
//
//	serve:   Listen(sockEnv), accept one connection and write to it one line,
//	         "activated=<bool> addr=<listener address> peer=<uid> env=<LISTEN_* left>".
//	         With fakePIDEnv set it first sets LISTEN_PID to its own pid, as systemd would.
//	         If Listen fails it prints the error on stderr and exits with listenError.
//	connect: connect to sockEnv and print "connected" or "error: <error>".
func helperMain(mode string) int {
	path := os.Getenv(sockEnv)
	switch mode {
	case "serve":
		if os.Getenv(fakePIDEnv) != "" {
			os.Setenv("LISTEN_PID", strconv.Itoa(os.Getpid()))
		}
		ln, activated, err := Listen(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "listen:", err)
			return listenError
		}
		defer ln.Close()
		c, err := ln.Accept()
		if err != nil {
			fmt.Fprintln(os.Stderr, "accept:", err)
			return 2
		}
		defer c.Close()
		uid, err := PeerUID(c)
		if err != nil {
			fmt.Fprintln(os.Stderr, "peer:", err)
			return 2
		}
		left := os.Getenv("LISTEN_PID") + os.Getenv("LISTEN_FDS") + os.Getenv("LISTEN_FDNAMES")
		fmt.Fprintf(c, "activated=%t addr=%s peer=%d env=%q\n", activated, ln.Addr(), uid, left)
	case "connect":
		c, err := net.Dial("unix", path)
		if err != nil {
			fmt.Println("error:", err)
			return 0
		}
		c.Close()
		fmt.Println("connected")
	default:
		fmt.Fprintf(os.Stderr, "unknown helper mode %q\n", mode)
		return 2
	}
	return 0
}

// readLine connects to the unix socket at path, retrying while it does not exist yet, and
// returns the first line the other end writes.
func readLine(t *testing.T, path string) string {
	t.Helper()
	var c net.Conn
	var err error
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err = net.Dial("unix", path); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("connecting to the helper: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil && err != io.EOF {
		t.Fatalf("reading from the helper: %v (got %q)", err, line)
	}
	return strings.TrimSuffix(line, "\n")
}
