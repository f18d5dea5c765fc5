{
  description = "nix-offload: a drop-in replacement for Nix's remote build hook, with a broker that keeps SSH sessions warm";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # The test bed, the units and the module are Linux's; the hook itself also builds for
      # darwin (CGO off; scripts/test cross-compiles it), untested there, and a broker on
      # darwin refuses every client because it cannot read peer credentials.
      linuxSystems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      systems = linuxSystems ++ [
        "x86_64-darwin"
        "aarch64-darwin"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});
      forLinux = f: lib.genAttrs linuxSystems (system: f system nixpkgs.legacyPackages.${system});

      # The commit, as `git describe --always` gives it to the Makefile's builds.
      version = self.shortRev or self.dirtyShortRev or "devel";

      # go.mod asks for Go 1.26; nixpkgs revisions whose default Go is older name it
      # buildGo126Module.
      mkNixOffload =
        pkgs:
        pkgs.callPackage ./nixos-module/package.nix {
          inherit version;
          buildGoModule = pkgs.buildGo126Module or pkgs.buildGoModule;
        };

      # The Go tests, run in the build sandbox: unit tests, the NixOS module evaluation (with
      # this flake's nixpkgs as $NIXPKGS), the Makefile. The integration tests need root and the
      # test bed, and skip.
      goTests =
        pkgs: name: testFlags:
        (mkNixOffload pkgs).overrideAttrs (old: {
          pname = name;
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./go.mod
              ./go.sum
              ./cmd
              ./internal
              ./systemd
              ./examples
              ./nixos-module
              ./flake.nix
              ./Makefile
            ];
          };
          doCheck = true;
          nativeCheckInputs = [
            pkgs.nix
            pkgs.gnumake
          ];
          checkPhase = ''
            runHook preCheck
            export HOME=$TMPDIR NIXPKGS=${nixpkgs}
            export GOFLAGS=''${GOFLAGS//-trimpath/}
            go test -count=1 ${testFlags}
            runHook postCheck
          '';
          postInstall = "";
          installPhase = "touch $out";
        });
    in
    {
      packages = forAllSystems (
        _: pkgs: rec {
          nix-offload = mkNixOffload pkgs;
          default = nix-offload;
        }
      );

      overlays.default = final: _prev: { nix-offload = mkNixOffload final; };

      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nixos-module ];
          services.nix-offload.package = lib.mkDefault (mkNixOffload pkgs);
        };

      devShells = forLinux (
        _: pkgs: {
          default = pkgs.mkShell {
            packages = [
              (pkgs.go_1_26 or pkgs.go)
              pkgs.go-tools # staticcheck
              pkgs.nix # nix-instantiate for the module tests; Nix 2.8 of the bed comes from Debian
              pkgs.openssh # sshd of the builder hosts
              pkgs.systemd # systemd-socket-activate, systemd-analyze
              pkgs.gnumake
              pkgs.git
              pkgs.iproute2
              pkgs.psmisc
            ];
          };
        }
      );

      checks = forLinux (
        system: pkgs: {
          package = self.packages.${system}.default;
          go-tests = goTests pkgs "nix-offload-go-tests" "./...";
          nixos-module = goTests pkgs "nix-offload-nixos-module-tests" "-run 'TestNixOSModule|TestNixFilesParse|TestMakeInstall|TestExampleConfig' ./cmd/nix-offload-hook";
        }
      );
    };
}
