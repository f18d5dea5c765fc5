// Package brokerapi is the broker's one API: the messages that hook
// processes, `nix-offload-hook status` and queue runners exchange with
// `nix-offload-hook daemon`, and a client for them.
//
// It is HTTP/1.1 over the broker's unix socket, with JSON bodies. Every
// path starts with the protocol version ("/v1/"); a broker that does not
// speak a client's version answers 404 and the client says so (a hook then
// works without the broker). docs/broker-api.md describes each call with
// examples; the types below are the reference.
//
//	POST   /v1/try                          TryRequest  → TryResponse
//	POST   /v1/builds                       BuildRequest → a stream of Event, one JSON object per line
//	GET    /v1/builds/{id}/nar/{base}       the NAR of one output, raw bytes
//	POST   /v1/builds/{id}/imported         ImportedRequest → ImportedResponse
//	DELETE /v1/builds/{id}                  cancel a build
//	GET    /v1/status                       Status
//
// # Ownership follows the connection
//
// A reservation made by /v1/try, and every build started on a connection,
// belong to that connection: when it closes (the hook exited, or nix-daemon
// killed it with SIGKILL), the broker cancels the remote build and frees the
// slot at once. A client therefore keeps one connection for its whole
// exchange; [Client] does.
//
// # Where outputs land
//
// The broker never writes to the local store. When a build succeeds, the
// event stream ends with an "outputs" event listing the outputs that are not
// valid locally; the client fetches each NAR with GET …/nar/{base}, makes
// the outputs valid itself, and reports with POST …/imported. The hook does
// this inside nix-daemon's mount namespace, where the store is writable and
// the output locks are held by its parent (see docs/design.md).
package brokerapi

import "time"

// Version is the protocol version this package speaks; it is the first
// element of every path.
const Version = 1

// Prefix starts every path of this version.
const Prefix = "/v1"

// DefaultSocket is where the broker listens unless configured otherwise.
const DefaultSocket = "/run/nix-offload/hook.sock"

// Verdicts of a TryResponse, as the hook protocol names them.
const (
	Accept             = "accept"
	Decline            = "decline"
	DeclinePermanently = "decline-permanently"
	Postpone           = "postpone"
)

// TryRequest is nix-daemon's "try" as a hook forwards it.
type TryRequest struct {
	DrvPath          string   `json:"drvPath"`
	System           string   `json:"system"`
	RequiredFeatures []string `json:"requiredFeatures,omitempty"`
	// AmWilling: the local side would build it now.
	AmWilling bool `json:"amWilling"`
}

// TryResponse is the broker's answer to a TryRequest.
type TryResponse struct {
	Verdict string `json:"verdict"`
	// Machine is where the build will run, for "accept"; "" when it waits in
	// the broker's queue for a slot (Queued).
	Machine string `json:"machine,omitempty"`
	Queued  bool   `json:"queued,omitempty"`
	// Reservation names the slot or queue place held for the build; the
	// BuildRequest that follows quotes it.
	Reservation string `json:"reservation,omitempty"`
	// Reason says why, in words for the user; set unless a machine was
	// picked.
	Reason string `json:"reason,omitempty"`
}

// BuildOptions are the nix-daemon settings that shape a remote build.
type BuildOptions struct {
	// MaxSilentTime and Timeout are whole seconds; 0 means no limit.
	MaxSilentTime uint64 `json:"maxSilentTime,omitempty"`
	Timeout       uint64 `json:"timeout,omitempty"`
	MaxLogSize    uint64 `json:"maxLogSize,omitempty"`
	KeepFailed    bool   `json:"keepFailed,omitempty"`
	// Substitute: builders-use-substitutes, the machine may substitute
	// inputs itself.
	Substitute bool `json:"substitute,omitempty"`
}

// BuildRequest asks the broker to build a derivation.
type BuildRequest struct {
	// Reservation from a TryResponse; empty for a submission that did not
	// go through /v1/try (a queue runner): the broker then picks or queues
	// the build itself, as for a hook whose local side cannot build.
	Reservation string `json:"reservation,omitempty"`
	DrvPath     string `json:"drvPath"`
	// Inputs is the input closure as nix-daemon hands it to a hook (no .drv
	// files); empty means the broker computes it from the derivation.
	Inputs []string `json:"inputs,omitempty"`
	// WantedOutputs are output names; empty means all.
	WantedOutputs []string     `json:"wantedOutputs,omitempty"`
	Options       BuildOptions `json:"options"`
	// KeepOutputs leaves the outputs on the machine (a graph's
	// intermediates): the last event of a success is EventOutputs with
	// their metadata there and nothing to fetch; there is no /imported.
	KeepOutputs bool `json:"keepOutputs,omitempty"`
	// Held are inputs that are not valid locally but that a machine holds
	// (outputs of earlier KeepOutputs builds): the broker streams each one
	// from that machine into the build's machine when it lacks it.
	Held []HeldPath `json:"held,omitempty"`
	// Priority orders a submission among the builds waiting for a slot: higher first, in
	// arrival order among equals, from 0 (the default) to MaxPriority. A queue runner sets it
	// within a graph to the length of the longest path of builds that still depend on this
	// one (or the number of dependents when nothing better is known), so that long chains
	// start first. Builds that came through /v1/try (hooks: a user waits) always rank at
	// PriorityHook, above every submission. Ignored with a Reservation.
	Priority int `json:"priority,omitempty"`
}

// HeldPath is a store path that stays on the machine that built it.
type HeldPath struct {
	Machine string `json:"machine"`
	PathInfo
}

// The range of BuildRequest.Priority, and the rank of hook builds above it.
const (
	MaxPriority  = 999_999
	PriorityHook = MaxPriority + 1
)

// Event types of a build's stream, in the order they can come.
const (
	EventQueued   = "queued"   // waiting for a slot: Position, Reason
	EventStarted  = "started"  // a machine took it: Machine, Build
	EventCopying  = "copying"  // sending inputs: Paths, Bytes
	EventBuilding = "building" // the build command was sent
	EventLog      = "log"      // build log bytes: Text
	EventRetrying = "retrying" // the machine was lost; trying another: Reason
	EventFetching = "fetching" // the build succeeded; outputs follow: Paths, Bytes
	EventOutputs  = "outputs"  // last event of a success: Build, Outputs (those to fetch)
	EventFailed   = "failed"   // last event of a failure: Kind, Error
	// EventHandback is the last event of a build the broker gives back
	// before it got a machine, because the broker is stopping: the client
	// runs it by other means (a hook, in embedded mode). Reason.
	EventHandback = "handback"
)

// Failure kinds of an EventFailed, for the hook's exit code.
const (
	FailBuild   = "build"   // the build ran and failed on the machine
	FailTimeout = "timeout" // max-silent-time or timeout
	FailMisc    = "misc"    // anything else: no machine, connection, local store
	// FailLostInput: a held input could not be read from its machine
	// (Event.Path); the client builds its producer again.
	FailLostInput = "lost-input"
)

// Event is one line of a build's stream.
type Event struct {
	Type     string     `json:"type"`
	Build    string     `json:"build,omitempty"`
	Machine  string     `json:"machine,omitempty"`
	Position int        `json:"position,omitempty"`
	Reason   string     `json:"reason,omitempty"`
	Paths    int        `json:"paths,omitempty"`
	Bytes    uint64     `json:"bytes,omitempty"`
	Text     string     `json:"text,omitempty"`
	Outputs  []PathInfo `json:"outputs,omitempty"`
	Kind     string     `json:"kind,omitempty"`
	Error    string     `json:"error,omitempty"`
	Path     string     `json:"path,omitempty"` // FailLostInput: the input
}

// PathInfo describes an output as the machine reported it.
type PathInfo struct {
	Path       string   `json:"path"`
	Deriver    string   `json:"deriver,omitempty"`
	NarHash    string   `json:"narHash"`
	NarSize    uint64   `json:"narSize"`
	References []string `json:"references,omitempty"`
}

// ImportedRequest reports how making the outputs valid went; Error is ""
// on success.
type ImportedRequest struct {
	Error string `json:"error,omitempty"`
}

// ImportedResponse ends a build: Error is "" when every wanted output is
// valid in the local store.
type ImportedResponse struct {
	Error string `json:"error,omitempty"`
}

// ErrorResponse is the body of every 4xx and 5xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}

// Status is the broker's state, for `nix-offload-hook status`.
type Status struct {
	Version  string          `json:"version"`
	Started  time.Time       `json:"started"`
	Queued   int             `json:"queued"`
	Running  int             `json:"running"`
	Machines []MachineStatus `json:"machines"`
	// Clients counts the connections open to the broker's API, the one
	// that asked included: each is a hook, a queue runner or a status
	// call, and one file descriptor in the broker.
	Clients int `json:"clients"`
	// Goroutines is the broker's goroutine count, for spotting leaks.
	Goroutines int `json:"goroutines"`
}

// MachineStatus is one machine in a Status.
type MachineStatus struct {
	Name       string    `json:"name"`
	Systems    []string  `json:"systems"`
	Features   []string  `json:"features,omitempty"`
	Enabled    bool      `json:"enabled"`
	SlotsUsed  int       `json:"slotsUsed"`
	Slots      int       `json:"slots"`
	Up         bool      `json:"up"`
	DownUntil  time.Time `json:"downUntil,omitzero"`
	Failures   int       `json:"failures,omitempty"`
	LastError  string    `json:"lastError,omitempty"`
	LastErrAt  time.Time `json:"lastErrorAt,omitzero"`
	Conns      int       `json:"connections"`
	Idle       int       `json:"idleSessions"`
	InUse      int       `json:"busySessions"`
	Builds     uint64    `json:"builds"`
	Failed     uint64    `json:"failed"`
	BytesSent  uint64    `json:"bytesSent"`
	BytesRecvd uint64    `json:"bytesReceived"`
	// The machine's limits (offload.toml's min-free-space in bytes and max-load per core;
	// 0: none) and what it last said about itself over its warm connection.
	MinFreeSpace uint64     `json:"minFreeSpace,omitempty"`
	MaxLoad      float64    `json:"maxLoad,omitempty"`
	State        *LiveState `json:"state,omitempty"`
	// Held says why the machine gets no new build although it has a free slot, e.g.
	// "store has 8.1 GiB free, min-free-space is 10 GiB"; "" when it takes builds.
	Held string `json:"held,omitempty"`
}

// LiveState is what a machine said about itself when the broker last asked (every few
// seconds). Each value is absent when the machine did not say; Error says why nothing came.
type LiveState struct {
	At          time.Time `json:"at"`
	Error       string    `json:"error,omitempty"`
	LoadPerCore *float64  `json:"loadPerCore,omitempty"` // 1-minute load average ÷ cores
	Cores       int       `json:"cores,omitempty"`
	Pressure    *float64  `json:"cpuPressure,omitempty"` // PSI cpu "some" avg10, %
	FreeBytes   *uint64   `json:"freeBytes,omitempty"`   // free on the store's filesystem
}
