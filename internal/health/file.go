package health

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nix-offload/nix-offload/internal/flock"
)

// fileVersion is the "version" of the file format this package reads and writes.
const fileVersion = 1

// maxFileSize bounds what readState reads. An entry takes under 1 KiB, so this is thousands of
// machines; a bigger file is not one this package wrote.
const maxFileSize = 4 << 20

// Waiting for the lock file: flock(2) cannot wait with a deadline, so lockFile tries, then
// sleeps a little longer each time up to lockPollMax. The lock is held for one read and one
// small write, so the first retries usually get it; lockTimeout only guards against a holder
// that is stopped or stuck, which must not stall builds.
const (
	lockPollMin = time.Millisecond
	lockPollMax = 10 * time.Millisecond
	lockTimeout = time.Second
)

// fileContent is the JSON document in the state file.
type fileContent struct {
	Version  int              `json:"version"`
	Machines map[string]State `json:"machines"`
}

// ensureDir creates the directory of the state file at path (mode 0700) and checks that no
// other user can put files in it: it must be a directory, not a link, owned by this process's
// user, and writable by nobody else. Otherwise another local user could hold the lock or plant
// the files, and the Tracker keeps the state in memory.
func ensureDir(path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("health: %w; machine health is kept in this process only", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("health: %w; machine health is kept in this process only", err)
	}
	if err := ownedDir(fi); err != nil {
		return fmt.Errorf("health: %s %v: another user could stall or forge it; machine health is kept in this process only (hint: chown it to uid %d and chmod 0700)", dir, err, os.Geteuid())
	}
	return nil
}

// ownedDir checks that fi is a directory of this process's user that no one else can write.
func ownedDir(fi fs.FileInfo) error {
	if !fi.IsDir() {
		return errors.New("is not a directory")
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("is owned by uid %d", st.Uid)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("is writable by others (mode %v)", fi.Mode().Perm())
	}
	return nil
}

// readState reads the state file at path, without locking: writers replace it in one rename,
// so it is always whole. A missing file is an empty state. A corrupt file is an empty state
// and an error that says so. A file that cannot be read gives a nil map and the error.
func readState(path string) (map[string]State, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]State{}, nil
	}
	if err != nil {
		return nil, unreadable(err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, unreadable(err)
	}
	corrupt := func(why string) (map[string]State, error) {
		return map[string]State{}, fmt.Errorf("health: %s is corrupt (%s); treating every machine as healthy, and the next change replaces the file", path, why)
	}
	if len(data) > maxFileSize {
		return corrupt(fmt.Sprintf("larger than %d MiB", maxFileSize>>20))
	}
	var c fileContent
	if err := json.Unmarshal(data, &c); err != nil {
		return corrupt(err.Error())
	}
	if c.Version != fileVersion {
		return corrupt(fmt.Sprintf("version %d, want %d", c.Version, fileVersion))
	}
	if c.Machines == nil {
		c.Machines = map[string]State{}
	}
	return c.Machines, nil
}

func unreadable(err error) error {
	return fmt.Errorf("health: %w; going on with what this process knows, without sharing it", err)
}

// writeState replaces the state file at path with ms, atomically: a reader sees the old file
// or the new one, and a crash leaves one of them, never a mix.
func writeState(path string, ms map[string]State) error {
	data, err := json.MarshalIndent(fileContent{Version: fileVersion, Machines: ms}, "", "\t")
	if err != nil {
		return fmt.Errorf("health: encoding the state: %w", err) // cannot happen with State
	}
	data = append(data, '\n')
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return notSaved(err)
	}
	tmp := f.Name()
	err = f.Chmod(0o600) // not subject to the umask, unlike the mode given at creation
	if err == nil {
		_, err = f.Write(data)
	}
	if err == nil {
		err = f.Sync() // the rename must not reach the disk before the data
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return notSaved(err)
	}
	return nil
}

func notSaved(err error) error {
	return fmt.Errorf("health: saving the state: %w; other processes will not see this change", err)
}

// lockFile takes an exclusive flock on the lock file at path, creating it with mode 0600 if
// needed, and returns the function that releases it. The file must belong to this process's
// user: one that another user made (or could open) is refused, since its owner could hold the
// lock. flock locks belong to the open file, so two Trackers of one process exclude each
// other as two processes do.
func lockFile(path string) (unlock func(), err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|syscall.O_CLOEXEC|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("health: lock: %w; this change stays in this process's memory", err)
	}
	if fi, err := f.Stat(); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() || fi.Mode().Perm()&0o077 != 0 {
			f.Close()
			return nil, fmt.Errorf("health: lock: %s is open to other users (mode %v): refusing it; this change stays in this process's memory", path, fi.Mode().Perm())
		}
	}
	deadline := time.Now().Add(lockTimeout)
	for wait := lockPollMin; ; wait = min(2*wait, lockPollMax) {
		ok, err := flock.TryLock(f)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("health: lock: flock %s: %w; this change stays in this process's memory", path, err)
		}
		if ok {
			return func() { f.Close() }, nil // closing the only descriptor drops the lock
		}
		if time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("health: lock: another process has held %s for over %v; this change stays in this process's memory", path, lockTimeout)
		}
		time.Sleep(wait)
	}
}
