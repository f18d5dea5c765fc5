// Package sshconn opens verified SSH connections to build machines with
// golang.org/x/crypto/ssh.
//
// A [machines.Machine] is first turned into a [Target] by [Resolve], which
// fills what the machine leaves unset from OpenSSH's configuration files
// (~/.ssh/config, /etc/ssh/ssh_config), so `host = "builder1"` may be an alias
// exactly as it is for `ssh builder1`. [Dial] then connects, checks the host
// key, authenticates and starts keepalives.
//
// # Host keys
//
// There is no connection without a verified host key. A machine either pins
// its key (`host-key`, as in Nix's machines file) or the key must be listed
// in one of its known-hosts files. An unknown host is refused, never trusted
// on first use; the error shows the key the host offered so that an operator
// can compare it out of band and pin it. Failures are a [*HostKeyError].
//
// A pinned key alone decides: known-hosts files are not read for that
// machine, so a wrong pin is refused even where known_hosts lists the host's
// real key. A pin that is set but does not parse is an error, never "no pin".
// Without a pin, an empty or missing set of known-hosts files refuses every
// host, and "@revoked" lines are honoured. Of ssh_config, [Resolve] reads
// only HostName, Port, User, IdentityFile, UserKnownHostsFile,
// GlobalKnownHostsFile and ConnectTimeout: StrictHostKeyChecking,
// HostKeyAlias, CheckHostIP and KnownHostsCommand have no effect, so no
// ssh_config setting can turn verification off.
//
// x/crypto/ssh asks a server for ECDSA or RSA host keys before Ed25519, so a
// client that knows only a host's Ed25519 key would be offered another type
// and reject it as a mismatch. Dial therefore sets HostKeyAlgorithms to the
// types of the keys it will accept.
//
// # Authentication
//
// Private key files (unencrypted; an encrypted key must be loaded into an
// agent) and, when SSH_AUTH_SOCK is set, the keys of ssh-agent. Key material
// and passphrases never appear in errors or logs: only file names do, and a
// key file setting that holds a key instead of a file name is refused without
// being shown. A key file must be a regular file of at most 1 MiB.
//
// # Liveness
//
// A connection sends keepalive@openssh.com requests and closes itself when
// the peer stops answering, so a vanished machine turns into an error on
// every session of that connection rather than a hang. The interval is the
// machine's server-alive-interval, else ssh_config's ServerAliveInterval,
// else 15 s; three unanswered in a row close the connection, and
// [Client.Lost] then says so, for the sessions' errors.
package sshconn
