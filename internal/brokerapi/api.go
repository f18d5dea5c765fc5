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
//	POST   /v1/graphs                       GraphRequest → a stream of GraphEvent, one JSON object per line
//	GET    /v1/graphs                       []GraphSummary (without results)
//	GET    /v1/graphs/{id}                  GraphSummary
//	GET    /v1/graphs/{id}/events           the graph's stream again: what happened so far, then live
//	GET    /v1/graphs/{id}/nar/{base}       the NAR of an output a machine holds, raw bytes
//	DELETE /v1/graphs/{id}                  cancel a graph
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

import (
	"time"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

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

// ServeInfo is p as the protocols and the local store take it; the
// download size is the NAR's (outputs move uncompressed).
func (p PathInfo) ServeInfo() serveproto.PathInfo {
	return serveproto.PathInfo{Path: p.Path, Deriver: p.Deriver, NarHash: p.NarHash, NarSize: p.NarSize, DownloadSize: p.NarSize, References: p.References}
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
	// Accepted counts the connections the broker has accepted since it
	// started, read just before Clients: between two statuses, the
	// difference bounds the connections that may have come and gone
	// unseen by either count.
	Accepted uint64 `json:"accepted"`
	// Goroutines is the broker's goroutine count, for spotting leaks.
	Goroutines int `json:"goroutines"`
	// Graphs counts the graphs running in the broker (GET /v1/graphs lists them).
	Graphs int `json:"graphs"`
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

// The fetch policies of a GraphRequest: what comes home when the graph ends.
const (
	FetchRequested = "requested" // the roots' wanted outputs and their closures (the default)
	FetchAll       = "all"       // every output built, with its closure
	FetchNone      = "none"      // nothing: outputs stay on the builders
)

// GraphRoot is one requested derivation of a graph and the outputs wanted of it (all if
// empty).
type GraphRoot struct {
	DrvPath string   `json:"drvPath"`
	Outputs []string `json:"outputs,omitempty"`
}

// GraphRequest asks the broker to build a whole derivation graph: the part of the roots'
// closure whose outputs are valid neither locally nor on a machine. Intermediate outputs stay
// on the machines; the final event lists what Fetch asks for, which the client makes valid.
type GraphRequest struct {
	Roots []GraphRoot `json:"roots"`
	// Fetch is FetchRequested ("" too), FetchAll or FetchNone.
	Fetch string `json:"fetch,omitempty"`
	// Priority is added to each build's rank within the graph (the length of the longest path
	// of builds that depend on it), clamped to MaxPriority; it orders the graph's builds among
	// other submissions waiting for a slot.
	Priority int `json:"priority,omitempty"`
	// KeepGoing builds everything that does not depend on a failure; without it the first
	// failure stops what has not started and lets what runs finish.
	KeepGoing bool         `json:"keepGoing,omitempty"`
	Options   BuildOptions `json:"options"`
	// Detach: closing the response does not cancel the graph (follow it again with
	// GET /v1/graphs/{id}/events, stop it with DELETE /v1/graphs/{id}).
	Detach bool `json:"detach,omitempty"`
}

// The states of a graph, and of one derivation in it before it has a result.
const (
	GraphRunning   = "running"
	GraphDone      = "done"
	GraphCancelled = "cancelled" // done after a DELETE or after its client went away

	DrvWaiting = "Waiting" // its inputs are not built yet
	DrvQueued  = "Queued"  // its inputs are built; it waits for a slot
	DrvRunning = "Running" // it runs on Machine
)

// Event types of a graph's stream. Every per-derivation event names DrvPath.
const (
	GraphEventGraph = "graph" // the first event: Graph, Summary (without derivations)
	// queued, started, copying, building, log and retrying are the build events (EventQueued …)
	// of one derivation.
	GraphEventBuilt  = "built"  // a derivation succeeded: Status, Machine, Result
	GraphEventFailed = "failed" // a derivation failed: Status, Error, Result
	GraphEventDone   = "done"   // the last event: Summary, with every derivation and Fetch
)

// GraphEvent is one line of a graph's event stream.
type GraphEvent struct {
	Type    string `json:"type"`
	Graph   string `json:"graph,omitempty"`
	DrvPath string `json:"drvPath,omitempty"`
	Machine string `json:"machine,omitempty"`
	// Status is Nix's BuildResult status name (built and failed).
	Status   string `json:"status,omitempty"`
	Position int    `json:"position,omitempty"`
	Reason   string `json:"reason,omitempty"`
	Paths    int    `json:"paths,omitempty"`
	Bytes    uint64 `json:"bytes,omitempty"`
	Text     string `json:"text,omitempty"`
	Error    string `json:"error,omitempty"`
	// Result is the derivation's result (built and failed).
	Result *GraphDerivation `json:"result,omitempty"`
	// Summary is the graph (graph and done).
	Summary *GraphSummary `json:"summary,omitempty"`
}

// GraphDerivation is one derivation of a graph: its result once it has one, else where it is.
type GraphDerivation struct {
	DrvPath string `json:"drvPath"`
	// Status is a BuildResult status name (Built, AlreadyValid, PermanentFailure,
	// DependencyFailed, …), or DrvWaiting, DrvQueued or DrvRunning while it has none.
	Status  string     `json:"status"`
	Machine string     `json:"machine,omitempty"`
	Start   *time.Time `json:"start,omitempty"`
	Stop    *time.Time `json:"stop,omitempty"`
	Error   string     `json:"error,omitempty"`
	// Outputs: output name → store path, on success.
	Outputs map[string]string `json:"outputs,omitempty"`
	// Holders: output path → the machine that keeps it, for outputs not valid locally.
	Holders map[string]string `json:"holders,omitempty"`
}

// FetchPath is an output the client makes valid at the end of a graph: its NAR comes from
// GET /v1/graphs/{id}/nar/{base}, streamed from Machine.
type FetchPath struct {
	PathInfo
	Machine string `json:"machine"`
}

// GraphSummary is a graph's state (GET /v1/graphs/{id}, and the graph and done events).
type GraphSummary struct {
	ID        string      `json:"id"`
	State     string      `json:"state"` // GraphRunning, GraphDone or GraphCancelled
	Created   time.Time   `json:"created"`
	Finished  time.Time   `json:"finished,omitzero"`
	Roots     []GraphRoot `json:"roots"`
	Fetch     string      `json:"fetch"`
	KeepGoing bool        `json:"keepGoing,omitempty"`
	Detach    bool        `json:"detach,omitempty"`
	// Derivations counts the graph's derivations, and ToBuild those with no valid outputs
	// anywhere when it was loaded; Built and Failed count the results so far.
	Derivations int `json:"derivations"`
	ToBuild     int `json:"toBuild"`
	Built       int `json:"built"`
	Failed      int `json:"failed"`
	Running     int `json:"running"`
	// Results lists every derivation (GET /v1/graphs/{id} and the done event; absent from the
	// graph event and from GET /v1/graphs).
	Results []GraphDerivation `json:"results,omitempty"`
	// FetchPaths lists, in the done event, the outputs to make valid locally, in an order where
	// each path comes after its references.
	FetchPaths []FetchPath `json:"fetchPaths,omitempty"`
	// FetchError says why the list is incomplete (a machine could not be asked).
	FetchError string `json:"fetchError,omitempty"`
}
