package probe

import (
	"os/exec"
	"runtime"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	linux := "nix-offload-probe 1\nloadavg 6.40 3.10 1.00 3/412 9001\ncores 2\n" +
		"cpu-pressure avg10=12.50 avg60=3.00 avg300=1.00 total=123456\n" +
		"df /dev/vda1 41152736 29837112 9201712 77% /\nend\n"
	st, err := Parse([]byte(linux))
	if err != nil {
		t.Fatal(err)
	}
	want := State{HasLoad: true, Load1: 6.4, Cores: 2, HasPressure: true, Pressure: 12.5, HasFree: true, FreeBytes: 9201712 * 1024}
	if st != want {
		t.Errorf("got %+v\nwant %+v", st, want)
	}
	if st.LoadPerCore() != 3.2 {
		t.Errorf("load per core %v, want 3.2", st.LoadPerCore())
	}

	darwin := "nix-offload-probe 1\nloadavg { 1.50 1.20 1.00 }\ncores 10\n" +
		"df /dev/disk3s7 239362496 1000 12345 1% /nix\nend\n"
	st, err = Parse([]byte(darwin))
	if err != nil || !st.HasLoad || st.Load1 != 1.5 || st.Cores != 10 || st.HasPressure || st.FreeBytes != 12345*1024 {
		t.Errorf("darwin: %+v, %v", st, err)
	}

	// A machine that could not say: those parts unknown, the rest counts.
	st, err = Parse([]byte("nix-offload-probe 1\nloadavg \ncores 4\ndf \nend\n"))
	if err != nil || st.HasLoad || st.HasFree || st.Cores != 4 {
		t.Errorf("partial: %+v, %v", st, err)
	}
	// Spaces in the filesystem's name and the mount point.
	st, err = Parse([]byte("nix-offload-probe 1\ndf my disk 100 50 50 50% /mnt/a b\nend\n"))
	if err != nil || st.FreeBytes != 50*1024 {
		t.Errorf("spaces: %+v, %v", st, err)
	}
}

func TestParseRefuses(t *testing.T) {
	for name, out := range map[string]string{
		"empty":                 "",
		"nix-store --serve":     "\xb1\x2c\x5c\x39\x00\x00\x00\x00",
		"nix-daemon --stdio":    "oiix\x00\x00\x00\x00",
		"banner first":          "Welcome!\nnix-offload-probe 1\nend\n",
		"cut off":               "nix-offload-probe 1\nloadavg 1 1 1 1/1 1\n",
		"no newline at the end": "nix-offload-probe 1\nend",
		"other version":         "nix-offload-probe 2\nend\n",
		"unknown line":          "nix-offload-probe 1\nhello world\nend\n",
		"twice":                 "nix-offload-probe 1\ncores 2\ncores 2\nend\n",
		"negative load":         "nix-offload-probe 1\nloadavg -1 1 1 1/1 1\nend\n",
		"hex load":              "nix-offload-probe 1\nloadavg 0x10 1 1 1/1 1\nend\n",
		"nan load":              "nix-offload-probe 1\nloadavg NaN 1 1 1/1 1\nend\n",
		"zero cores":            "nix-offload-probe 1\ncores 0\nend\n",
		"df header":             "nix-offload-probe 1\ndf Filesystem 1024-blocks Used Available Capacity Mounted on\nend\n",
		"pressure over 100":     "nix-offload-probe 1\ncpu-pressure avg10=101 avg60=0 avg300=0 total=0\nend\n",
		"too long":              "nix-offload-probe 1\n" + strings.Repeat("x", MaxOutput) + "\nend\n",
	} {
		if st, err := Parse([]byte(out)); err == nil {
			t.Errorf("%s: accepted, %+v", name, st)
		}
	}
}

// TestCommand runs the command in this machine's /bin/sh and parses what it prints: the real
// tools' output, not a copy of it.
func TestCommand(t *testing.T) {
	if runtime.GOOS != "linux" && runtime.GOOS != "darwin" {
		t.Skip("the probe runs on Linux and darwin builders")
	}
	out, err := exec.Command("/bin/sh", "-c", Command("/")).Output()
	if err != nil {
		t.Fatal(err)
	}
	st, err := Parse(out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !st.HasLoad || st.Cores < 1 || !st.HasFree || st.FreeBytes == 0 {
		t.Errorf("got %+v from\n%s", st, out)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("nix-offload-probe 1\nloadavg 6.40 3.10 1.00 3/412 9001\ncores 2\ncpu-pressure avg10=12.50 avg60=3.00 avg300=1.00 total=1\ndf /dev/vda1 4 3 1 77% /\nend\n"))
	f.Add([]byte("nix-offload-probe 1\nloadavg { 1.50 1.20 1.00 }\ncores 10\ndf \nend\n"))
	f.Fuzz(func(t *testing.T, out []byte) {
		st, err := Parse(out)
		if err != nil {
			return
		}
		if st.HasLoad && (st.Cores < 1 || st.LoadPerCore() < 0) {
			t.Errorf("accepted a load it cannot divide: %+v", st)
		}
		if st.HasPressure && (st.Pressure < 0 || st.Pressure > 100) {
			t.Errorf("accepted pressure %v", st.Pressure)
		}
	})
}
