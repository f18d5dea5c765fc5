package graph

import (
	"fmt"
	"slices"
	"sort"

	"github.com/nix-community/go-nix/pkg/derivation"
)

// Node is one derivation of a plan.
type Node struct {
	DrvPath string
	Drv     *derivation.Derivation
	// Deps are the input derivations that are in the plan (their outputs
	// are not valid locally), sorted.
	Deps []string
	// Valid: every output is valid locally; nothing is built.
	Valid bool
	// Rank is the length of the longest path of builds in the plan that depend on this one
	// (0 for a root): the broker starts the higher ranks first (BuildRequest.Priority), so
	// that long chains do not wait behind leaves.
	Rank int

	inputs map[string]*Node // the input derivations, when not Valid
}

// Outputs returns the node's output paths by name (input-addressed
// outputs; a floating content-addressed output has none until built).
func (n *Node) Outputs() map[string]string {
	out := make(map[string]string, len(n.Drv.Outputs))
	for name, o := range n.Drv.Outputs {
		if o != nil && o.Path != "" {
			out[name] = o.Path
		}
	}
	return out
}

// Plan is the part of a derivation closure to build.
type Plan struct {
	Roots []string         // the requested derivations, in request order
	Nodes map[string]*Node // by .drv path: every root, and what they need built
}

// Load reads the closure of roots with read and keeps what is not valid
// according to valid (the subset of paths that are valid locally): a
// derivation whose outputs are all valid is a leaf, marked Valid, whose
// inputs are not read.
func Load(roots []string, read func(drvPath string) (*derivation.Derivation, error), valid func(paths []string) ([]string, error)) (*Plan, error) {
	p := &Plan{Roots: slices.Clone(roots), Nodes: map[string]*Node{}}
	level := slices.Clone(roots)
	for len(level) > 0 {
		var nodes []*Node
		var outs []string
		for _, d := range level {
			if p.Nodes[d] != nil {
				continue
			}
			drv, err := read(d)
			if err != nil {
				return nil, err
			}
			n := &Node{DrvPath: d, Drv: drv}
			p.Nodes[d] = n
			nodes = append(nodes, n)
			for _, o := range n.Outputs() {
				outs = append(outs, o)
			}
		}
		have := map[string]bool{}
		if len(outs) > 0 {
			v, err := valid(outs)
			if err != nil {
				return nil, fmt.Errorf("local store: %w", err)
			}
			for _, o := range v {
				have[o] = true
			}
		}
		level = nil
		for _, n := range nodes {
			outs := n.Outputs()
			n.Valid = len(outs) == len(n.Drv.Outputs)
			for _, o := range outs {
				n.Valid = n.Valid && have[o]
			}
			if n.Valid {
				continue
			}
			for in := range n.Drv.InputDerivations {
				level = append(level, in)
			}
		}
		sort.Strings(level)
	}
	for _, n := range p.Nodes {
		if n.Valid {
			continue
		}
		n.inputs = map[string]*Node{}
		for in := range n.Drv.InputDerivations {
			n.inputs[in] = p.Nodes[in]
			if !p.Nodes[in].Valid {
				n.Deps = append(n.Deps, in)
			}
		}
		sort.Strings(n.Deps)
	}
	p.rank()
	return p, nil
}

// rank sets each node's Rank: the number of builds on the longest path of nodes that depend
// on it, up to a root (a root, or a node nothing in the plan needs, is 0).
func (p *Plan) rank() {
	dependents := p.Dependents()
	done := map[string]bool{}
	var visit func(d string) int
	visit = func(d string) int {
		n := p.Nodes[d]
		if done[d] {
			return n.Rank
		}
		done[d] = true // a derivation graph has no cycles; this also ends one
		for _, up := range dependents[d] {
			n.Rank = max(n.Rank, visit(up)+1)
		}
		return n.Rank
	}
	for d := range p.Nodes {
		visit(d)
	}
}

// Dependents returns, for each node, the nodes that depend on it directly.
func (p *Plan) Dependents() map[string][]string {
	out := map[string][]string{}
	for _, n := range p.Nodes {
		for _, d := range n.Deps {
			out[d] = append(out[d], n.DrvPath)
		}
	}
	for _, ds := range out {
		sort.Strings(ds)
	}
	return out
}
