# Evaluates the NixOS module with nixpkgs' lib and lib.evalModules, in the cases the Go test
# (cmd/nix-offload-hook/nixos_module_test.go) checks. By hand:
#
#   nix-instantiate --eval --strict --json nixos-module/tests/eval.nix \
#     --argstr libPath "$PWD/../shared/third_party/nixpkgs-lib/lib"
#
# libPath is a nixpkgs lib/ directory (of a full nixpkgs tree, or the lib-only copy).
# base64Inputs is a JSON list of strings to decode with the module's base64 decoder.
{
  libPath,
  base64Inputs ? "[]",
}:

let
  lib = import libPath;
  stubs = import ./stubs.nix { inherit lib; };
  olib = import ../lib.nix { inherit lib; };

  # The key line behind publicHostKey below (base64 -w0 of it, newline included, as NixOS
  # documents). A public key: nothing secret.
  hostKeyLine = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAII4O16C1i3DMKc7N1Dh+5iiKO0BD+S6kC+OmVVzX2hAc root@builder1";
  hostKeyBase64 = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUk0TzE2QzFpM0RNS2M3TjFEaCs1aWlLTzBCRCtTNmtDK09tVlZ6WDJoQWMgcm9vdEBidWlsZGVyMQo=";

  evalCase =
    caseModule:
    let
      config =
        (lib.evalModules {
          modules = [
            stubs.module
            ../default.nix
            { _module.args.pkgs = stubs.pkgs; }
            { nix.package = lib.mkDefault (stubs.nixPackage "2.8.0"); }
            caseModule
          ];
        }).config;
      etc = config.environment.etc."nix/offload.toml" or null;
      unit =
        u:
        if u == null then
          null
        else
          removeAttrs u [ "_module" ]
          // {
            # Derivations in a unit become their store paths, as in the rendered unit file.
            path = map toString (u.path or [ ]);
            restartTriggers = map toString (u.restartTriggers or [ ]);
          };
    in
    {
      failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) config.assertions);
      inherit (config) warnings;
      offloadToml = if etc == null then null else etc.source.configText;
      configFile = if etc == null then null else toString etc.source;
      configScript = if etc == null then null else etc.source.buildCommand;
      buildHook = config.nix.settings.build-hook or null;
      # nix.conf's `builders`: "unset" (Nix's default, @/etc/nix/machines), else its value.
      builders = if config.nix.settings ? builders then config.nix.settings.builders else "unset";
      service = unit (config.systemd.services.nix-offload or null);
      socket = unit (config.systemd.sockets.nix-offload or null);
      firewallTCP = config.networking.firewall.allowedTCPPorts;
      systemPackages = map toString config.environment.systemPackages;
    };

  withMachines = machines: { nix.buildMachines = machines; };
  enabled = {
    services.nix-offload.enable = true;
  };
in
{
  cases = lib.mapAttrs (_: evalCase) {
    # An existing distributed-builds configuration plus the one line.
    buildMachines = {
      imports = [ enabled ];
      nix.distributedBuilds = true;
      nix.buildMachines = [
        {
          hostName = "builder1.example.org";
          system = "x86_64-linux";
          sshUser = "nixbuild";
          sshKey = "/etc/nix/id_builder";
          maxJobs = 4;
          speedFactor = 2;
          supportedFeatures = [
            "kvm"
            "big-parallel"
          ];
          mandatoryFeatures = [ "benchmark" ];
          publicHostKey = hostKeyBase64;
        }
        {
          hostName = "root@b2.example.org:2222";
          systems = [
            "aarch64-linux"
            "armv7l-linux"
          ];
          protocol = "ssh-ng";
        }
      ];
    };

    # Machines of our own; nix.buildMachines is ignored when useNixBuildMachines is off.
    # Nix 2.34 takes build-hook as a list.
    machines = {
      imports = [ enabled ];
      nix.package = stubs.nixPackage "2.34.8";
      nix.buildMachines = [
        {
          hostName = "ignored.example.org";
          system = "x86_64-linux";
        }
      ];
      services.nix-offload.useNixBuildMachines = false;
      services.nix-offload.machines = [
        {
          host = "b1.example.org";
          port = 2201;
          user = "root";
          sshKey = "/etc/nix/offload_ed25519";
          hostKey = hostKeyLine;
          knownHosts = [ "/etc/ssh/ssh_known_hosts" ];
          connectTimeout = "5s";
          serverAliveInterval = "20s";
          systems = [ "x86_64-linux" ];
          parallelBuilds = 8;
          speed = 1.5;
          features = [ "kvm" ];
          mandatoryFeatures = [ "kvm" ];
          remoteStore = "/mnt/store";
          enabled = false;
          minFreeSpace = "10G";
          maxLoad = 2.5;
        }
        {
          host = "2001:db8::7";
          systems = [ "x86_64-linux" ];
        }
      ];
    };

    # settings for [daemon] and [ssh], metrics with the firewall open, a Lix version, Nix's
    # logs elsewhere.
    settings = {
      imports = [ enabled ];
      nix.package = stubs.nixPackage "2.91.1";
      services.nix-offload = {
        logDir = "/srv/nix-logs";
        settings.daemon.socket = "/run/nix-offload-alt/broker.sock";
        settings.daemon.state-dir = "/srv/nix-offload";
        settings.ssh = {
          user = "nixbuild";
          ssh-key = "/etc/nix/offload_ed25519";
          known-hosts = [
            "/etc/ssh/ssh_known_hosts"
            "/etc/nix/builders_known_hosts"
          ];
          connect-timeout = "20s";
          user-unset-by-null = null;
        };
        metrics.enable = true;
        metrics.address = "0.0.0.0:9500";
        openFirewall = true;
        machines = [
          {
            host = "b3.example.org";
            systems = [ "x86_64-linux" ];
          }
        ];
      };
    };

    # A key the binary does not know: the module writes it, and the check fails the build.
    settingsTypo = {
      imports = [ enabled ];
      services.nix-offload.settings.ssh.usr = "nixbuild";
      services.nix-offload.machines = [
        {
          host = "b4.example.org";
          systems = [ "x86_64-linux" ];
        }
      ];
    };

    checkOff = {
      imports = [ enabled ];
      services.nix-offload.checkConfig = false;
    };

    disabled = withMachines [
      {
        hostName = "b5.example.org";
        system = "x86_64-linux";
      }
    ];

    noMachines = enabled;

    # nix.distributedBuilds forced off: NixOS writes `builders =`, which the hook obeys.
    distributedBuildsOff = {
      imports = [ enabled ];
      nix.distributedBuilds = false;
      services.nix-offload.machines = [
        {
          host = "b6.example.org";
          systems = [ "x86_64-linux" ];
        }
      ];
    };

    noSystems = {
      imports = [ enabled ];
      nix.buildMachines = [ { hostName = "nosys.example.org"; } ];
      services.nix-offload.machines = [
        {
          host = "nosys2.example.org";
          systems = [ ];
        }
      ];
    };

    zeroSlots = {
      imports = [ enabled ];
      nix.buildMachines = [
        {
          hostName = "zero.example.org";
          system = "x86_64-linux";
          maxJobs = 0;
        }
      ];
      services.nix-offload.machines = [
        {
          host = "many.example.org";
          systems = [ "x86_64-linux" ];
          parallelBuilds = 2000;
        }
      ];
    };

    duplicate = {
      imports = [ enabled ];
      nix.buildMachines = [
        {
          hostName = "dup.example.org";
          system = "x86_64-linux";
          sshUser = "root";
        }
      ];
      services.nix-offload.machines = [
        {
          host = "DUP.example.org";
          user = "root";
          systems = [ "aarch64-linux" ];
        }
      ];
    };

    badHostKey = {
      imports = [ enabled ];
      nix.buildMachines = [
        {
          hostName = "badkey.example.org";
          system = "x86_64-linux";
          publicHostKey = hostKeyLine;
        }
      ];
    };

    settingsMachine = {
      imports = [ enabled ];
      services.nix-offload.settings.machine = [ { host = "x"; } ];
    };

    metricsInSettings = {
      imports = [ enabled ];
      services.nix-offload.settings.daemon.metrics = "127.0.0.1:1";
    };

    openFirewallWithoutMetrics = {
      imports = [ enabled ];
      services.nix-offload.openFirewall = true;
    };

    badMetricsAddress = {
      imports = [ enabled ];
      services.nix-offload.metrics.enable = true;
      services.nix-offload.metrics.address = "localhost";
    };
  };

  # The TOML writer on values that need care; the Go test parses `toml` and compares it with
  # `value` (as JSON).
  tomlWriter =
    let
      value = {
        plain = "plain";
        quote = "say \"hi\"";
        backslash = "C:\\dir\\";
        controls = "tab\there\nnew line\r";
        del = builtins.fromJSON ''"a\u007fb"'';
        bell = builtins.fromJSON ''"\u0007"'';
        unicode = "héllo ☃";
        dollar = "\${not interpolated}";
        int = 42;
        negative = -7;
        float = 2.0;
        fraction = 0.125;
        bool = false;
        list = [
          "a"
          "b"
        ];
        emptyList = [ ];
        mixed = [
          1
          "one"
          [ true ]
        ];
        inlineTables = [
          { a = 1; }
          [ { b = 2; } ]
        ];
        "key with spaces" = 1;
        "key.with.dots" = 2;
        dropped = null;
        table = {
          x = 1;
          nested = {
            y = "z";
            deeper.list = [ 1 ];
          };
        };
        emptyTable = { };
        array = [
          { name = "first"; }
          {
            name = "second";
            sub.k = "v";
          }
        ];
      };
    in
    {
      inherit value;
      toml = olib.toTOML value;
      nullInList = (builtins.tryEval (olib.toTOML { a = [ null ]; })).success;
      pathValue = (builtins.tryEval (olib.toTOML { a = ./eval.nix; })).success;
    };

  base64 = map olib.decodeBase64Text (builtins.fromJSON base64Inputs);
}
