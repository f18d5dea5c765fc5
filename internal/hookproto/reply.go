package hookproto

import (
	"fmt"
	"io"
	"strings"
)

// The replies to a "try", each one line on stderr that starts with "# "
// (nix 2.8.0 derivation-goal.cc tryBuildHook; unchanged through 2.35).
// Nix reads stderr one byte at a time up to each newline, so a reply must
// be a whole line; each is written in one Write call so that concurrent
// [Logger] lines cannot split it.
const (
	replyAccept             = "# accept\n"
	replyDecline            = "# decline\n"
	replyDeclinePermanently = "# decline-permanently\n"
	replyPostpone           = "# postpone\n"
)

// Accept takes the build: `# accept` and then the machine's name on a
// line of its own. Nix shows the name only ("building '…' on 'machine'"),
// then writes the lists [ReadAccepted] reads and closes stdin. Newlines in
// machine become spaces: a second line would be read as the start of the
// hook's output.
func Accept(w io.Writer, machine string) error {
	machine = strings.NewReplacer("\n", " ", "\r", " ").Replace(machine)
	return reply(w, "accept", replyAccept+machine+"\n")
}

// Decline lets Nix build the derivation itself. With a free local slot
// it builds at once; without one it waits for a slot and then asks this
// hook again. A derivation the local machine cannot build (wrong system,
// missing features) then fails: Nix ≤ 2.29 aborts the whole invocation.
func Decline(w io.Writer) error {
	return reply(w, "decline", replyDecline)
}

// DeclinePermanently declines this request and every later one of this
// Nix invocation: Nix kills the hook and sends no more "try"s. It is the
// answer when remote builds are off (no machines configured).
func DeclinePermanently(w io.Writer) error {
	return reply(w, "decline-permanently", replyDeclinePermanently)
}

// Postpone asks Nix to try again later: it releases the derivation's
// locks and asks the same hook process again after build-poll-interval
// (5 s by default). It is the answer when a matching machine exists but
// all its slots are taken.
func Postpone(w io.Writer) error {
	return reply(w, "postpone", replyPostpone)
}

func reply(w io.Writer, name, line string) error {
	if _, err := io.WriteString(w, line); err != nil {
		return fmt.Errorf("hookproto: writing reply %q: %w", name, err)
	}
	return nil
}
