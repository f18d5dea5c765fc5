# Build and install nix-offload on a Linux machine that has Go and Nix (any Nix from 2.8 on).
#
#   make                  build bin/nix-offload-hook (static, CGO off, version stamped)
#   sudo make install     binary, systemd units, /etc/nix/offload.toml.example
#   make test             scripts/test: every test (as root: the integration tests too)
#
# PREFIX (default /usr/local), DESTDIR (for packaging), SYSTEMDUNITDIR and SYSCONFDIR move
# what is installed. ExecStart= in the installed service names $(BINDIR)/nix-offload-hook.
#
# install never writes /etc/nix/offload.toml: while that file does not exist the hook reads
# Nix's own `builders` setting, so installing an example there would change which machines
# are used. Copy the example and edit it (README, "Install").

GO ?= go
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo devel)
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SYSCONFDIR ?= /etc
SYSTEMDUNITDIR ?= /etc/systemd/system
BIN ?= bin/nix-offload-hook

.PHONY: all build install uninstall test clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-X main.buildVersion=$(VERSION)" -o $(BIN) ./cmd/nix-offload-hook

install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/nix-offload-hook
	install -d -m 0755 $(DESTDIR)$(SYSTEMDUNITDIR)
	install -m 0644 systemd/nix-offload.socket $(DESTDIR)$(SYSTEMDUNITDIR)/nix-offload.socket
	sed 's|/usr/local/bin/nix-offload-hook|$(BINDIR)/nix-offload-hook|' systemd/nix-offload.service \
		>$(DESTDIR)$(SYSTEMDUNITDIR)/nix-offload.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/nix-offload.service
	install -D -m 0644 examples/offload.toml $(DESTDIR)$(SYSCONFDIR)/nix/offload.toml.example
	@echo
	@echo "installed $(DESTDIR)$(BINDIR)/nix-offload-hook ($(VERSION)) and the units in $(DESTDIR)$(SYSTEMDUNITDIR)."
	@echo "next: build-hook = $(BINDIR)/nix-offload-hook in /etc/nix/nix.conf, then"
	@echo "      systemctl daemon-reload && systemctl enable --now nix-offload.socket (README, \"Install\")"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/nix-offload-hook \
		$(DESTDIR)$(SYSTEMDUNITDIR)/nix-offload.socket \
		$(DESTDIR)$(SYSTEMDUNITDIR)/nix-offload.service \
		$(DESTDIR)$(SYSCONFDIR)/nix/offload.toml.example

test:
	scripts/test

clean:
	rm -f $(BIN)
