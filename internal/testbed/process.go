package testbed

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// nsID identifies a mount namespace: the device and inode of its nsfs file.
type nsID struct{ dev, ino uint64 }

// nsOf returns the mount namespace of pid. It fails for a process that has exited,
// zombies included.
func nsOf(pid int) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat("/proc/"+strconv.Itoa(pid)+"/ns/mnt", &st); err != nil {
		return nsID{}, err
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// nsOfFile returns the mount namespace an open /proc/PID/ns/mnt file refers to.
func nsOfFile(f *os.File) (nsID, error) {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		return nsID{}, err
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// sharedNS reports whether ns is one that processes outside the test bed live in: this
// process's or init's. Killing "every process in" such a namespace would kill the machine.
func sharedNS(ns nsID) bool {
	for _, pid := range []int{os.Getpid(), 1} {
		if other, err := nsOf(pid); err == nil && other == ns {
			return true
		}
	}
	return false
}

// pidsIn returns the live processes in mount namespace ns and their descendants, sorted.
// It returns nothing for a shared namespace (see sharedNS).
func pidsIn(ns nsID) []int {
	if sharedNS(ns) {
		return nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	parent := map[int]int{}
	in := map[int]bool{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self || pid == 1 {
			continue
		}
		ppid, _, err := procStat(pid)
		if err != nil {
			continue
		}
		parent[pid] = ppid
		if got, err := nsOf(pid); err == nil && got == ns {
			in[pid] = true
		}
	}
	// Add descendants: a process that made a mount namespace of its own is still one of ours.
	for grew := true; grew; {
		grew = false
		for pid, ppid := range parent {
			if !in[pid] && in[ppid] {
				if _, err := nsOf(pid); err == nil { // not a zombie
					in[pid] = true
					grew = true
				}
			}
		}
	}
	pids := make([]int, 0, len(in))
	for pid := range in {
		pids = append(pids, pid)
	}
	slices.Sort(pids)
	return pids
}

// killNS sends SIGKILL to every process pidsIn(ns) finds until it finds none, or fails
// after timeout.
func killNS(ns nsID, timeout time.Duration) error {
	if sharedNS(ns) {
		return errors.New("testbed: refusing to kill the processes of a shared mount namespace")
	}
	deadline := time.Now().Add(timeout)
	for {
		pids := pidsIn(ns)
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL) // ESRCH: gone meanwhile
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testbed: processes %v still alive %v after SIGKILL", pids, timeout)
		}
		time.Sleep(2 * time.Millisecond) // exits take a moment after SIGKILL
	}
}

// procStat returns the parent pid and the start time (in clock ticks since boot) of pid,
// from /proc/PID/stat. Together pid and start time name one process even if the pid is
// reused.
func procStat(pid int) (ppid int, start uint64, err error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// "pid (comm) state ppid ...": comm may hold spaces and parentheses.
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("testbed: /proc/%d/stat: no ')'", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state), so field N is f[N-3].
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("testbed: /proc/%d/stat: %d fields", pid, len(f)+2)
	}
	if ppid, err = strconv.Atoi(f[1]); err != nil {
		return 0, 0, fmt.Errorf("testbed: /proc/%d/stat: ppid: %v", pid, err)
	}
	if start, err = strconv.ParseUint(f[19], 10, 64); err != nil {
		return 0, 0, fmt.Errorf("testbed: /proc/%d/stat: starttime: %v", pid, err)
	}
	return ppid, start, nil
}

// ownerTag names this test process in the source of a tmpfs that every test bed namespace
// mounts ("testbed-owner=PID.STARTTIME"), so that a later process can tell a namespace
// whose owner died (a test binary killed by -timeout leaves builds and sessions behind:
// Pdeathsig reaches only the first process of each namespace) and end it.
var ownerTag = sync.OnceValue(func() string {
	pid := os.Getpid()
	_, start, err := procStat(pid)
	if err != nil {
		return "testbed-owner=" + strconv.Itoa(pid) + ".0"
	}
	return "testbed-owner=" + strconv.Itoa(pid) + "." + strconv.FormatUint(start, 10)
})

// reapOrphans kills the processes of every test bed namespace whose owner has exited,
// and returns how many namespaces it ended.
func reapOrphans() (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	seen := map[nsID]bool{}
	reaped := 0
	var errs []error
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == 1 || pid == os.Getpid() {
			continue
		}
		// Held open while it is reaped, so that its number cannot pass to a new
		// namespace once its last process has exited (see KillCommand).
		nsFile, err := os.Open("/proc/" + strconv.Itoa(pid) + "/ns/mnt")
		if err != nil {
			continue
		}
		ns, err := nsOfFile(nsFile)
		if err != nil || seen[ns] {
			nsFile.Close()
			continue
		}
		seen[ns] = true
		owner, ok := nsOwner(pid)
		if !ok || ownerAlive(owner) || sharedNS(ns) {
			nsFile.Close()
			continue
		}
		if err := killNS(ns, killTimeout); err != nil {
			errs = append(errs, err)
		}
		nsFile.Close()
		reaped++
	}
	return reaped, errors.Join(errs...)
}

// nsOwner returns the owner tag value ("PID.STARTTIME") of the test bed namespace pid is
// in, or false if it is not in one.
func nsOwner(pid int) (string, bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/mountinfo")
	if err != nil {
		return "", false
	}
	for line := range strings.Lines(string(data)) {
		// "... - tmpfs testbed-owner=123.456 rw,..."
		_, after, ok := strings.Cut(line, " - tmpfs testbed-owner=")
		if !ok {
			continue
		}
		owner, _, _ := strings.Cut(after, " ")
		return owner, true
	}
	return "", false
}

// ownerAlive reports whether the process an owner tag value names still runs. An
// unreadable tag counts as alive: never kill what we cannot account for.
func ownerAlive(owner string) bool {
	pidText, startText, ok := strings.Cut(owner, ".")
	pid, err1 := strconv.Atoi(pidText)
	start, err2 := strconv.ParseUint(startText, 10, 64)
	if !ok || err1 != nil || err2 != nil || start == 0 {
		return true
	}
	_, got, err := procStat(pid)
	return err == nil && got == start
}
