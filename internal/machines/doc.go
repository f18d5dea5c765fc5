// Package machines turns the two ways of describing remote builders into one [Machine] type:
// nix-offload's own TOML file (offload.toml, read by [Load] and [Parse]) and Nix's `builders`
// setting in the machines format (read by [ParseBuilders]), so that existing setups keep working
// without a new file. Whatever the source, a machine is named by [Machine.Name]
// ("user@host:port" with the parts that are set) in logs, status and slot files.
//
// # offload.toml
//
// The hook reads $NIX_OFFLOAD_CONFIG, else /etc/nix/offload.toml. Every table is optional; with
// no [[machine]] the hook declines every build permanently.
//
//	[daemon]
//	socket = "/run/nix-offload/hook.sock"   # broker's unix socket (absolute path)
//	state-dir = "/var/lib/nix-offload"      # health memory, embedded-mode slot files
//	metrics = "127.0.0.1:9464"              # Prometheus listener; "" or absent = off
//
//	[ssh]                                   # what every machine inherits unless it says otherwise
//	user = "root"
//	ssh-key = "/etc/nix/offload_ed25519"
//	known-hosts = ["/etc/ssh/ssh_known_hosts"]
//	connect-timeout = "10s"                 # Go duration, > 0; default 10s
//	server-alive-interval = "15s"           # SSH keepalive interval, > 0; 3 missed close the
//	                                        # connection; default ssh_config's ServerAliveInterval, else 15s
//
//	[[machine]]                             # one table per machine
//	host = "builder1.example.org"           # required: name, address or ~/.ssh/config alias
//	port = 22                               # 1–65535; absent = ssh_config or 22
//	host-key = "ssh-ed25519 AAAAC3Nza…"     # pinned host key; else the known-hosts files
//	systems = ["x86_64-linux", "i686-linux"]  # required, not empty
//	parallel-builds = 8                     # slots, 1–1024; default 1
//	speed = 2.0                             # > 0; default 1.0
//	features = ["kvm", "big-parallel"]
//	mandatory-features = []
//	remote-store = ""                       # `--store` for the remote nix-store
//	protocol = "ssh"                        # "ssh": nix-store --serve; "ssh-ng": nix-daemon --stdio
//	remote-program = ""                     # the remote nix-store / nix-daemon, if not on PATH
//	enabled = true
//	min-free-space = "10G"                  # no build while the store has less free; K/M/G/T or bytes
//	max-load = 2.0                          # no new build above this load per core; 0 = no limit
//	# user, ssh-key, known-hosts, connect-timeout and server-alive-interval may be set here
//	# too, overriding [ssh]
//
// The file is checked strictly, and every problem found is reported, one per line, sorted by
// line, each naming file, line and key:
//
//	offload.toml:14: machine[2].parallel-builds: must be at least 1, got 0
//	offload.toml:15: machine[2]: unknown key "sytems" (did you mean "systems"?)
//
// Machines count from 1 in file order. Unknown keys (with a suggestion, also for names from
// NixOS's nix.buildMachines such as maxJobs or speedFactor), wrong types, impossible values, a
// host-key that is not one public key line (an empty one included), an ssh-key that holds a
// private key instead of naming its file (the value is not repeated), and two machines with
// the same Name (host names compared without case) are errors. A misspelt host-key is an
// unknown key like any other, so a typo cannot leave a machine unpinned.
//
// known-hosts = [] (or no known-hosts anywhere) means OpenSSH's files: ssh_config's
// UserKnownHostsFile and GlobalKnownHostsFile, else ~/.ssh/known_hosts and
// /etc/ssh/ssh_known_hosts. It never means "no verification": a machine whose key is neither
// pinned nor found in those files is refused. A pinned host-key alone decides; known-hosts
// files are not read for that machine.
// Inline tables and dotted keys are plain TOML and are accepted: `machine = [{ host = "b1",
// systems = ["x86_64-linux"] }]` is the same as a [[machine]] table.
//
// # The machines format
//
// Nix's `builders` setting (default "@/etc/nix/machines") lists machines one per line or
// separated by ';'; '#' comments run to the end of the line, and "@file" includes a file
// (a missing one is ignored, as Nix does). Each entry has up to eight whitespace-separated
// fields, "-" for a default:
//
//	# URI              systems                  SSH key              jobs speed supported            mandatory   host key (base64)
//	ssh://root@b1      x86_64-linux,i686-linux  /etc/nix/builder_key 8    2     kvm,big-parallel     benchmark   c3NoLWVkMjU1MTkg…
//	nix@b2:2222        aarch64-linux            -                    4
//	b3                 -                        -                    0    # max jobs 0: listed, never used
//
// Only machines reached over SSH can be offloaded to: "ssh://" and "ssh-ng://" URIs and bare
// "[user@]host[:port]" are accepted; local stores and other schemes are errors. "ssh-ng://"
// gives a machine [ProtocolSSHNG] (the daemon protocol, `nix-daemon --stdio`), the others
// [ProtocolSSH] (`nix-store --serve --write`); "?remote-program=/path/to/nix-store" (or
// nix-daemon) names the remote program where it is not on the remote user's non-login PATH,
// as on nix-darwin. See [ParseBuilders] for every field.
//
// # Checking machines from elsewhere
//
// [Validate] applies the same rules to a list of machines built in code, and both parsers
// enforce them, so a machine that came out of this package always passes Validate. Errors of
// all three are [*Error] values with File, Line and Key, joined with [errors.Join] when there
// are several.
package machines
