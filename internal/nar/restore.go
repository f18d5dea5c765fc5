package nar

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// Restore unpacks the NAR read from r as a new file, directory or symlink
// dst. dst must not exist; its parent must. It returns the NAR's [Stats].
//
// Files are created 0444 or, if executable, 0555, and directories 0755, all
// less the umask; Nix canonicalises them afterwards. Symlink targets are
// written as they are, and never followed: every node is created with one
// name relative to a handle on the directory Restore itself created just
// before ([os.Root]), files with O_CREAT|O_EXCL|O_NOFOLLOW and directories
// with mkdir, which fails on anything that exists. A hostile NAR therefore
// cannot make Restore write outside dst.
//
// On any error Restore removes whatever it created (best effort), so no
// partial tree is left behind. Errors in the NAR or from r are [*Error];
// file system failures are [*fs.PathError] naming the full path; if dst
// exists the error wraps [fs.ErrExist] and nothing is read from r.
func Restore(dst string, r io.Reader, lim Limits) (Stats, error) {
	dst = filepath.Clean(dst)
	base := filepath.Base(dst)
	if base == "." || base == ".." || base == string(filepath.Separator) {
		return Stats{}, &fs.PathError{Op: "restore", Path: dst, Err: errors.New("not a name for a new file")}
	}
	if _, err := os.Lstat(dst); err == nil {
		return Stats{}, &fs.PathError{Op: "restore", Path: dst, Err: fs.ErrExist}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return Stats{}, err
	}
	parent, err := os.OpenRoot(filepath.Dir(dst))
	if err != nil {
		return Stats{}, err
	}
	rs := &restorer{dst: dst, base: base, dirs: []*os.Root{parent}}
	defer parent.Close()

	st, err := rs.run(NewReader(r, lim))
	rs.closeAbove(0)
	if err != nil {
		return Stats{}, rs.cleanup(err)
	}
	return st, nil
}

type restorer struct {
	dst  string
	base string // name of dst in dirs[0]
	// dirs[d] is the directory holding the nodes at depth d: dst's parent
	// first, then dst and its subdirectories down to the current node.
	dirs    []*os.Root
	created bool // dst exists and is ours to remove
	buf     []byte
}

func (rs *restorer) run(nr *Reader) (Stats, error) {
	for {
		hdr, err := nr.Next()
		if err == io.EOF {
			return nr.Stats(), nil
		}
		if err != nil {
			return Stats{}, err
		}
		depth, name := 0, rs.base
		if hdr.Path != "" {
			depth = strings.Count(hdr.Path, "/") + 1
			name = hdr.Path[strings.LastIndexByte(hdr.Path, '/')+1:]
		}
		// The reader gives a directory before its entries, so dirs
		// holds the parent; drop the directories that were left.
		rs.closeAbove(depth)
		if len(rs.dirs) != depth+1 {
			return Stats{}, fmt.Errorf("nar: restore %q: parent directory not open (internal error)", hdr.Path)
		}
		dir := rs.dirs[depth]

		switch hdr.Type {
		case TypeRegular:
			err = rs.file(dir, name, hdr, nr)
		case TypeDirectory:
			err = dir.Mkdir(name, 0o755)
			if err == nil {
				rs.created = rs.created || depth == 0
				var sub *os.Root
				sub, err = dir.OpenRoot(name)
				if err == nil {
					rs.dirs = append(rs.dirs, sub)
				}
			}
		case TypeSymlink:
			err = dir.Symlink(hdr.LinkTarget, name)
			rs.created = rs.created || (err == nil && depth == 0)
		}
		if err != nil {
			return Stats{}, rs.fsError(hdr, err)
		}
	}
}

func (rs *restorer) file(dir *os.Root, name string, hdr *Header, nr *Reader) error {
	mode := fs.FileMode(0o444)
	if hdr.Executable {
		mode = 0o555
	}
	f, err := dir.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL|oNoFollow, mode)
	if err != nil {
		return err
	}
	rs.created = rs.created || hdr.Path == ""
	if rs.buf == nil {
		rs.buf = make([]byte, skipChunk)
	}
	for {
		n, rerr := nr.Read(rs.buf)
		if n > 0 {
			if _, err := f.Write(rs.buf[:n]); err != nil {
				f.Close()
				return err
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			f.Close()
			return rerr
		}
	}
	return f.Close()
}

// fsError gives a file system error the full path of the node. Errors from
// the reader pass unchanged.
func (rs *restorer) fsError(hdr *Header, err error) error {
	var nerr *Error
	if errors.As(err, &nerr) {
		return err
	}
	op := "restore"
	var pe *fs.PathError
	var le *os.LinkError
	switch {
	case errors.As(err, &pe):
		op, err = pe.Op, pe.Err
	case errors.As(err, &le):
		op, err = le.Op, le.Err
	}
	return &fs.PathError{Op: op, Path: filepath.Join(rs.dst, hdr.Path), Err: err}
}

// closeAbove closes the directories deeper than depth.
func (rs *restorer) closeAbove(depth int) {
	for len(rs.dirs) > depth+1 {
		rs.dirs[len(rs.dirs)-1].Close()
		rs.dirs = rs.dirs[:len(rs.dirs)-1]
	}
}

// cleanup removes dst after err, if Restore created it.
func (rs *restorer) cleanup(err error) error {
	if !rs.created {
		return err
	}
	if rerr := rs.dirs[0].RemoveAll(rs.base); rerr != nil {
		return errors.Join(err, fmt.Errorf("nar: removing partial %s: %w", rs.dst, rerr))
	}
	return err
}
