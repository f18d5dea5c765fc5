package hookproto

import (
	"bytes"
	"encoding/binary"
	"testing"

	"go.uber.org/goleak"
)

// BuildLog owns a goroutine; every test must end it.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// wireBuf builds stdin bytes the way Nix's serialiser writes them
// (nix 2.8.0 src/libutil/serialise.cc writeString, writeStrings).
type wireBuf struct{ bytes.Buffer }

func (b *wireBuf) u64(v uint64) *wireBuf {
	b.Write(binary.LittleEndian.AppendUint64(nil, v))
	return b
}

func (b *wireBuf) str(s string) *wireBuf {
	b.u64(uint64(len(s)))
	b.WriteString(s)
	b.Write(make([]byte, (8-len(s)%8)%8))
	return b
}

func (b *wireBuf) strs(ss ...string) *wireBuf {
	b.u64(uint64(len(ss)))
	for _, s := range ss {
		b.str(s)
	}
	return b
}

func (b *wireBuf) setting(name, value string) *wireBuf {
	return b.u64(1).str(name).str(value)
}

func (b *wireBuf) try(amWilling uint64, system, drv string, features ...string) *wireBuf {
	return b.str("try").u64(amWilling).str(system).str(drv).strs(features...)
}

// clone returns a copy of the bytes so far.
func (b *wireBuf) clone() []byte { return bytes.Clone(b.Bytes()) }

const testDrv = "/nix/store/0a1zm4s3ycfvmb8ckfi5q4kq3m1bk8j4-x.drv"
