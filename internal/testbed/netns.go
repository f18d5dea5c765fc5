package testbed

// Builder hosts in network namespaces of their own, for faults of the network: a link that
// is cut (packets vanish, nobody sends a reset) or slow and lossy.
//
// The kernel of the project's machines has no netem and no tc classifiers or actions, and
// the machines have no iptables or nft, so the faults are built from what exists: `ip link
// set down` on the builder's end of the veth pair for a cut, and a tbf qdisc with a small
// rate and a small queue on both ends for a slow, lossy link (tail drops, hence real TCP
// retransmissions, and queueing delay).

import (
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
)

const (
	// netnsDir is where `ip netns` keeps the names of network namespaces.
	netnsDir = "/run/netns"
	// netnsPrefix starts the name of every network namespace the test bed makes:
	// "nxo-K-OWNER", with K the index of its /30 and OWNER the test process (see
	// ownerTag), so that reapNets can remove what a dead test process left.
	netnsPrefix = "nxo-"
	// netSubnets is the number of /30 networks in 10.213.0.0/16, the test bed's range.
	netSubnets = 1 << 14
	// blackholeMetric is the metric of the blackhole route that backs each /30: if the
	// host's end of a pair ever goes away while something still sends to the builder's
	// address, the packets stop here instead of leaving through the default route.
	blackholeMetric = "4000"
)

// netLink is a builder's network namespace and the veth pair that joins it to the test
// process's namespace. All of its names derive from k.
type netLink struct {
	k        int
	name     string // network namespace: "nxo-K-OWNER"
	hostIf   string // "nxohK", in the test's namespace, address hostAddr
	peerIf   string // "nxobK", in the builder's namespace, address peerAddr
	network  string // "10.213.A.B/30"
	hostAddr string
	peerAddr string
}

func newNetLink(k int, owner string) *netLink {
	base := 4 * k
	prefix := fmt.Sprintf("10.213.%d.", base>>8)
	low := base & 255
	return &netLink{
		k:        k,
		name:     netnsPrefix + strconv.Itoa(k) + "-" + owner,
		hostIf:   "nxoh" + strconv.Itoa(k),
		peerIf:   "nxob" + strconv.Itoa(k),
		network:  prefix + strconv.Itoa(low) + "/30",
		hostAddr: prefix + strconv.Itoa(low+1),
		peerAddr: prefix + strconv.Itoa(low+2),
	}
}

// nsPath is the file nsenter --net takes.
func (l *netLink) nsPath() string { return netnsDir + "/" + l.name }

// ownerValue is this process's owner tag without its "testbed-owner=" key: "PID.START".
func ownerValue() string { return strings.TrimPrefix(ownerTag(), "testbed-owner=") }

// netLockPrefix names the abstract unix sockets that reserve /30 networks among test
// processes, as addrLockPrefix does for loopback addresses.
const netLockPrefix = addrLockPrefix + "net/"

// reserveNet makes a network namespace with a veth pair on a /30 that no other builder
// uses. The network stays reserved until lock is closed, which must come after remove.
func reserveNet() (*netLink, net.Listener, error) {
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := lookTool(tool); err != nil {
			return nil, nil, fmt.Errorf("WithNetNS needs %s: %v (apt-get install iproute2 util-linux)", tool, err)
		}
	}
	first := mrand.IntN(netSubnets)
	var errs []error
	for i := range netSubnets {
		k := (first + i) % netSubnets
		lock, err := net.Listen("unix", netLockPrefix+strconv.Itoa(k))
		if err != nil {
			continue // another builder has it
		}
		l := newNetLink(k, ownerValue())
		err = l.create()
		if err == nil {
			return l, lock, nil
		}
		// A pair or namespace left by a process that died before reapNets ran has this
		// name: take the next /30. Anything else will fail for every /30 alike.
		rerr := l.remove()
		lock.Close()
		errs = append(errs, err)
		if !strings.Contains(err.Error(), "File exists") || rerr != nil || len(errs) >= 8 {
			return nil, nil, errors.Join(append(errs, rerr)...)
		}
	}
	return nil, nil, errors.New("no free /30 in 10.213.0.0/16")
}

// create makes the namespace, the pair, the addresses and the blackhole route.
func (l *netLink) create() error {
	steps := [][]string{
		{"ip", "netns", "add", l.name},
		{"ip", "link", "add", l.hostIf, "type", "veth", "peer", "name", l.peerIf, "netns", l.name},
		{"ip", "addr", "add", l.hostAddr + "/30", "dev", l.hostIf},
		{"ip", "route", "add", "blackhole", l.network, "metric", blackholeMetric},
		{"ip", "link", "set", l.hostIf, "up"},
		{"ip", "-n", l.name, "addr", "add", l.peerAddr + "/30", "dev", l.peerIf},
		{"ip", "-n", l.name, "link", "set", "lo", "up"},
		{"ip", "-n", l.name, "link", "set", l.peerIf, "up"},
	}
	for _, s := range steps {
		if err := run(s...); err != nil {
			return err
		}
	}
	return nil
}

// remove deletes the pair, the route and the namespace's name, whichever exist. The
// namespace itself ends with the last process (or mount) that holds it; without its
// veth it reaches nothing.
func (l *netLink) remove() error {
	var errs []error
	for _, s := range [][]string{
		{"ip", "link", "del", l.hostIf}, // deletes both ends
		{"ip", "route", "del", "blackhole", l.network, "metric", blackholeMetric},
		{"ip", "netns", "del", l.name},
	} {
		if err := run(s...); err != nil && !isGone(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// isGone reports whether an ip command failed because what it was to delete is not there.
func isGone(err error) bool {
	msg := err.Error()
	for _, s := range []string{"Cannot find device", "No such file", "No such process", "does not exist"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// cut takes the builder's end of the pair down: from then on the packets either side
// sends are dropped without a word, as when a cable is pulled.
func (l *netLink) cut() error {
	return run("ip", "-n", l.name, "link", "set", l.peerIf, "down")
}

// restore brings the builder's end up again and removes any shaping.
func (l *netLink) restore() error {
	if err := run("ip", "-n", l.name, "link", "set", l.peerIf, "up"); err != nil {
		return err
	}
	// While the link was cut, address resolution for the other end failed; the kernel
	// keeps answering "No route to host" for a few seconds after, unless it forgets.
	for _, s := range [][]string{
		{"ip", "neigh", "flush", "dev", l.hostIf},
		{"ip", "-n", l.name, "neigh", "flush", "dev", l.peerIf},
	} {
		if err := run(s...); err != nil {
			return err
		}
	}
	for _, s := range [][]string{
		{"tc", "qdisc", "del", "dev", l.hostIf, "root"},
		{"tc", "-n", l.name, "qdisc", "del", "dev", l.peerIf, "root"},
	} {
		if err := run(s...); err != nil && !strings.Contains(err.Error(), "No such file") &&
			!strings.Contains(err.Error(), "Cannot delete qdisc with handle of zero") {
			return err
		}
	}
	return nil
}

// shape puts a tbf qdisc with the given rate and queue limit on both ends of the pair.
func (l *netLink) shape(rateBits int64, limitBytes int) error {
	if _, err := lookTool("tc"); err != nil {
		return fmt.Errorf("ShapeLink needs tc: %v (apt-get install iproute2)", err)
	}
	// The bucket must hold a full-size packet or nothing ever leaves.
	burst := max(limitBytes, 4096)
	args := []string{"qdisc", "replace", "dev", "", "root", "tbf",
		"rate", strconv.FormatInt(rateBits, 10) + "bit", "burst", strconv.Itoa(burst), "limit", strconv.Itoa(limitBytes)}
	host := append([]string{"tc"}, args...)
	host[4] = l.hostIf
	peer := append([]string{"tc", "-n", l.name}, args...)
	peer[6] = l.peerIf
	if err := run(host...); err != nil {
		return err
	}
	return run(peer...)
}

// drops returns the packets the shaping qdiscs of both ends dropped.
func (l *netLink) drops() (int64, error) {
	var total int64
	for _, argv := range [][]string{
		{"-s", "qdisc", "show", "dev", l.hostIf},
		{"-n", l.name, "-s", "qdisc", "show", "dev", l.peerIf},
	} {
		path, err := lookTool("tc")
		if err != nil {
			return 0, err
		}
		out, err := exec.Command(path, argv...).Output()
		if err != nil {
			return 0, fmt.Errorf("tc %s: %v", strings.Join(argv, " "), err)
		}
		// " Sent 1234 bytes 56 pkt (dropped 7, overlimits 8 requeues 0)"
		for _, f := range strings.Split(string(out), "(dropped ")[1:] {
			n, err := strconv.ParseInt(strings.TrimRight(strings.Fields(f)[0], ","), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("tc %s: cannot read %q", strings.Join(argv, " "), f)
			}
			total += n
		}
	}
	return total, nil
}

// run runs a test bed tool and returns its output in the error when it fails.
func run(argv ...string) error {
	path, err := lookTool(argv[0])
	if err != nil {
		return err
	}
	out, err := exec.Command(path, argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(argv, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// reapNets removes the network namespaces, veth pairs and routes of test processes that
// died, and returns how many it removed. Their processes are reapOrphans's business.
func reapNets() (int, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n := 0
	var errs []error
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), netnsPrefix)
		if !ok {
			continue
		}
		kText, owner, ok := strings.Cut(rest, "-")
		k, err := strconv.Atoi(kText)
		if !ok || err != nil || k < 0 || k >= netSubnets || ownerAlive(owner) {
			continue
		}
		l := newNetLink(k, owner)
		if l.name != e.Name() {
			continue // not one of ours after all
		}
		if err := l.remove(); err != nil {
			errs = append(errs, err)
		}
		n++
	}
	return n, errors.Join(errs...)
}
