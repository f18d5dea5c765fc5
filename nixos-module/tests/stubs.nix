# Stand-ins for the parts of NixOS and nixpkgs the module touches, so that it evaluates with
# nixpkgs' lib alone (the whole of nixpkgs is not at hand offline).
#
# The options are declared with the names, types and defaults NixOS gives them (nixos/modules:
# config/nix.nix, config/nix-remote-build.nix, system/etc/etc.nix, system/boot/systemd.nix,
# services/networking/firewall.nix, misc/assertions.nix), and only those: a misspelt option in
# the module fails the evaluation here as it would on NixOS. The systemd units are kept as
# data; NixOS renders them into unit files, and the test compares the data with systemd/.
{ lib }:

let
  inherit (lib) mkOption types;

  storePath = name: "/nix/store/00000000000000000000000000000000-${name}";

  # A derivation as far as the module can tell: lib.types.package accepts it, and
  # "${drv}/bin/x" gives a store path.
  fakeDrv =
    name: attrs:
    {
      type = "derivation";
      inherit name;
      outPath = storePath name;
    }
    // attrs;

  # NixOS's systemd "unit option" values: a string, number or boolean, or a list of them for
  # directives that may repeat.
  unitAtom = types.oneOf [
    types.bool
    types.int
    types.str
  ];
  unitOption = types.either unitAtom (types.listOf unitAtom);

  unitCommon = {
    description = mkOption {
      type = types.str;
      default = "";
    };
    documentation = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    requires = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    wants = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    after = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    before = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    wantedBy = mkOption {
      type = types.listOf types.str;
      default = [ ];
    };
    unitConfig = mkOption {
      type = types.attrsOf unitOption;
      default = { };
    };
  };

  # nix.settings values (NixOS's semanticConfType).
  confAtom = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      types.package
    ]
  );
in
{
  inherit fakeDrv;

  # nixPackage "2.8.0" is a stand-in for pkgs.nix of that version.
  nixPackage =
    version:
    fakeDrv "nix-${version}" {
      inherit version;
    };

  # The stand-in pkgs. runCommand keeps the script and its environment as attributes, as the
  # derivation nixpkgs returns does.
  pkgs = {
    nix-offload = fakeDrv "nix-offload-test" { version = "test"; };
    runCommand =
      name: env: buildCommand:
      fakeDrv name (env // { inherit buildCommand; });
  };

  module =
    { config, ... }:
    {
      # As config/nix-remote-build.nix: without distributed builds NixOS clears `builders`,
      # which nix.conf then carries as `builders =` (config/nix.nix renders null as "").
      config.nix.settings = lib.mkIf (!config.nix.distributedBuilds) { builders = null; };

      options = {
        assertions = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };

        nix.package = mkOption {
          type = types.package;
        };
        nix.settings = mkOption {
          type = types.submodule {
            freeformType = types.attrsOf (types.either confAtom (types.listOf confAtom));
          };
          default = { };
        };
        nix.distributedBuilds = mkOption {
          type = types.bool;
          default = false;
        };
        nix.buildMachines = mkOption {
          type = types.listOf (
            types.submodule {
              options = {
                hostName = mkOption { type = types.str; };
                protocol = mkOption {
                  type = types.enum [
                    null
                    "ssh"
                    "ssh-ng"
                  ];
                  default = "ssh";
                };
                system = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                systems = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                sshUser = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                sshKey = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
                maxJobs = mkOption {
                  type = types.int;
                  default = 1;
                };
                speedFactor = mkOption {
                  type = types.numbers.positive;
                  default = 1;
                };
                mandatoryFeatures = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                supportedFeatures = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                publicHostKey = mkOption {
                  type = types.nullOr types.str;
                  default = null;
                };
              };
            }
          );
          default = [ ];
        };

        environment.etc = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = {
                source = mkOption { type = types.path; };
                text = mkOption {
                  type = types.nullOr types.lines;
                  default = null;
                };
                mode = mkOption {
                  type = types.str;
                  default = "symlink";
                };
              };
            }
          );
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };

        networking.firewall.allowedTCPPorts = mkOption {
          type = types.listOf types.port;
          default = [ ];
        };

        systemd.services = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = unitCommon // {
                path = mkOption {
                  type = types.listOf (types.either types.package types.str);
                  default = [ ];
                };
                environment = mkOption {
                  type = types.attrsOf (types.nullOr (types.either types.str types.package));
                  default = { };
                };
                restartTriggers = mkOption {
                  type = types.listOf types.unspecified;
                  default = [ ];
                };
                serviceConfig = mkOption {
                  type = types.attrsOf unitOption;
                  default = { };
                };
              };
            }
          );
          default = { };
        };
        systemd.sockets = mkOption {
          type = types.attrsOf (
            types.submodule {
              options = unitCommon // {
                listenStreams = mkOption {
                  type = types.listOf types.str;
                  default = [ ];
                };
                socketConfig = mkOption {
                  type = types.attrsOf unitOption;
                  default = { };
                };
              };
            }
          );
          default = { };
        };
      };
    };
}
