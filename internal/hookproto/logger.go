package hookproto

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
)

// Level is a Nix verbosity level (nix 2.8.0 src/libutil/error.hh
// Verbosity; unchanged through 2.35).
type Level uint8

const (
	LvlError Level = iota
	LvlWarn
	LvlNotice
	LvlInfo
	LvlTalkative
	LvlChatty
	LvlDebug
	LvlVomit
)

// ActivityType is the type of an activity (nix 2.8.0
// src/libutil/logging.hh; later versions only add types after 111, which
// older ones do not know, so they are left out).
type ActivityType uint64

const (
	ActUnknown       ActivityType = 0
	ActCopyPath      ActivityType = 100
	ActFileTransfer  ActivityType = 101
	ActRealise       ActivityType = 102
	ActCopyPaths     ActivityType = 103
	ActBuilds        ActivityType = 104
	ActBuild         ActivityType = 105
	ActOptimiseStore ActivityType = 106
	ActVerifyPaths   ActivityType = 107
	ActSubstitute    ActivityType = 108
	ActQueryPathInfo ActivityType = 109
	ActPostBuildHook ActivityType = 110
	ActBuildWaiting  ActivityType = 111
)

// ResultType is the type of an activity's result (nix 2.8.0
// src/libutil/logging.hh).
type ResultType uint64

const (
	ResFileLinked       ResultType = 100
	ResBuildLogLine     ResultType = 101 // fields: the line (string)
	ResUntrustedPath    ResultType = 102
	ResCorruptedPath    ResultType = 103
	ResSetPhase         ResultType = 104 // fields: the phase (string)
	ResProgress         ResultType = 105 // fields: done, expected, running, failed
	ResSetExpected      ResultType = 106 // fields: activity type, expected
	ResPostBuildLogLine ResultType = 107
)

// ActivityID names an activity this hook started. Nix keeps the hook's
// activities in a map by this id (one map per hook process), and starts
// an activity of its own, with its own id, for each: ids only need to be
// unique within the process.
type ActivityID uint64

// Logger writes Nix's internal-json log messages, `@nix {…}` lines, to
// the hook's stderr. Nix parses them as trusted messages of this hook
// (handleJSONLogMessage with trusted = true, parent = the worker's
// activity) before a reply and after `# accept`: "msg" lines reach the
// client at their level, "start" makes Nix start an activity of its own
// that "result" and "stop" then address. Plain text lines are dropped
// after `# accept`, so everything a hook says should go through a Logger.
//
// Every message carries every field the parser of any version reads:
// Nix ≤ 2.24.10 crashes on a missing one. The methods also refuse what
// Nix would choke on: levels above [LvlVomit], unknown types, fields that
// are neither strings nor non-negative integers.
//
// Writes are synchronous, one Write call per line under a mutex, so lines
// never interleave and they stay in order with the replies written to the
// same stderr (write those after a Logger call returns). A write blocks
// while the 64 KiB pipe is full, which happens while Nix waits on another
// hook; do not log from code that must not stall. After the first failed
// write the Logger writes nothing more and returns that error.
//
// A Logger is safe for concurrent use.
type Logger struct {
	mu  sync.Mutex // guards w, buf and err
	w   io.Writer
	buf bytes.Buffer
	err error

	idBase uint64
	nextID atomic.Uint64
}

// NewLogger returns a Logger writing to w, the hook's stderr (fd 2).
func NewLogger(w io.Writer) *Logger {
	// As Nix does (logging.cc, Activity::Activity): the pid in the top
	// half, so ids from different processes differ.
	return &Logger{w: w, idBase: uint64(os.Getpid()) << 32}
}

// Msg logs text at level: `{"action":"msg","level":N,"msg":"…"}`. Nix
// shows it to the client if the client's verbosity is at least level.
func (l *Logger) Msg(level Level, text string) error {
	if level > LvlVomit {
		return fmt.Errorf("hookproto: msg: level %d is above %d", level, LvlVomit)
	}
	return l.write(struct {
		Action string `json:"action"`
		Level  Level  `json:"level"`
		Msg    string `json:"msg"`
	}{"msg", level, text})
}

// Start starts an activity and returns its id, for [Logger.Result] and
// [Logger.Stop]: `{"action":"start","id":N,"level":L,"type":T,
// "text":"…","fields":[…],"parent":0}`. Nix ignores "parent" (it makes
// the activity a child of its own worker activity) but its JSONLogger
// writes it, so it is sent as 0.
//
// [ActFileTransfer] (101) and [ActBuilds] (104) are refused: Nix checks
// the "type" of every hook message without looking at "action", so a
// start of type 101 or 104 would be taken for a [ResBuildLogLine] or
// [ResSetPhase] result and its first field written into the build log
// (or, if not a string, throw).
func (l *Logger) Start(typ ActivityType, level Level, text string, fields ...any) (ActivityID, error) {
	switch {
	case level > LvlVomit:
		return 0, fmt.Errorf("hookproto: start: level %d is above %d", level, LvlVomit)
	case typ == ActFileTransfer || typ == ActBuilds:
		return 0, fmt.Errorf("hookproto: start: activity type %d would be taken for a result of the same number", typ)
	case typ != ActUnknown && (typ < ActCopyPath || typ > ActBuildWaiting):
		return 0, fmt.Errorf("hookproto: start: unknown activity type %d", typ)
	}
	fs, err := checkFields("start", fields)
	if err != nil {
		return 0, err
	}
	id := l.newID()
	return id, l.start(id, typ, level, text, fs)
}

// newID returns an activity id no other activity of this Logger has.
func (l *Logger) newID() ActivityID { return ActivityID(l.idBase + l.nextID.Add(1)) }

// start writes the start of activity id; typ, level and fs are checked.
func (l *Logger) start(id ActivityID, typ ActivityType, level Level, text string, fs []any) error {
	return l.write(struct {
		Action string       `json:"action"`
		ID     ActivityID   `json:"id"`
		Level  Level        `json:"level"`
		Type   ActivityType `json:"type"`
		Text   string       `json:"text"`
		Fields []any        `json:"fields"`
		Parent uint64       `json:"parent"`
	}{"start", id, level, typ, text, fs, 0})
}

// Result reports a result of an activity this Logger started:
// `{"action":"result","id":N,"type":T,"fields":[…]}`. Nix drops results
// for ids it has not seen started. A [ResBuildLogLine] result also goes
// into the derivation's log file (as the ssh-ng route does), and from Nix
// 2.19 a [ResSetPhase] result adds a setPhase line there: both need a
// string as first field.
func (l *Logger) Result(id ActivityID, typ ResultType, fields ...any) error {
	if typ < ResFileLinked || typ > ResPostBuildLogLine {
		return fmt.Errorf("hookproto: result: unknown result type %d", typ)
	}
	fs, err := checkFields("result", fields)
	if err != nil {
		return err
	}
	if typ == ResBuildLogLine || typ == ResSetPhase {
		if len(fs) == 0 {
			return fmt.Errorf("hookproto: result: type %d needs a string field", typ)
		}
		if _, ok := fs[0].(string); !ok {
			return fmt.Errorf("hookproto: result: type %d: field 0 is a %T, not a string", typ, fs[0])
		}
	}
	return l.write(struct {
		Action string     `json:"action"`
		ID     ActivityID `json:"id"`
		Type   ResultType `json:"type"`
		Fields []any      `json:"fields"`
	}{"result", id, typ, fs})
}

// Stop ends an activity: `{"action":"stop","id":N}`. Nix also stops the
// hook's activities when the hook exits.
func (l *Logger) Stop(id ActivityID) error {
	return l.write(struct {
		Action string     `json:"action"`
		ID     ActivityID `json:"id"`
	}{"stop", id})
}

// checkFields returns fields as Nix can read them: strings and
// non-negative integers (as uint64), never null.
func checkFields(msg string, fields []any) ([]any, error) {
	fs := make([]any, len(fields))
	for i, f := range fields {
		var v any
		switch f := f.(type) {
		case string:
			v = f
		case uint:
			v = uint64(f)
		case uint8:
			v = uint64(f)
		case uint16:
			v = uint64(f)
		case uint32:
			v = uint64(f)
		case uint64:
			v = f
		case int:
			v = int64(f)
		case int8:
			v = int64(f)
		case int16:
			v = int64(f)
		case int32:
			v = int64(f)
		case int64:
			v = f
		default:
			return nil, fmt.Errorf("hookproto: %s: field %d is a %T; Nix takes only strings and non-negative integers", msg, i, f)
		}
		if n, ok := v.(int64); ok {
			if n < 0 {
				return nil, fmt.Errorf("hookproto: %s: field %d is negative (%d); Nix takes only strings and non-negative integers", msg, i, n)
			}
			v = uint64(n)
		}
		fs[i] = v
	}
	return fs, nil
}

func (l *Logger) write(v any) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.err != nil {
		return l.err
	}
	l.buf.Reset()
	l.buf.WriteString("@nix ")
	enc := json.NewEncoder(&l.buf)
	enc.SetEscapeHTML(false)
	// Encode replaces invalid UTF-8 with U+FFFD, which Nix's parser
	// needs, and ends the line with "\n".
	if err := enc.Encode(v); err != nil {
		return fmt.Errorf("hookproto: encoding log message: %w", err)
	}
	if _, err := l.w.Write(l.buf.Bytes()); err != nil {
		l.err = fmt.Errorf("hookproto: writing log message: %w", err)
		return l.err
	}
	return nil
}
