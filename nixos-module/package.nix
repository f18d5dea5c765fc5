# The nix-offload package: nix-offload-hook (static, CGO off), the systemd units with ExecStart
# pointing into the package, and the example configuration. flake.nix calls it for
# packages.<system>.default and overlays.default.
{
  lib,
  stdenv,
  buildGoModule,
  version ? "devel",
}:

buildGoModule {
  pname = "nix-offload";
  inherit version;

  # Only what the build reads, so that editing the README does not rebuild.
  src = lib.fileset.toSource {
    root = ./..;
    fileset = lib.fileset.unions [
      ../go.mod
      ../go.sum
      ../cmd
      ../internal
      ../systemd
      ../examples
    ];
  };

  # The NAR hash of `go mod vendor` (see the README, "Install" → "Nix flake", for how to
  # recompute it; TestFlakeVendorHash fails when it is stale).
  vendorHash = "sha256-5Xi09JRNdglL5pH0oeSVC6z9VRfT1xV7Zkr0g75JOCY=";

  subPackages = [ "cmd/nix-offload-hook" ];
  env.CGO_ENABLED = 0;
  ldflags = [
    "-s"
    "-w"
    "-X main.buildVersion=${version}"
  ];

  # The tests need root, Nix and sshd (the test bed); the flake's checks run the unit tests.
  doCheck = false;

  # The units only where systemd is; the example configuration everywhere.
  postInstall =
    lib.optionalString stdenv.hostPlatform.isLinux ''
      install -D -m 0644 systemd/nix-offload.socket $out/lib/systemd/system/nix-offload.socket
      install -D -m 0644 systemd/nix-offload.service $out/lib/systemd/system/nix-offload.service
      substituteInPlace $out/lib/systemd/system/nix-offload.service \
        --replace-fail /usr/local/bin/nix-offload-hook $out/bin/nix-offload-hook
    ''
    + ''
      install -D -m 0644 examples/offload.toml $out/share/doc/nix-offload/offload.toml.example
    '';

  meta = {
    description = "Drop-in replacement for Nix's remote build hook, with a broker for warm SSH sessions";
    homepage = "https://github.com/nix-offload/nix-offload";
    mainProgram = "nix-offload-hook";
    # Tested on Linux; it builds for darwin, where a broker refuses every client (no peer
    # credentials without cgo) and the hook works alone.
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
