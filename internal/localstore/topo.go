package localstore

import (
	"fmt"

	"github.com/nix-offload/nix-offload/internal/serveproto"
)

// TopoSort orders infos so that every path comes after the paths of infos it
// refers to: the order in which to send inputs to a machine that registers
// each path as it arrives. References to paths that are not in infos are
// ignored, and so are self-references. Among paths that do not depend on
// each other, the order of infos is kept, so the result is deterministic.
//
// It returns an error if a path appears twice or if references form a cycle
// (which Nix forbids between store paths); the error names a path on the
// cycle.
func TopoSort(infos []serveproto.PathInfo) ([]serveproto.PathInfo, error) {
	index := make(map[string]int, len(infos))
	for i, info := range infos {
		if _, dup := index[info.Path]; dup {
			return nil, fmt.Errorf("localstore: TopoSort: %s is listed twice", info.Path)
		}
		index[info.Path] = i
	}
	const (
		unvisited = iota
		visiting  // on the current depth-first path
		done
	)
	state := make([]int, len(infos))
	out := make([]serveproto.PathInfo, 0, len(infos))
	// An explicit stack, so a long chain of references (a closure can
	// have tens of thousands of paths) cannot exhaust the goroutine stack.
	type frame struct{ i, next int }
	for root := range infos {
		if state[root] != unvisited {
			continue
		}
		stack := []frame{{i: root}}
		state[root] = visiting
		for len(stack) > 0 {
			top := &stack[len(stack)-1]
			refs := infos[top.i].References
			if top.next < len(refs) {
				ref := refs[top.next]
				top.next++
				j, ok := index[ref]
				if !ok || j == top.i {
					continue
				}
				switch state[j] {
				case visiting:
					return nil, fmt.Errorf("localstore: TopoSort: reference cycle through %s and %s", infos[top.i].Path, ref)
				case unvisited:
					state[j] = visiting
					stack = append(stack, frame{i: j})
				}
				continue
			}
			state[top.i] = done
			out = append(out, infos[top.i])
			stack = stack[:len(stack)-1]
		}
	}
	return out, nil
}
