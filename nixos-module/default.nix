# services.nix-offload: nix-offload-hook as Nix's build hook, and its broker as a socket-activated
# systemd service.
#
#   services.nix-offload.enable = true;
#
# is all an existing configuration needs: every entry of nix.buildMachines becomes a machine
# (useNixBuildMachines), the module writes /etc/nix/offload.toml, points nix.settings.build-hook
# at the hook, and installs nix-offload.socket and nix-offload.service, which follow the unit
# files in systemd/ directive by directive (a test compares them).
{
  config,
  lib,
  pkgs,
  ...
}:

let
  inherit (lib)
    mkEnableOption
    mkIf
    mkOption
    optional
    types
    ;

  cfg = config.services.nix-offload;
  olib = import ./lib.nix { inherit lib; };

  defaultSocket = "/run/nix-offload/hook.sock";
  defaultStateDir = "/var/lib/nix-offload";
  # Nix's own default; the broker uses it too unless NIX_LOG_DIR says otherwise.
  defaultLogDir = "/nix/var/log/nix";

  absolutePath = types.strMatching "/.*";

  tomlTable = types.attrsOf olib.tomlValueType;

  machineOptions = {
    options = {
      host = mkOption {
        type = types.str;
        example = "builder1.example.org";
        description = "Host name, address or ~/.ssh/config alias of the machine (TOML `host`). No user and no port: those are `user` and `port`.";
      };
      port = mkOption {
        type = types.nullOr types.port;
        default = null;
        description = "SSH port (TOML `port`); null leaves it to ssh_config, then 22.";
      };
      user = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "SSH user (TOML `user`); null takes `settings.ssh.user`, then ssh_config, then root. It must be root or in the machine's `trusted-users`.";
      };
      sshKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "/etc/nix/offload_ed25519";
        description = "Private key file (TOML `ssh-key`), a string so that the key is never copied into the Nix store; null takes `settings.ssh.ssh-key`, then ssh_config and ssh-agent.";
      };
      hostKey = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI…";
        description = "The machine's public host key line, as in /etc/ssh/ssh_host_ed25519_key.pub (TOML `host-key`, not base64); null uses the known-hosts files.";
      };
      knownHosts = mkOption {
        type = types.nullOr (types.listOf types.str);
        default = null;
        description = "known_hosts files for this machine (TOML `known-hosts`); null takes `settings.ssh.known-hosts`, then ssh_config's and OpenSSH's defaults.";
      };
      connectTimeout = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "10s";
        description = "Connect timeout as a Go duration (TOML `connect-timeout`); null takes `settings.ssh.connect-timeout`, then 10s.";
      };
      serverAliveInterval = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "15s";
        description = "Time between SSH keepalives as a Go duration; three unanswered close the connection (TOML `server-alive-interval`); null takes `settings.ssh.server-alive-interval`, then ssh_config, then 15s.";
      };
      systems = mkOption {
        type = types.listOf types.str;
        example = [
          "x86_64-linux"
          "i686-linux"
        ];
        description = "Systems the machine builds for (TOML `systems`, required).";
      };
      parallelBuilds = mkOption {
        type = types.int;
        default = 1;
        description = "Builds the machine runs at once, 1 to 1024 (TOML `parallel-builds`).";
      };
      speed = mkOption {
        type = types.numbers.positive;
        default = 1.0;
        description = "Relative speed; among free machines the lowest load ÷ speed wins (TOML `speed`).";
      };
      features = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [
          "kvm"
          "big-parallel"
        ];
        description = "System features the machine supports (TOML `features`).";
      };
      mandatoryFeatures = mkOption {
        type = types.listOf types.str;
        default = [ ];
        description = "Only builds that require all of these go to the machine (TOML `mandatory-features`).";
      };
      remoteStore = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "`--store` for the remote nix-store (TOML `remote-store`).";
      };
      enabled = mkOption {
        type = types.bool;
        default = true;
        description = "Whether builds go to this machine (TOML `enabled`).";
      };
      minFreeSpace = mkOption {
        type = types.nullOr (types.either types.str types.ints.unsigned);
        default = null;
        example = "10G";
        description = "No build goes to the machine while its store's filesystem has less free space than this, read live by the broker: a size such as \"10G\" or a number of bytes (TOML `min-free-space`); null: no minimum.";
      };
      maxLoad = mkOption {
        type = types.nullOr (types.either types.ints.unsigned types.float);
        default = null;
        example = 2.0;
        description = "No new build goes to the machine while its load per core (1-minute load average ÷ cores, read live by the broker) is above this (TOML `max-load`); null: no limit.";
      };
    };
  };

  # "user@host" and "host:port" in a nix.buildMachines hostName are how Nix's store URIs carry
  # them; nix-offload's TOML wants them apart.
  splitHostName =
    h:
    let
      userHost = builtins.match "([^@]+)@(.+)" h;
      afterUser = if userHost == null then h else builtins.elemAt userHost 1;
      hostPort = builtins.match "([^:]+):([0-9]+)" afterUser;
    in
    {
      user = if userHost == null then null else builtins.elemAt userHost 0;
      host = if hostPort == null then afterUser else builtins.elemAt hostPort 0;
      port = if hostPort == null then null else lib.toInt (builtins.elemAt hostPort 1);
    };

  # nix.buildMachines entry → machine. NixOS's publicHostKey is the base64 of the key line
  # (`base64 -w0 ssh_host_ed25519_key.pub`); our host-key is the line itself. protocol is
  # dropped: nix-offload always speaks the serve protocol over SSH, for ssh:// and ssh-ng://
  # alike.
  fromNixMachine =
    i: m:
    let
      hp = splitHostName m.hostName;
      hostKey = if m.publicHostKey == null then null else olib.decodeBase64Text m.publicHostKey;
    in
    {
      inherit (hp) host port;
      user = if m.sshUser != null then m.sshUser else hp.user;
      sshKey = m.sshKey;
      hostKey = if hostKey == null then null else lib.removeSuffix "\n" hostKey;
      knownHosts = null;
      connectTimeout = null;
      serverAliveInterval = null;
      systems = if m.system != null then [ m.system ] else m.systems;
      parallelBuilds = m.maxJobs;
      speed = m.speedFactor;
      # Nix counts mandatory features as supported; so does the machines file NixOS writes.
      features = lib.unique (m.supportedFeatures ++ m.mandatoryFeatures);
      mandatoryFeatures = m.mandatoryFeatures;
      remoteStore = null;
      enabled = true;
      minFreeSpace = null;
      maxLoad = null;
      source = "nix.buildMachines entry ${toString i} (${m.hostName})";
      badHostKey = m.publicHostKey != null && hostKey == null;
      fixHint = "in nix.buildMachines, or set services.nix-offload.useNixBuildMachines = false and list the machines in services.nix-offload.machines";
    };

  fromOwnMachine =
    i: m:
    removeAttrs m [ "_module" ]
    // {
      source = "services.nix-offload.machines entry ${toString i} (${m.host})";
      badHostKey = false;
      fixHint = "in services.nix-offload.machines";
    };

  allMachines =
    lib.optionals cfg.useNixBuildMachines (lib.imap1 fromNixMachine config.nix.buildMachines)
    ++ lib.imap1 fromOwnMachine cfg.machines;

  machineTOML =
    m:
    {
      inherit (m)
        host
        port
        user
        systems
        speed
        enabled
        ;
      "ssh-key" = m.sshKey;
      "host-key" = m.hostKey;
      "known-hosts" = m.knownHosts;
      "connect-timeout" = m.connectTimeout;
      "server-alive-interval" = m.serverAliveInterval;
      "parallel-builds" = m.parallelBuilds;
      features = if m.features == [ ] then null else m.features;
      "mandatory-features" = if m.mandatoryFeatures == [ ] then null else m.mandatoryFeatures;
      "remote-store" = m.remoteStore;
      "min-free-space" = m.minFreeSpace;
      "max-load" = m.maxLoad;
    };

  # The name the hook gives a machine ("user@host:port", host without case), which must be
  # unique; the user falls back to [ssh] user as in the hook.
  machineName =
    m:
    let
      user = if m.user != null then m.user else cfg.settings.ssh.user or null;
    in
    lib.optionalString (user != null) "${user}@"
    + lib.toLower m.host
    + lib.optionalString (m.port != null) ":${toString m.port}";

  duplicates =
    let
      indexed = lib.imap0 (i: m: m // { index = i; }) allMachines;
      firstOf = name: lib.findFirst (m: machineName m == name) null indexed;
    in
    lib.filter (m: (firstOf (machineName m)).index != m.index) indexed;

  metricsPort =
    let
      m = builtins.match "(.*):([0-9]+)" cfg.metrics.address;
    in
    if m == null then null else lib.toInt (builtins.elemAt m 1);

  stateDir = cfg.settings.daemon.state-dir;

  configText =
    "# Written by the NixOS module services.nix-offload: change the NixOS configuration, not this file.\n\n"
    + olib.toTOML (
      cfg.settings
      // {
        daemon = cfg.settings.daemon // lib.optionalAttrs cfg.metrics.enable { metrics = cfg.metrics.address; };
        ssh = if cfg.settings.ssh == { } then null else cfg.settings.ssh;
        machine = if allMachines == [ ] then null else map machineTOML allMachines;
      }
    );

  # The file is the text above, checked by the binary that will read it when checkConfig is
  # on, so that a mistake in `settings` fails the system build with file, line and key
  # instead of a broker that does not start. configText is also an attribute of the
  # derivation, where the tests read it.
  configFile =
    pkgs.runCommand "nix-offload.toml"
      {
        inherit configText;
        passAsFile = [ "configText" ];
        preferLocalBuild = true;
        allowSubstitutes = false;
      }
      (
        ''
          cp "$configTextPath" offload.toml
        ''
        + lib.optionalString cfg.checkConfig ''
          ${cfg.package}/bin/nix-offload-hook check --config-only -config offload.toml
        ''
        + ''
          cp offload.toml "$out"
        ''
      );

  hookPath = "${cfg.package}/bin/nix-offload-hook";
in
{
  options.services.nix-offload = {
    enable = mkEnableOption "nix-offload as Nix's remote build hook, with its broker (nix-offload.socket)";

    package = mkOption {
      type = types.package;
      default =
        pkgs.nix-offload
          or (throw "services.nix-offload.package: pkgs has no nix-offload; import the nix-offload flake's nixosModules.default (it sets the package), add its overlays.default, or set services.nix-offload.package");
      defaultText = lib.literalExpression "pkgs.nix-offload";
      description = "The nix-offload package; its bin/nix-offload-hook becomes Nix's build-hook.";
    };

    useNixBuildMachines = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Turn every entry of {option}`nix.buildMachines` into a machine, so that an existing
        configuration moves over with `services.nix-offload.enable = true;` alone. hostName,
        sshUser, sshKey, system(s), maxJobs, speedFactor, supportedFeatures, mandatoryFeatures
        and publicHostKey (decoded from base64) carry over; protocol does not matter, as
        nix-offload always speaks the serve protocol over SSH. The entries are used whether or
        not {option}`nix.distributedBuilds` is set.
      '';
    };

    machines = mkOption {
      type = types.listOf (types.submodule machineOptions);
      default = [ ];
      example = lib.literalExpression ''
        [ {
          host = "builder1.example.org";
          hostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI…";
          systems = [ "x86_64-linux" "i686-linux" ];
          parallelBuilds = 8;
          features = [ "kvm" "big-parallel" ];
        } ]
      '';
      description = "Machines in addition to those from nix.buildMachines: the `[[machine]]` tables of offload.toml, with the same defaults.";
    };

    settings = mkOption {
      type = types.submodule {
        freeformType = tomlTable;
        options.daemon = mkOption {
          type = types.submodule {
            freeformType = tomlTable;
            options.socket = mkOption {
              type = absolutePath;
              default = defaultSocket;
              description = "The broker's socket; nix-offload.socket listens on it.";
            };
            options.state-dir = mkOption {
              type = absolutePath;
              default = defaultStateDir;
              description = "Machine health and embedded-mode slot files. The service may write here (StateDirectory, or ReadWritePaths for another path).";
            };
          };
          default = { };
          description = "The `[daemon]` table. `metrics` comes from {option}`services.nix-offload.metrics`.";
        };
        options.ssh = mkOption {
          type = types.submodule { freeformType = tomlTable; };
          default = { };
          example = {
            user = "nixbuild";
            ssh-key = "/etc/nix/offload_ed25519";
            known-hosts = [ "/etc/ssh/ssh_known_hosts" ];
          };
          description = "The `[ssh]` table: defaults for every machine.";
        };
      };
      default = { };
      description = ''
        offload.toml apart from the machines, with the file's own key names (README,
        "Configuration"). The file is checked by the binary when the system is built
        ({option}`services.nix-offload.checkConfig`): an unknown key fails the build with its
        line. Values are TOML values; a null value leaves its key out.
      '';
    };

    logDir = mkOption {
      type = absolutePath;
      default = defaultLogDir;
      example = "/var/log/nix";
      description = ''
        Nix's log directory. The broker writes the build log of every derivation of a graph
        (`nix-offload-hook build`) here, where `nix log` finds it, so the service may write
        here (ReadWritePaths). Change it only if your Nix keeps its logs elsewhere
        (NIX_LOG_DIR): the broker then runs with NIX_LOG_DIR set to it.
      '';
    };

    checkConfig = mkOption {
      type = types.bool;
      default = true;
      description = "Check offload.toml with `nix-offload-hook check --config-only` while building the system. This runs the package on the build machine: turn it off when cross-compiling.";
    };

    metrics = {
      enable = mkEnableOption "the broker's Prometheus metrics listener";
      address = mkOption {
        type = types.str;
        default = "127.0.0.1:9464";
        example = "[::]:9464";
        description = "host:port the metrics listener binds (`[daemon] metrics`).";
      };
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the metrics port in the firewall.";
    };
  };

  config = mkIf cfg.enable {
    assertions =
      lib.concatMap (m: [
        {
          assertion = m.systems != [ ];
          message = "services.nix-offload: ${m.source} has no systems; list the systems it builds for, e.g. [ \"x86_64-linux\" ], ${m.fixHint}.";
        }
        {
          assertion = m.parallelBuilds >= 1 && m.parallelBuilds <= 1024;
          message = "services.nix-offload: ${m.source} has ${toString m.parallelBuilds} parallel builds (maxJobs); it must have 1 to 1024, ${m.fixHint}.";
        }
        {
          assertion = !m.badHostKey;
          message = "services.nix-offload: ${m.source}: publicHostKey is not base64 of a public key line; NixOS expects the output of `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`.";
        }
      ]) allMachines
      ++ map (m: {
        assertion = false;
        message = "services.nix-offload: machine ${machineName m} is listed twice: ${(lib.findFirst (o: machineName o == machineName m) null allMachines).source} and ${m.source}. With useNixBuildMachines = true every nix.buildMachines entry is a machine already; remove one.";
      }) duplicates
      ++ [
        {
          assertion = !(cfg.settings ? machine);
          message = "services.nix-offload: settings.machine is not where machines go: use services.nix-offload.machines (or nix.buildMachines).";
        }
        {
          assertion = !(cfg.settings.daemon ? metrics);
          message = "services.nix-offload: settings.daemon.metrics is set by services.nix-offload.metrics.enable and .address; set those instead.";
        }
        {
          assertion = !cfg.metrics.enable || metricsPort != null;
          message = "services.nix-offload: metrics.address must be host:port, such as \"127.0.0.1:9464\"; got \"${cfg.metrics.address}\".";
        }
        {
          assertion = !cfg.openFirewall || cfg.metrics.enable;
          message = "services.nix-offload: openFirewall opens the metrics port, but metrics.enable is false.";
        }
      ];

    warnings =
      optional (allMachines == [ ]) "services.nix-offload is enabled without machines (none in services.nix-offload.machines${lib.optionalString cfg.useNixBuildMachines " or nix.buildMachines"}): the hook declines every build, and Nix builds locally."
      ++ optional (!config.nix.distributedBuilds) "services.nix-offload: nix.distributedBuilds is false, so NixOS writes `builders =` to nix.conf, and the hook takes an empty `builders` as \"build locally\" (as `--builders ''` asks): nothing is offloaded. Leave nix.distributedBuilds at the true this module sets.";

    # An empty `builders` is Nix's way to ask for a local build, and the hook honours it even
    # with offload.toml. NixOS writes `builders =` whenever distributed builds are off, so the
    # module turns them on; with build-hook pointing at us, Nix's own hook is not used, and
    # `builders` (Nix's default @/etc/nix/machines) only has to be non-empty.
    nix.distributedBuilds = lib.mkDefault true;

    environment.etc."nix/offload.toml".source = configFile;
    environment.systemPackages = [ cfg.package ];

    # Nix 2.8 to 2.16 declare build-hook as one path (2.10–2.16 split it on spaces), 2.17 and
    # later as a list of strings whose head is the program. Both forms write the same nix.conf
    # line; each Nix gets the type it declares, so that nix.settings merges as it expects.
    nix.settings.build-hook =
      if lib.versionAtLeast (lib.getVersion config.nix.package) "2.17" then [ hookPath ] else hookPath;

    systemd.sockets.nix-offload = {
      description = "nix-offload build hook broker socket";
      documentation = [ "https://github.com/nix-offload/nix-offload" ];
      wantedBy = [ "sockets.target" ];
      listenStreams = [ cfg.settings.daemon.socket ];
      socketConfig = {
        # Root only: whoever connects can have the broker build anything on the machines.
        SocketUser = "root";
        SocketGroup = "root";
        SocketMode = "0600";
        DirectoryMode = "0755";
        FileDescriptorName = "hook";
        RemoveOnStop = true;
      };
    };

    systemd.services.nix-offload = {
      description = "nix-offload build hook broker";
      documentation = [ "https://github.com/nix-offload/nix-offload" ];
      requires = [ "nix-offload.socket" ];
      after = [
        "nix-offload.socket"
        "network.target"
        "nix-daemon.socket"
      ];
      # Started by the socket, not at boot. Reads the local store through nix-daemon with
      # nix-store, which systemd's default PATH does not have on NixOS.
      path = [ config.nix.package ];
      environment = {
        NIX_REMOTE = "daemon";
      }
      // lib.optionalAttrs (cfg.logDir != defaultLogDir) { NIX_LOG_DIR = cfg.logDir; };
      restartTriggers = [ configFile ];
      # Each directive and why is in systemd/nix-offload.service; these are the same, and a
      # test compares them. The broker runs as root, without capabilities: the SSH keys and
      # known_hosts it uses are root's, and nix-daemon trusts root. What the sandbox leaves
      # open, it needs: outbound TCP to any machine (no PrivateNetwork=, no IPAddressDeny=),
      # unix sockets for nix-daemon, the journal and sd_notify, read access to ~root/.ssh,
      # and write access to its state directory and Nix's log directory only.
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${hookPath} daemon";
        WatchdogSec = "30s";
        Restart = "on-failure";
        RestartSec = "2s";
        KillMode = "mixed";
        TimeoutStopSec = "300s";
        StateDirectory = "nix-offload";
        StateDirectoryMode = "0700";
        UMask = "0077";
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        NoNewPrivileges = true;
        # Relaxed for the broker's job: /var/lib/nix-offload (StateDirectory) stays
        # writable, and so does settings.daemon.state-dir when it is elsewhere, and Nix's
        # log directory for the graphs' build logs ("-": a missing one does not stop the
        # service).
        ProtectSystem = "strict";
        # Relaxed: read-only rather than hidden, because ~root/.ssh holds the keys,
        # known_hosts and ssh_config that machines may name.
        ProtectHome = "read-only";
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        # Relaxed: TCP to the machines (IPv4 and IPv6), unix sockets for nix-daemon, the
        # journal and sd_notify.
        RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
        SystemCallArchitectures = "native";
        SystemCallFilter = "@system-service";
        SystemCallErrorNumber = "EPERM";
        ReadWritePaths = [ "-${cfg.logDir}" ] ++ optional (stateDir != defaultStateDir) stateDir;
      };
    };

    networking.firewall.allowedTCPPorts = mkIf (cfg.openFirewall && metricsPort != null) [ metricsPort ];
  };
}
