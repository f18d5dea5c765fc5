package hookproto

import "sync"

// Bounds of a [Relay].
const (
	// MaxRelayQueue is the most starts and results a Relay holds while
	// its writer is behind; more are dropped (stops are always kept).
	MaxRelayQueue = 256
	// MaxRelayActivities is the most activities of the machine a Relay
	// keeps open; starts beyond it are dropped, with their results.
	MaxRelayActivities = 1024
)

// Relay forwards a machine's activities (an ssh-ng daemon's
// START_ACTIVITY, STOP_ACTIVITY and RESULT) to Nix through a [Logger], as
// Nix's own ssh-ng hook does by passing them to its JSON logger (nix
// 2.34.8 src/libstore/worker-protocol-connection.cc processStderrReturn),
// so that the client shows the machine's phases and progress and, from
// Nix 2.19, the build's log file gets its setPhase lines.
//
// The machine's activity ids are remapped to ids of the Logger: they come
// from another process (its pid in the top half, like ours), so they
// could collide with the hook's own. Parents are not forwarded: Nix makes
// every hook activity a child of its worker activity whatever the message
// says.
//
// Dropped, as Nix could not take them or already has them: log line
// results ([ResBuildLogLine], [ResPostBuildLogLine]), which the hook
// writes to the build log (fd 4) and which Nix would write a second time;
// starts of type [ActFileTransfer] or [ActBuilds] (see [Logger.Start]) or
// of types this Nix may not know, and every message of a dropped
// activity; messages beyond [MaxRelayQueue] or [MaxRelayActivities].
// A [ResProgress] or [ResSetExpected] result replaces one of the same
// type for the same activity still queued, so a flood keeps its latest.
//
// Start, Result and Stop never block: a goroutine writes what they queue,
// so a stderr pipe Nix is slow to read never stalls the caller (the
// protocol reader). Call them from one goroutine at a time.
type Relay struct {
	log  *Logger
	wake chan struct{} // one token: something is queued
	done chan struct{} // closed when the writer has written all and ended

	mu     sync.Mutex
	ids    map[uint64]ActivityID // the machine's id → ours, while open
	queue  []relayed
	held   int  // starts and results in queue
	closed bool // Close was called
}

// relayed is one queued message: a start (text set), a result (res set)
// or a stop.
type relayed struct {
	kind   byte // 's'tart, 'r'esult, 'x' stop
	id     ActivityID
	typ    uint64
	level  Level
	text   string
	fields []any
}

// NewRelay returns a Relay writing to log, and starts its writer.
func NewRelay(log *Logger) *Relay {
	r := &Relay{log: log, wake: make(chan struct{}, 1), done: make(chan struct{}), ids: map[uint64]ActivityID{}}
	go r.write()
	return r
}

// Start forwards the machine's start of activity id.
func (r *Relay) Start(id, level, typ uint64, text string, fields []any) {
	t := ActivityType(typ)
	if level > uint64(LvlVomit) || t == ActFileTransfer || t == ActBuilds ||
		(t != ActUnknown && (t < ActCopyPath || t > ActBuildWaiting)) {
		return
	}
	fs, err := checkFields("start", fields)
	if err != nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, open := r.ids[id]; open || r.closed || len(r.ids) >= MaxRelayActivities || r.held >= MaxRelayQueue {
		return
	}
	ours := r.log.newID()
	r.ids[id] = ours
	r.push(relayed{kind: 's', id: ours, typ: typ, level: Level(level), text: text, fields: fs})
}

// Result forwards a result of the machine's activity id.
func (r *Relay) Result(id, typ uint64, fields []any) {
	t := ResultType(typ)
	if t == ResBuildLogLine || t == ResPostBuildLogLine || t < ResFileLinked || t > ResPostBuildLogLine {
		return
	}
	fs, err := checkFields("result", fields)
	if err != nil {
		return
	}
	if t == ResSetPhase {
		if len(fs) == 0 {
			return
		}
		if _, ok := fs[0].(string); !ok {
			return
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	ours, open := r.ids[id]
	if !open || r.closed {
		return
	}
	if t == ResProgress || t == ResSetExpected {
		for i := len(r.queue) - 1; i >= 0; i-- {
			if q := &r.queue[i]; q.kind == 'r' && q.id == ours && q.typ == typ &&
				(t == ResProgress || sameFirst(q.fields, fs)) {
				q.fields = fs
				return
			}
		}
	}
	if r.held >= MaxRelayQueue {
		return
	}
	r.push(relayed{kind: 'r', id: ours, typ: typ, fields: fs})
}

// sameFirst: two SetExpected results for the same activity type (their
// first field), of which the later replaces the earlier.
func sameFirst(a, b []any) bool { return len(a) > 0 && len(b) > 0 && a[0] == b[0] }

// Stop forwards the end of the machine's activity id.
func (r *Relay) Stop(id uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	ours, open := r.ids[id]
	if !open || r.closed {
		return
	}
	delete(r.ids, id)
	r.push(relayed{kind: 'x', id: ours})
}

// push queues m and wakes the writer; r.mu is held.
func (r *Relay) push(m relayed) {
	r.queue = append(r.queue, m)
	if m.kind != 'x' {
		r.held++
	}
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Close stops the activities still open, waits until the writer has
// written everything queued, and ends it. Messages after Close are
// dropped.
func (r *Relay) Close() {
	r.mu.Lock()
	if !r.closed {
		for id, ours := range r.ids {
			delete(r.ids, id)
			r.push(relayed{kind: 'x', id: ours})
		}
		r.closed = true
		select {
		case r.wake <- struct{}{}:
		default:
		}
	}
	r.mu.Unlock()
	<-r.done
}

// write is the writer goroutine.
func (r *Relay) write() {
	defer close(r.done)
	for range r.wake {
		r.mu.Lock()
		q := r.queue
		r.queue, r.held = nil, 0
		closed := r.closed
		r.mu.Unlock()
		for _, m := range q {
			// A failed write makes the Logger write nothing more; the
			// build goes on without its activities.
			switch m.kind {
			case 's':
				r.log.start(m.id, ActivityType(m.typ), m.level, m.text, m.fields)
			case 'r':
				r.log.Result(m.id, ResultType(m.typ), m.fields...)
			case 'x':
				r.log.Stop(m.id)
			}
		}
		if closed {
			return
		}
	}
}
