# Every target bootstraps its own virtual environment from setup.cfg, so a
# fresh clone needs only python3 (>= 3.9) with venv: `make run`, `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench faults ingest-outage clean install uninstall deb

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,cluster,modbus,test,dev]'
	touch $(STAMP)

venv: $(STAMP)

## run: the companion server and an agent on loopback, telemetry printed as it arrives
run: $(STAMP)
	$(BIN)/python -m agent.devrun

## test: the whole suite (real sockets, real processes, real SQLite files), two workers:
## most tests wait on real processes and timers, so two cores run two of them at once
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check agent tests bench
	$(BIN)/mypy agent
	@! grep -rn --include='*.py' 'shell=True' agent/ || \
		{ echo "shell=True is forbidden in agent/"; exit 1; }

bench: $(STAMP)
	$(BIN)/python bench/run.py

## faults: the whole fault suite, each fault tried many times, then a table of figures
faults: $(STAMP)
	NEXUS_FAULTS=full $(BIN)/python -m pytest -q -m 'not soak' tests/test_faults_*.py \
		tests/test_hardening.py

## ingest-outage: issue 24's end-to-end figure, 100,000 application samples sent to the
## ingest socket during a 10-minute outage (about 13 minutes; pytest -m soak
## tests/test_ingest_outage.py runs a 5,000-sample, 10 s version)
ingest-outage: $(STAMP)
	NEXUS_INGEST_SAMPLES=100000 NEXUS_INGEST_OUTAGE_S=600 $(BIN)/python -m pytest -q -s \
		-p no:xdist -m soak tests/test_ingest_outage.py

# ---------------------------------------------------------------- install
# `make install` lays the agent out the way a distribution package would, using
# only python3 and the system's python3-psutil, -websocket, -jwt and -yaml (no
# pip, no compiler). PREFIX and DESTDIR as usual; SYSCONFDIR for /etc.
PREFIX     ?= /usr/local
DESTDIR    ?=
SYSCONFDIR ?= /etc
LIBDIR     := $(PREFIX)/lib/nexus-agent
UNITDIR    := $(PREFIX)/lib/systemd/system
SHAREDIR   := $(PREFIX)/share/nexus-agent
DOCDIR     := $(PREFIX)/share/doc/nexus-agent
SYSTEM_PYTHON ?= /usr/bin/python3
SCRIPTS    := nexus-agent nexus-ctl
MAN1DIR    := $(PREFIX)/share/man/man1

install:
	install -d $(DESTDIR)$(LIBDIR) $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(SHAREDIR) $(DESTDIR)$(DOCDIR) $(DESTDIR)$(PREFIX)/lib/sysusers.d \
		$(DESTDIR)$(PREFIX)/lib/tmpfiles.d $(DESTDIR)$(SYSCONFDIR)/nexus $(DESTDIR)$(MAN1DIR)
	find agent -name '*.py' | while read f; do \
		install -D -m 0644 "$$f" "$(DESTDIR)$(LIBDIR)/$$f"; done
	# Bytecode now: the daemon's user cannot write __pycache__ here, and compiling every
	# module at each start costs about 1.7 MB of RSS for the whole run and start-up time.
	$(SYSTEM_PYTHON) -m compileall -q -d $(LIBDIR)/agent $(DESTDIR)$(LIBDIR)/agent
	for s in $(SCRIPTS); do \
		printf '#!%s -I\nimport sys\nsys.path.insert(0, "%s")\nfrom agent.%s import main\nsys.exit(main())\n' \
			"$(SYSTEM_PYTHON)" "$(LIBDIR)" "$$( [ $$s = nexus-agent ] && echo __main__ || echo ctl )" \
			> $(DESTDIR)$(PREFIX)/bin/$$s; \
		chmod 0755 $(DESTDIR)$(PREFIX)/bin/$$s; done
	sed 's|/usr/bin/nexus-agent|$(PREFIX)/bin/nexus-agent|; s|/etc/nexus/|$(SYSCONFDIR)/nexus/|' \
		systemd/nexus-agent.service > $(DESTDIR)$(UNITDIR)/nexus-agent.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/nexus-agent.service
	install -m 0644 systemd/nexus-agent.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/nexus-agent.conf
	install -m 0644 systemd/nexus-agent.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/nexus-agent.conf
	install -m 0640 config/agent.example.yaml $(DESTDIR)$(SYSCONFDIR)/nexus/agent.example.yaml
	# provision replaces a config that is still this example without --force
	install -m 0644 config/agent.example.yaml $(DESTDIR)$(SHAREDIR)/agent.example.yaml
	PYTHONPATH=. $(PYTHON) -m agent privileges --config config/agent.example.yaml \
		> $(DESTDIR)$(SHAREDIR)/50-nexus-agent.rules.example
	install -m 0644 docs/deploy.md docs/protocol.md docs/fleet-provision.sh $(DESTDIR)$(DOCDIR)/
	install -m 0644 $(addprefix man/,$(addsuffix .1,$(SCRIPTS))) $(DESTDIR)$(MAN1DIR)/
	@echo "installed under $(DESTDIR)$(PREFIX); next steps: docs/deploy.md"

uninstall:
	rm -rf $(DESTDIR)$(LIBDIR) $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(DOCDIR)
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/bin/,$(SCRIPTS)) \
		$(DESTDIR)$(UNITDIR)/nexus-agent.service \
		$(DESTDIR)$(PREFIX)/lib/sysusers.d/nexus-agent.conf \
		$(DESTDIR)$(PREFIX)/lib/tmpfiles.d/nexus-agent.conf \
		$(addprefix $(DESTDIR)$(MAN1DIR)/,$(addsuffix .1,$(SCRIPTS))) \
		$(DESTDIR)$(SYSCONFDIR)/nexus/agent.example.yaml

# ---------------------------------------------------------------- deb
# `make deb`: dist/nexus-agent_VERSION_all.deb from the `make install` layout (PREFIX=/usr),
# with dpkg-deb alone; the maintainer scripts and control file are in packaging/deb/.
DEB_VERSION ?= $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' agent/__init__.py)
DEB_ROOT    := build/deb/root

deb:
	rm -rf $(DEB_ROOT)
	$(MAKE) -s install DESTDIR=$(CURDIR)/$(DEB_ROOT) PREFIX=/usr SYSCONFDIR=/etc
	packaging/deb/build $(DEB_ROOT) $(DEB_VERSION) dist

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist
