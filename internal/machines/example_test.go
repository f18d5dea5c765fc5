package machines_test

import (
	"fmt"

	"github.com/nix-offload/nix-offload/internal/machines"
)

func ExampleParse() {
	cfg, err := machines.Parse("offload.toml", []byte(`
[ssh]
user = "root"
known-hosts = ["/etc/ssh/ssh_known_hosts"]

[[machine]]
host = "builder1.example.org"
systems = ["x86_64-linux", "i686-linux"]
parallel-builds = 8
features = ["kvm", "big-parallel"]
`))
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, m := range cfg.Machines {
		fmt.Println(m.Name(), m.Systems, m.ParallelBuilds, m.KnownHosts, m.ConnectTimeout, m.Source)
	}
	// Output:
	// root@builder1.example.org [x86_64-linux i686-linux] 8 [/etc/ssh/ssh_known_hosts] 10s offload.toml:6
}

func ExampleParse_errors() {
	_, err := machines.Parse("offload.toml", []byte(`[[machine]]
host = "b1"
systems = ["x86_64-linux"]

[[machine]]
host = "b2"
systems = ["aarch64-linux"]
paralel-builds = 4
speed = 0
`))
	fmt.Println(err)
	// Output:
	// offload.toml:8: machine[2]: unknown key "paralel-builds" (did you mean "parallel-builds"?)
	// offload.toml:9: machine[2].speed: must be greater than 0, got 0
}

func ExampleParseBuilders() {
	files := map[string]string{
		"/etc/nix/machines": "ssh://root@b1 x86_64-linux,i686-linux - 8 2 kvm,big-parallel\n" +
			"nix@b2:2222 aarch64-linux # a comment; not an entry\n",
	}
	readFile := func(name string) ([]byte, error) { return []byte(files[name]), nil }
	ms, err := machines.ParseBuilders("@/etc/nix/machines; b3 - - 2", "x86_64-linux", readFile)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, m := range ms {
		fmt.Println(m.Name(), m.Systems, m.ParallelBuilds, m.Speed, m.Features, m.Source)
	}
	// Output:
	// root@b1 [x86_64-linux i686-linux] 8 2 [kvm big-parallel] /etc/nix/machines:1
	// nix@b2:2222 [aarch64-linux] 1 1 [] /etc/nix/machines:2
	// b3 [x86_64-linux] 2 1 [] builders:1
}
