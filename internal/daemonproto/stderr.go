package daemonproto

import (
	"fmt"
	"math"
	"strings"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// Log message tags the daemon sends before each reply (nix 2.8.0
// src/libstore/worker-protocol.hh STDERR_*).
const (
	stderrNext          = 0x6f6c6d67
	stderrRead          = 0x64617461 // the daemon wants data from the client
	stderrWrite         = 0x64617416 // the daemon sends data for a client sink
	stderrLast          = 0x616c7473
	stderrError         = 0x63787470
	stderrStartActivity = 0x53545254
	stderrStopActivity  = 0x53544f50
	stderrResult        = 0x52534c54
)

// MessageKind says which log message a [Message] is.
type MessageKind int

const (
	// Next is a line of text (STDERR_NEXT) in Message.Text, with its
	// newline.
	Next MessageKind = iota + 1
	// StartActivity opens activity Message.ID of Message.Type, with
	// Message.Text, Message.Fields and Message.Parent.
	StartActivity
	// StopActivity ends activity Message.ID.
	StopActivity
	// Result is a result of Message.Type for activity Message.ID with
	// Message.Fields: [ResultBuildLogLine] carries one line of build
	// output, without its newline, in Fields[0].
	Result
)

func (k MessageKind) String() string {
	switch k {
	case Next:
		return "NEXT"
	case StartActivity:
		return "START_ACTIVITY"
	case StopActivity:
		return "STOP_ACTIVITY"
	case Result:
		return "RESULT"
	}
	return fmt.Sprintf("MessageKind(%d)", int(k))
}

// Activity and result types that matter to a build client (nix 2.8.0
// src/libutil/logging.hh ActivityType, ResultType). Others arrive as
// they are.
const (
	ActivityBuild        = 105 // actBuild: fields drvPath, machine, round, rounds
	ResultBuildLogLine   = 101 // resBuildLogLine: field line
	ResultSetPhase       = 104 // resSetPhase: field phase
	ResultProgress       = 105 // resProgress: done, expected, running, failed
	ResultPostBuildLogLn = 107 // resPostBuildLogLine: field line
)

// Message is one log message of the daemon.
type Message struct {
	Kind  MessageKind
	ID    uint64 // the activity (StartActivity, StopActivity, Result)
	Level uint64 // verbosity (StartActivity)
	// Type is the activity type (StartActivity) or the result type
	// (Result).
	Type   uint64
	Text   string
	Fields []any // each a uint64 or a string, as Nix's Logger::Field
	Parent uint64
}

// LogLine returns the line of build output a Result of type
// [ResultBuildLogLine] or [ResultPostBuildLogLn] carries.
func (m Message) LogLine() (string, bool) {
	if m.Kind != Result || (m.Type != ResultBuildLogLine && m.Type != ResultPostBuildLogLn) || len(m.Fields) == 0 {
		return "", false
	}
	s, ok := m.Fields[0].(string)
	return s, ok
}

// stderr reads log messages up to STDERR_LAST, passing each to
// Options.Log (nix 2.34.8 src/libstore/worker-protocol-connection.cc
// processStderrReturn). STDERR_ERROR ends the loop with a *RemoteError.
// STDERR_READ and STDERR_WRITE are refused: Nix uses them only for
// operations of protocols before 1.23 or that stream to a client sink,
// none of which this client sends, so one arriving means the daemon is
// not following the protocol (answering READ would mean sending bytes the
// request never had).
func (c *Conn) stderr(d *decoder) error {
	for i := 0; ; i++ {
		field := fmt.Sprintf("stderr %d", i)
		tag, err := d.u64(field)
		if err != nil {
			return err
		}
		var m Message
		switch tag {
		case stderrLast:
			return nil
		case stderrError:
			return c.readError(d, field+": ERROR")
		case stderrNext:
			m.Kind = Next
			if m.Text, err = d.str(field+": NEXT", MaxLogLen); err != nil {
				return err
			}
		case stderrStartActivity:
			m.Kind = StartActivity
			field += ": START_ACTIVITY"
			if m.ID, err = d.u64(field + ": id"); err != nil {
				return err
			}
			if m.Level, err = d.max(field+": level", math.MaxUint32); err != nil {
				return err
			}
			if m.Type, err = d.max(field+": type", math.MaxUint32); err != nil {
				return err
			}
			if m.Text, err = d.str(field+": text", MaxLogLen); err != nil {
				return err
			}
			if m.Fields, err = readFields(d, field); err != nil {
				return err
			}
			if m.Parent, err = d.u64(field + ": parent"); err != nil {
				return err
			}
		case stderrStopActivity:
			m.Kind = StopActivity
			if m.ID, err = d.u64(field + ": STOP_ACTIVITY: id"); err != nil {
				return err
			}
		case stderrResult:
			m.Kind = Result
			field += ": RESULT"
			if m.ID, err = d.u64(field + ": id"); err != nil {
				return err
			}
			if m.Type, err = d.max(field+": type", math.MaxUint32); err != nil {
				return err
			}
			if m.Fields, err = readFields(d, field); err != nil {
				return err
			}
		case stderrRead:
			return d.protoErr(field, "the daemon asked for data (STDERR_READ), which no request of this client provides")
		case stderrWrite:
			return d.protoErr(field, "the daemon sent data for a sink (STDERR_WRITE), which no request of this client expects")
		default:
			return d.protoErr(field, "unknown log message type %#x", tag)
		}
		if c.opt.Log != nil {
			c.opt.Log(m)
		}
	}
}

// readFields reads the typed fields of an activity or result: a count,
// then per field a type (0 int, 1 string) and the value (nix 2.8.0
// src/libstore/remote-store.cc readFields).
func readFields(d *decoder, field string) ([]any, error) {
	field += ": fields"
	n, err := d.count(field, MaxLogFields)
	if err != nil {
		return nil, err
	}
	var fields []any
	for i := range n {
		f := fmt.Sprintf("%s: field %d", field, i)
		typ, err := d.u64(f + ": type")
		if err != nil {
			return nil, err
		}
		switch typ {
		case 0:
			v, err := d.u64(f)
			if err != nil {
				return nil, err
			}
			fields = append(fields, v)
		case 1:
			s, err := d.str(f, MaxLogLen)
			if err != nil {
				return nil, err
			}
			fields = append(fields, s)
		default:
			return nil, d.protoErr(f+": type", "unknown field type %d", typ)
		}
	}
	return fields, nil
}

// readError reads a STDERR_ERROR in the structured form of protocol 1.26+
// (nix 2.8.0 src/libutil/serialise.cc readError): type "Error", level,
// name (unused), message, havePos 0, traces, each havePos 0 and a message.
func (c *Conn) readError(d *decoder, field string) error {
	typ, err := d.str(field+": type", MaxLogLen)
	if err != nil {
		return err
	}
	if typ != "Error" {
		return d.protoErr(field+": type", "%q, want \"Error\"", typ)
	}
	re := &RemoteError{Op: d.op}
	if re.Level, err = d.max(field+": level", math.MaxUint32); err != nil {
		return err
	}
	if _, err := d.str(field+": name", MaxLogLen); err != nil {
		return err
	}
	msg, err := d.str(field+": message", MaxErrorMsgLen)
	if err != nil {
		return err
	}
	re.Msg = strings.TrimRight(serveproto.StripANSI(msg), "\n")
	if err := expectZero(d, field+": havePos"); err != nil {
		return err
	}
	n, err := d.count(field+": traces", MaxTraces)
	if err != nil {
		return err
	}
	for i := range n {
		f := fmt.Sprintf("%s: trace %d", field, i)
		if err := expectZero(d, f+": havePos"); err != nil {
			return err
		}
		t, err := d.str(f, MaxLogLen)
		if err != nil {
			return err
		}
		re.Traces = append(re.Traces, serveproto.StripANSI(t))
	}
	return re
}

// expectZero reads a havePos, which Nix asserts is 0.
func expectZero(d *decoder, field string) error {
	v, err := d.u64(field)
	if err == nil && v != 0 {
		return d.protoErr(field, "got %d, want 0", v)
	}
	return err
}
