#!/bin/sh
# Provision a list of devices, one per line: "HOST DEVICE_ID". For each, copy a
# freshly minted token and run `nexus-agent provision` there over ssh.
# The exit code of each device is reported; the script's own is non-zero if any failed.
#
#   NEXUS_SERVER=wss://nexus.example.com/v1/ws ./fleet-provision.sh devices.txt
#
# Tokens come from MINT (default: nexus-server token --device ID); replace it with
# your platform's token service. Exit codes of provision: 0 ok, 2 bad input,
# 3 existing config differs (add FORCE=--force), 4 server unreachable,
# 5 token refused, 6 file system error.
set -u
list=${1:?usage: fleet-provision.sh DEVICES_FILE}
server=${NEXUS_SERVER:?set NEXUS_SERVER to the wss:// URL of /v1/ws}
mint=${MINT:-nexus-server token --ttl 31536000 --device}
force=${FORCE:-}
failed=0
while read -r host device; do
    case "$host" in ''|'#'*) continue ;; esac
    token=$($mint "$device") || { echo "$device: cannot mint a token"; failed=1; continue; }
    # The token travels on stdin, never on a command line (ps would show it).
    printf '%s\n' "$token" | ssh -o BatchMode=yes "$host" \
        "umask 077 && t=\$(mktemp) && cat > \$t && sudo nexus-agent provision \
         --device-id '$device' --server '$server' --token-file \$t $force; \
         rc=\$?; rm -f \$t; [ \$rc -eq 0 ] && sudo systemctl enable --now nexus-agent; exit \$rc"
    rc=$?
    echo "$device ($host): exit $rc"
    [ $rc -eq 0 ] || failed=1
done < "$list"
exit $failed
