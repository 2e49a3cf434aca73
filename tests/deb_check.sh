#!/bin/sh
# The Debian package end to end, on this machine (root, as CI is; .ci/run calls it):
# build it, lintian (no errors), install it with apt-get, check the config, provision
# the device against a companion server (the repo's .venv), run the installed agent as
# its own user, run a command, upgrade over itself and to a newer version (the edited
# conffile, the token and the queue stay), remove (config and queue stay), purge
# (nothing of it is left but the nexus-agent user, which Debian keeps).
# systemd need not be PID 1: the agent is run directly, as the unit would run it.
#   tests/deb_check.sh        (refuses to run where nexus-agent is already installed)
set -eu
cd "$(dirname "$0")/.."
repo=$(pwd)
PY=$repo/.venv/bin/python
DEVICE=deb-check-01
export DEBIAN_FRONTEND=noninteractive

say() { printf 'deb_check: %s\n' "$*"; }
fail() { say "FAILED: $*"; exit 1; }
# wait_for SECONDS COMMAND...: run COMMAND until it succeeds, at most SECONDS
wait_for() {
	limit=$(( $(date +%s) + $1 )); shift
	until "$@" >/dev/null 2>&1; do
		[ "$(date +%s)" -lt "$limit" ] || return 1
		sleep 0.2
	done
}
as_agent() { setpriv --reuid=nexus-agent --regid=nexus-agent --init-groups -- "$@"; }

[ "$(id -u)" = 0 ] || fail "needs root (it installs and purges a package)"
[ -x "$PY" ] || fail "no $PY (run make venv first): the companion server comes from it"
if dpkg -s nexus-agent >/dev/null 2>&1; then
	fail "nexus-agent is already installed here; not touching it"
fi
work=$(mktemp -d)
server_pid=""
agent_pid=""
cleanup() {
	[ -z "$agent_pid" ] || kill "$agent_pid" 2>/dev/null || true
	[ -z "$server_pid" ] || kill "$server_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

# ------------------------------------------------------------------ build
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' agent/__init__.py)
# PYTHON: the .venv's (it has PyYAML) for make install's polkit example; a fresh CI
# machine's python3 may not have python3-yaml yet.
deb=$(make -s deb PYTHON="$PY" | tail -1)
[ -f "$deb" ] || fail "make deb made no $deb"
case "$deb" in *"nexus-agent_${version}_all.deb") ;; *) fail "unexpected name $deb" ;; esac
lintian --fail-on error "$deb" || fail "lintian reports errors"
say "built $deb; lintian: no errors"

# ------------------------------------------------------------------ install
# The dependencies come from the mirrors: refresh stale package lists once if needed.
apt-get install -y -qq "./$deb" >"$work/apt.log" 2>&1 ||
	{ apt-get update -qq && apt-get install -y -qq "./$deb" >"$work/apt.log" 2>&1; } ||
	{ cat "$work/apt.log"; fail "apt-get install"; }
id nexus-agent >/dev/null || fail "no nexus-agent user after install"
[ "$(stat -c '%a %U %G' /etc/nexus)" = "750 root nexus-agent" ] ||
	fail "/etc/nexus is $(stat -c '%a %U %G' /etc/nexus)"
[ "$(stat -c '%U' /var/lib/nexus-agent)" = nexus-agent ] || fail "state dir owner"
[ -L /etc/systemd/system/multi-user.target.wants/nexus-agent.service ] || fail "unit not enabled"
grep -qx /etc/nexus/agent.yaml /var/lib/dpkg/info/nexus-agent.conffiles || fail "conffile"
if as_agent nexus-agent --check-config >"$work/check.out" 2>&1; then
	fail "--check-config passed without a token"
fi
grep -q "token file /etc/nexus/token" "$work/check.out" || fail "$(cat "$work/check.out")"
say "installed: user, /etc/nexus, state dir, unit enabled; --check-config wants a token"

# ------------------------------------------------------------------ a companion server
NEXUS_JWT_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export NEXUS_JWT_SECRET
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="ws://127.0.0.1:$port/v1/ws"
# --renew-at 0.01 of a 600 s token: the server renews it about 6 s after it was minted, so
# the installed agent shows where a renewal goes under the package's permissions (state
# dir; /etc/nexus is root's).
"$PY" -m agent.server --port "$port" --db "$work/server.db" --renew-at 0.01 \
	>"$work/server.log" 2>&1 &
server_pid=$!
wait_for 30 grep -q "listening on" "$work/server.log" || { cat "$work/server.log"; fail "server"; }
(umask 077 && "$PY" -m agent.server token --device "$DEVICE" --ttl 600 >"$work/device.token")
cat >"$work/commands.yaml" <<'YAML'
allow:
  hello:
    argv: [/bin/echo, hello from the package]
    timeout_s: 5
YAML

# ------------------------------------------------------------------ provision, run
nexus-agent provision --device-id "$DEVICE" --server "$url" --token-file "$work/device.token" \
	--commands "$work/commands.yaml" || fail "provision"
[ "$(stat -c '%a %U' /etc/nexus/token)" = "600 nexus-agent" ] || fail "token file owner/mode"
[ "$(stat -c '%a %U %G' /etc/nexus/agent.yaml)" = "640 root nexus-agent" ] || fail "config mode"
as_agent nexus-agent --check-config || fail "--check-config after provision"
# setpriv itself, not the function: `func &` would fork a subshell and $! would be its pid
setpriv --reuid=nexus-agent --regid=nexus-agent --init-groups -- \
	nexus-agent --config /etc/nexus/agent.yaml >"$work/agent.log" 2>&1 &
agent_pid=$!
operator=$("$PY" -m agent.server token --operator deb-check)
NEXUS_TOKEN=$operator timeout 60 nexus-ctl --url "$url" watch --device "$DEVICE" --count 1 \
	>"$work/watch.out" || { cat "$work/agent.log"; fail "no telemetry from the installed agent"; }
grep -q "$DEVICE" "$work/watch.out" || fail "watch printed $(cat "$work/watch.out")"
NEXUS_TOKEN=$operator timeout 60 nexus-ctl --url "$url" command "$DEVICE" hello \
	>"$work/command.out" || fail "command: $(cat "$work/command.out")"
grep -qx "hello from the package" "$work/command.out" || fail "command printed $(cat "$work/command.out")"
wait_for 30 nexus-agent status || { nexus-agent status || true; fail "status not healthy"; }
wait_for 30 test -s /var/lib/nexus-agent/renewed-token || { cat "$work/agent.log"; fail "no renewal kept"; }
[ "$(stat -c '%a %U' /var/lib/nexus-agent/renewed-token)" = "600 nexus-agent" ] ||
	fail "renewed token owner/mode"
cmp -s /etc/nexus/token "$work/device.token" || fail "the provisioned token was rewritten"
kill -TERM "$agent_pid"
code=0
wait "$agent_pid" || code=$?
agent_pid=""
[ "$code" = 0 ] || { cat "$work/agent.log"; fail "the agent exited $code on SIGTERM"; }
[ "$(stat -c '%U' /var/lib/nexus-agent/outbox.db)" = nexus-agent ] || fail "queue owner"
say "provisioned, ran as nexus-agent: telemetry arrived, a command ran, a renewed token kept in the state dir, stopped cleanly"

# ------------------------------------------------------------------ upgrade
sums() { sha256sum /etc/nexus/agent.yaml /etc/nexus/token; }
before=$(sums)
apt-get install -y -qq --reinstall "./$deb" >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "reinstall"; }
newer=$(make -s deb PYTHON="$PY" DEB_VERSION="$version+check1" | tail -1)
apt-get install -y -qq "./$newer" >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "upgrade"; }
[ "$(dpkg-query -W -f '${Version}' nexus-agent)" = "$version+check1" ] || fail "version"
[ "$(sums)" = "$before" ] || fail "the upgrade changed the config or the token"
[ -f /var/lib/nexus-agent/outbox.db ] || fail "the upgrade lost the queue"
as_agent nexus-agent --check-config || fail "--check-config after the upgrade"
say "reinstalled and upgraded: config, token and queue kept"
rm -f "$newer"

# ------------------------------------------------------------------ remove, purge
apt-get remove -y -qq nexus-agent >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "remove"; }
[ ! -e /usr/lib/nexus-agent ] && [ ! -e /usr/bin/nexus-agent ] || fail "remove left the program"
[ -f /etc/nexus/agent.yaml ] && [ -f /var/lib/nexus-agent/outbox.db ] || fail "remove took the state"
apt-get purge -y -qq nexus-agent >"$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "purge"; }
left=$(find /etc /usr /var /run \( -path "$repo" -o -path "$work" -o -path /var/cache/apt \) -prune \
	-o -name '*nexus*' -print 2>/dev/null || true)
[ -z "$left" ] || fail "purge left: $left"
id nexus-agent >/dev/null || fail "the user went (Debian keeps system users)"
say "removed (config and queue kept), purged (nothing left but the nexus-agent user)"
say "ok"
