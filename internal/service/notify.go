package service

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
)

// Notifier sends the broker's state to systemd (sd_notify(3)). Outside systemd, where
// NOTIFY_SOCKET is unset, every method does nothing. The zero value is ready to use and logs
// nothing; a Notifier is safe for concurrent use.
//
// A notification that cannot be sent is logged as a warning and otherwise ignored: failing to
// tell systemd something is no reason to stop serving builds (a missed READY=1 shows up as a
// start timeout, missed pings as a watchdog restart).
type Notifier struct {
	log *zap.Logger
}

// NewNotifier returns a Notifier that logs to log (nil: nowhere).
func NewNotifier(log *zap.Logger) *Notifier {
	return &Notifier{log: log}
}

func (n *Notifier) logger() *zap.Logger {
	if n == nil || n.log == nil {
		return zap.NewNop()
	}
	return n.log
}

// Ready tells systemd that the broker is serving (READY=1), with status as the line `systemctl
// status` shows, if it is not empty. Until Ready, a Type=notify unit is "activating" and units
// ordered after it wait.
func (n *Notifier) Ready(status string) {
	state := "READY=1"
	if status != "" {
		state += "\nSTATUS=" + oneLine(status)
	}
	n.notify(state)
}

// Stopping tells systemd that the broker is shutting down (STOPPING=1), so that it shows the
// unit as "deactivating" while running builds finish. The watchdog is no longer enforced from
// then on; TimeoutStopSec is.
func (n *Notifier) Stopping() {
	n.notify("STOPPING=1")
}

// Status sets the line `systemctl status` shows for the unit.
func (n *Notifier) Status(status string) {
	n.notify("STATUS=" + oneLine(status))
}

// Watchdog keeps systemd's watchdog fed while the broker is healthy. If the unit has a watchdog
// (WatchdogSec=, passed as WATCHDOG_USEC and WATCHDOG_PID), Watchdog calls healthy at once and
// then every half interval, and sends WATCHDOG=1 after each call that returns nil.
//
// When healthy returns an error, Watchdog logs it, sets the unit's status to say why, stops
// pinging for good and returns the error: systemd then kills the broker when the interval runs
// out and restarts it (Restart=on-failure). A healthy that never returns has the same effect,
// without the log line. healthy should therefore check what would make the broker useless
// (its accept loop or scheduler no longer making progress, say) and nothing transient.
//
// Watchdog returns nil at once if there is no watchdog, and when ctx is done. Cancel ctx only
// at the end of shutdown: systemd stops enforcing the watchdog once the stop has begun, so
// pinging while builds drain is harmless.
func (n *Notifier) Watchdog(ctx context.Context, healthy func() error) error {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return nil
	}
	interval, err := watchdogInterval()
	if err != nil {
		n.logger().Warn("systemd watchdog settings are invalid; not pinging it", zap.Error(err))
		return fmt.Errorf("watchdog: %w", err)
	}
	if interval <= 0 {
		return nil
	}
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	for {
		if ctx.Err() != nil {
			return nil
		}
		if err := healthy(); err != nil {
			n.logger().Error("health check failed; no longer pinging the systemd watchdog, which will restart the broker",
				zap.Error(err), zap.Duration("watchdog", interval))
			n.Status("unhealthy, waiting for the watchdog to restart it: " + err.Error())
			return fmt.Errorf("watchdog: health check failed: %w", err)
		}
		n.notify("WATCHDOG=1")
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// notify sends one notification, if there is a NOTIFY_SOCKET (sd_notify(3), through
// go-systemd's daemon package).
func (n *Notifier) notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		n.logger().Warn("cannot notify systemd", zap.String("state", state), zap.Error(err))
	}
}

// watchdogInterval is the watchdog interval systemd set for this process, or 0 if it set none
// (sd_watchdog_enabled(3)): WATCHDOG_USEC in microseconds, which applies to this process
// unless WATCHDOG_PID names another one.
func watchdogInterval() (time.Duration, error) {
	return daemon.SdWatchdogEnabled(false)
}

// oneLine keeps a status to one line: a newline in it would start another assignment, such as
// READY=1, in the notification.
func oneLine(s string) string {
	return strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(s)
}
