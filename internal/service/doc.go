// Package service is the process plumbing of the broker, `nix-offload-hook daemon`: where it
// listens, how it talks to systemd, and how it logs. It knows nothing of builds; the broker
// wires these pieces together. The unit files that go with it are systemd/nix-offload.socket
// and systemd/nix-offload.service.
//
// # The socket is root's alone
//
// Hook processes reach the broker over a unix socket, by default /run/nix-offload/hook.sock.
// Whoever can connect to it can have the broker build anything on the remote machines and
// fetch the outputs, so only root (the user nix-daemon runs hooks as) may connect:
//
//   - The socket file is mode 0600 and owned by root. Under systemd the socket unit creates it
//     that way (SocketMode=0600). When the broker creates it itself, [Listen] binds it inside
//     a fresh 0700 directory, sets 0600, and only then links it into place, so there is no
//     moment at which another user could connect. It never changes the process-wide umask.
//   - [PeerUID] reads the kernel's record of who connected (SO_PEERCRED), so the broker can
//     refuse a peer that is not root even if the file's mode was loosened by mistake.
//
// # Socket activation: the first hook starts the broker
//
// With nix-offload.socket enabled, systemd owns the socket from boot on. The first hook that
// connects makes systemd start nix-offload.service and hand it the listening socket (the
// LISTEN_FDS protocol); the connection waits in the backlog meanwhile and is served once the
// broker accepts. A broker restart (crash, watchdog, upgrade) therefore loses no connection
// attempt: hooks that connect while it is down wait in the same backlog. [Listen] takes the
// passed socket when there is one and creates its own otherwise, and says which happened.
//
// # Readiness and the watchdog
//
// The service is Type=notify: [Notifier.Ready] tells systemd the broker has read its
// configuration and is serving, [Notifier.Status] sets the line `systemctl status` shows, and
// [Notifier.Stopping] says a SIGTERM is being handled (systemd then waits TimeoutStopSec for
// running builds to finish or be handed back). [Notifier.Watchdog] pings systemd at half of
// WatchdogSec for as long as a health check passes. A broker that is wedged (its health check
// fails or never returns) stops pinging, and systemd kills and restarts it (Restart=on-failure
// covers watchdog timeouts). systemd enforces the watchdog only while the unit is starting or
// running: once the stop has begun, only TimeoutStopSec applies. Every notification is a
// no-op outside systemd, so the same binary runs unchanged from a shell.
//
// # Logs
//
// The broker logs to stderr. [NewLogger] writes one line per entry, always: zap's console
// encoder copies messages verbatim, so newlines in them are escaped here. Under systemd
// ([UnderJournal]) a line carries no timestamp (the journal adds its own) and starts with the
// sd-daemon priority prefix, so `journalctl -p warning` works:
//
//	<4>machine unreachable {"machine": "b1", "error": "dial tcp …: connection refused"}
//
// Elsewhere it is a readable line with an ISO 8601 timestamp and the level's name.
package service
