package localstore

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// mtimeStore is the modification time of every file in the store: one
// second into the epoch.
const mtimeStore = 1

// keptXattrs are the extended attributes canonicalise leaves in place:
// those of Nix's default ignored-acls setting.
var keptXattrs = []string{"security.selinux", "system.nfs4_acl", "security.csm"}

// canonicalise gives the tree at root the metadata every store path has,
// as Nix does before it registers a path (NixOS/nix 2.34.8
// src/libstore/posix-fs-canonicalise.cc; the same rules in 2.8.0's
// local-store.cc): anything but a regular file, a directory or a symlink
// is refused; every extended attribute but keptXattrs is removed; files
// and directories that are not mode 0444 or 0555 become 0444, or 0555 if
// the owner may execute them (directories always 0555); the modification
// time becomes mtimeStore (of a symlink too; the access time is left
// alone); and whatever this process's user does not own becomes its own.
// Symlinks are never followed.
func canonicalise(root string) error {
	uid, gid := os.Geteuid(), os.Getegid()
	return filepath.WalkDir(root, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return &fs.PathError{Op: "lstat", Path: path, Err: err}
		}
		typ := st.Mode & unix.S_IFMT
		if typ != unix.S_IFREG && typ != unix.S_IFDIR && typ != unix.S_IFLNK {
			return fmt.Errorf("%s has an unsupported file type (mode %o)", path, st.Mode)
		}
		if err := removeXattrs(path); err != nil {
			return err
		}
		if typ != unix.S_IFLNK {
			mode := st.Mode &^ unix.S_IFMT
			isDir := typ == unix.S_IFDIR
			if (mode != 0o444 || isDir) && mode != 0o555 {
				want := uint32(0o444)
				if st.Mode&unix.S_IXUSR != 0 || isDir {
					want = 0o555
				}
				if err := unix.Chmod(path, want); err != nil {
					return &fs.PathError{Op: "chmod", Path: path, Err: err}
				}
			}
		}
		if st.Mtim.Sec != mtimeStore || st.Mtim.Nsec != 0 {
			ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Sec: mtimeStore}}
			if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return &fs.PathError{Op: "utimensat", Path: path, Err: err}
			}
		}
		if int(st.Uid) != uid {
			if err := unix.Lchown(path, uid, gid); err != nil {
				return &fs.PathError{Op: "lchown", Path: path, Err: err}
			}
		}
		return nil
	})
}

// removeXattrs removes the extended attributes of path, not following a
// symlink, except keptXattrs. A file system without them has none.
func removeXattrs(path string) error {
	size, err := unix.Llistxattr(path, nil)
	if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ENODATA) || (err == nil && size == 0) {
		return nil
	}
	if err != nil {
		return &fs.PathError{Op: "llistxattr", Path: path, Err: err}
	}
	buf := make([]byte, size)
	if size, err = unix.Llistxattr(path, buf); err != nil {
		return &fs.PathError{Op: "llistxattr", Path: path, Err: err}
	}
	for _, name := range strings.Split(string(buf[:size]), "\x00") {
		if name == "" || slices.Contains(keptXattrs, name) {
			continue
		}
		if err := unix.Lremovexattr(path, name); err != nil {
			return &fs.PathError{Op: "removing extended attribute " + name + " from", Path: path, Err: err}
		}
	}
	return nil
}
