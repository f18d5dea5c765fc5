package main

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if hookBinPath != "" {
		os.RemoveAll(filepath.Dir(hookBinPath))
	}
	os.Exit(code)
}
