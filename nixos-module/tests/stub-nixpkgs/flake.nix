# A stand-in for the nixpkgs flake input, for `nix flake show` and `nix flake check --no-build`
# of nix-offload's flake where nixpkgs cannot be fetched (TestFlakeEvaluates). It has the real
# lib (the test copies nixpkgs' lib/ next to this file) and, per system, just the packages and
# builders the flake calls. Its derivations can be instantiated but not built: they show that
# the flake evaluates and hands buildGoModule and mkShell the arguments they take, not that
# the package builds.
{
  description = "stand-in nixpkgs for evaluating nix-offload's flake offline";

  outputs =
    { self }:
    let
      lib = import ./lib;

      # The arguments of nixpkgs' buildGoModule the flake may pass (besides mkDerivation's).
      goModuleArgs = [
        "pname"
        "version"
        "src"
        "vendorHash"
        "modBuildPhase"
        "subPackages"
        "env"
        "ldflags"
        "doCheck"
        "postInstall"
        "meta"
      ];

      forSystem =
        system:
        let
          # A derivation whose attributes are the string-like arguments; anything else (meta,
          # env, passthru) stays on the returned value. overrideAttrs works as in nixpkgs.
          mk =
            args:
            let
              plain = lib.filterAttrs (
                _: v: builtins.isString v || builtins.isBool v || builtins.isInt v || builtins.isList v || builtins.isPath v || (v ? outPath)
              ) (removeAttrs args [ "meta" "passthru" "env" ]);
              drv = derivation (
                plain
                // {
                  name = args.name or "${args.pname}-${args.version}";
                  inherit system;
                  builder = "/bin/sh";
                  args = [
                    "-c"
                    "echo the stand-in nixpkgs cannot build anything >&2; exit 1"
                  ];
                }
              );
            in
            drv
            // {
              meta = args.meta or { };
              overrideAttrs = f: mk (args // (if builtins.isFunction f then f args else f));
            };

          tool = name: mk { inherit name; };

          pkgs = {
            inherit lib;
            stdenv.hostPlatform = {
              inherit system;
              isLinux = lib.hasSuffix "-linux" system;
              isDarwin = lib.hasSuffix "-darwin" system;
            };
            callPackage =
              f: extra:
              let
                fn = if builtins.isFunction f then f else import f;
              in
              fn (builtins.intersectAttrs (builtins.functionArgs fn) pkgs // extra);
            buildGoModule =
              args:
              let
                unknown = lib.filter (n: !(builtins.elem n goModuleArgs)) (builtins.attrNames args);
              in
              assert lib.assertMsg (unknown == [ ]) "stand-in buildGoModule: unexpected arguments ${toString unknown}";
              assert lib.assertMsg (lib.hasPrefix "sha256-" args.vendorHash) "stand-in buildGoModule: vendorHash is not an SRI hash";
              mk args;
            runCommand =
              name: env: buildCommand:
              mk (env // { inherit name buildCommand; });
            mkShell = args: mk ({ name = "nix-shell"; } // removeAttrs args [ "packages" ] // { buildInputs = args.packages or [ ]; });
            go = tool "go-1.26.0";
            go-tools = tool "go-tools";
            nix = tool "nix-2.34.8";
            openssh = tool "openssh";
            systemd = tool "systemd";
            gnumake = tool "gnumake";
            git = tool "git";
            iproute2 = tool "iproute2";
            psmisc = tool "psmisc";
          };
        in
        pkgs;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
        "x86_64-darwin"
        "aarch64-darwin"
      ] forSystem;
    };
}
