package service

import (
	"os"
	"strconv"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/buffer"
	"go.uber.org/zap/zapcore"
)

// NewLogger returns a logger that writes entries of level and above to w, one line each.
//
// With journal set (see [UnderJournal]) a line is the sd-daemon priority prefix, the message
// and the fields as JSON, separated by spaces, with no timestamp since the journal adds one:
//
//	<4>machine unreachable {"machine": "b1", "error": "…"}
//
// The prefix is <7> for debug, <6> info, <4> warn, <3> error and <2> (critical) for the panic
// and fatal levels. Otherwise a line starts with an ISO 8601 timestamp and the level's name:
//
//	2026-11-23T14:05:09.412+0100 WARN machine unreachable {"machine": "b1", "error": "…"}
//
// A named logger's name comes before the message, followed by a colon. Newlines and carriage
// returns in the message and the name are written as \n and \r; zap's console encoder would
// copy them verbatim. Field values are JSON, so they are escaped already. No stack traces are
// written.
func NewLogger(w zapcore.WriteSyncer, level zapcore.Level, journal bool) *zap.Logger {
	cfg := zapcore.EncoderConfig{
		MessageKey:       "msg",
		NameKey:          "logger",
		EncodeName:       func(name string, enc zapcore.PrimitiveArrayEncoder) { enc.AppendString(name + ":") },
		EncodeDuration:   zapcore.StringDurationEncoder,
		EncodeTime:       zapcore.ISO8601TimeEncoder,
		EncodeLevel:      zapcore.CapitalLevelEncoder,
		LineEnding:       "\n",
		ConsoleSeparator: " ",
	}
	if !journal {
		// Under the journal, the level is the prefix lineEncoder adds and the time is the
		// journal's own.
		cfg.TimeKey = "time"
		cfg.LevelKey = "level"
	}
	enc := &lineEncoder{Encoder: zapcore.NewConsoleEncoder(cfg), journal: journal}
	return zap.New(zapcore.NewCore(enc, w, level))
}

// lineEncoder wraps zap's console encoder: it escapes line breaks in the parts that encoder
// copies verbatim and, for the journal, puts the priority prefix in front.
type lineEncoder struct {
	zapcore.Encoder
	journal bool
}

var linePool = buffer.NewPool()

var escapeBreaks = strings.NewReplacer("\n", `\n`, "\r", `\r`)

func (e *lineEncoder) Clone() zapcore.Encoder {
	return &lineEncoder{Encoder: e.Encoder.Clone(), journal: e.journal}
}

func (e *lineEncoder) EncodeEntry(ent zapcore.Entry, fields []zapcore.Field) (*buffer.Buffer, error) {
	ent.Message = escapeBreaks.Replace(ent.Message)
	ent.LoggerName = escapeBreaks.Replace(ent.LoggerName)
	ent.Stack = ""
	line, err := e.Encoder.EncodeEntry(ent, fields)
	if err != nil || !e.journal {
		return line, err
	}
	out := linePool.Get()
	out.AppendString(priority(ent.Level))
	out.Write(line.Bytes())
	line.Free()
	return out, nil
}

// priority is the sd-daemon prefix (<N>, N a syslog priority) for a zap level.
func priority(l zapcore.Level) string {
	switch {
	case l <= zapcore.DebugLevel:
		return "<7>"
	case l == zapcore.InfoLevel:
		return "<6>"
	case l == zapcore.WarnLevel:
		return "<4>"
	case l == zapcore.ErrorLevel:
		return "<3>"
	}
	return "<2>" // DPanic, Panic, Fatal
}

// UnderJournal reports whether stderr is connected to the systemd journal: systemd sets
// JOURNAL_STREAM to the device and inode number ("DEV:INODE") of the stream it connects, and
// stderr must still be that stream (a redirection in between makes it something else).
func UnderJournal() bool {
	return isJournalStream(os.Getenv("JOURNAL_STREAM"), os.Stderr)
}

// isJournalStream reports whether f is the stream that the JOURNAL_STREAM value v names.
func isJournalStream(v string, f *os.File) bool {
	if v == "" || f == nil {
		return false
	}
	fi, err := f.Stat()
	if err != nil {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return false
	}
	dev, ino, ok := strings.Cut(v, ":")
	if !ok {
		return false
	}
	d, err1 := strconv.ParseUint(dev, 10, 64)
	i, err2 := strconv.ParseUint(ino, 10, 64)
	return err1 == nil && err2 == nil && d == uint64(st.Dev) && i == uint64(st.Ino)
}
