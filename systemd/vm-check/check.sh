#!/usr/bin/env bash
# Runs INSIDE the VM (systemd as PID 1), started at boot by vm-check.service (see run.sh).
# Follows README.md "Install as a service" command by command, then checks the running service.
# Everything is written to /mnt/host/out (a 9p share with the host):
#   transcript.txt  every command with its output      results.txt  one PASS/FAIL line per check
#   issues.txt      README/unit problems found, with the workaround used
# Substitutions (the only ones): /path/to/hl7bridge = $SRC; the editor step = edit_config below;
# /path/to/medchat-token = /root/medchat-token (the sandbox's demo token); pip installs from the
# host-built wheelhouse (PIP_NO_INDEX/PIP_FIND_LINKS), as the VM cannot verify PyPI's TLS here.
# Commands given to step/wait_for are single-quoted on purpose: they expand when run.
# shellcheck disable=SC2016
set -uo pipefail

SHARE=/mnt/host
OUT=$SHARE/out
SRC=/usr/local/src/hl7bridge
BIN=/opt/hl7bridge/venv/bin
CFG=/etc/hl7bridge/hl7bridge.toml
# The sandbox runs in this directory and writes its /_sandbox/ control token under it at start.
SANDBOX_DIR=/root/journeys-sandbox
export CONTROL_FILE=$SANDBOX_DIR/var/sandbox-control.token
TOKEN=$(tr -d '[:space:]' <"$SHARE/repo/config/sandbox.token")
export PIP_NO_INDEX=1 PIP_FIND_LINKS=/root/wheelhouse PIP_DISABLE_PIP_VERSION_CHECK=1
export DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER='' SYSTEMD_COLORS=0 LC_ALL=C.UTF-8

mkdir -p "$OUT"
: >"$OUT/results.txt"
: >"$OUT/issues.txt"
exec > >(tee -a "$OUT/transcript.txt") 2>&1

section() { printf '\n==== %s ====\n' "$*"; }
# step 'shell command': print it, run it with bash, print its exit code; returns that code.
step() {
    printf '\n# $ %s\n' "$1"
    bash -c "$1"
    local rc=$?
    printf '# (exit %d)\n' "$rc"
    return "$rc"
}
result() { # result PASS|FAIL|INFO NAME DETAIL...
    local verdict=$1 name=$2
    shift 2
    printf '%-4s  %s: %s\n' "$verdict" "$name" "$*" | tee -a "$OUT/results.txt"
}
issue() { printf -- '- %s\n' "$*" | tee -a "$OUT/issues.txt"; }
svc() { systemctl show hl7bridge -p "$1" --value; }
wait_for() { # wait_for SECONDS 'condition'
    local deadline=$(($(date +%s) + $1))
    until bash -c "$2" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 1
    done
}
port_open() { python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2)" "$1"; }
export -f port_open # wait_for runs its condition with bash -c

section "VM"
uname -r
systemctl --version | head -1
printf 'PID 1: %s\n' "$(cat /proc/1/comm)"
ip -brief address

cp -a "$SHARE/repo" "$SRC"
cp -a "$SHARE/wheelhouse" /root/wheelhouse
cp "$SRC/config/sandbox.token" /root/medchat-token
cd "$SRC" || exit 1

# ------------------------------------------------------------------------------------------------
section "README: Install as a service"
step 'apt-get install -y python3 python3-venv sudo curl' || {
    issue "apt-get install failed (see transcript); retried after apt-get update"
    step 'apt-get update && apt-get install -y python3 python3-venv sudo curl'
}
step 'useradd --system --user-group --home /var/lib/hl7bridge --shell /usr/sbin/nologin hl7bridge'
step "python3 -m venv /opt/hl7bridge/venv && /opt/hl7bridge/venv/bin/pip install $SRC"
install_rc=$?
step "$BIN/hl7bridge --version"
# pip install succeeding is not enough: every module the service imports must be in the venv.
# (From /: with the checkout as the working directory, python -c would import the checkout.)
if step "cd / && $BIN/python -c 'import hl7bridge.app.cli, hl7bridge.app.service, hl7bridge.store'"; then
    result PASS install "pip install $SRC (exit $install_rc); all modules importable"
else
    result FAIL install "pip install $SRC installs a package that cannot import hl7bridge.store"
    issue "pyproject.toml lists packages = [\"hl7bridge\"] only, so a non-editable 'pip install /path/to/hl7bridge' leaves out the subpackage hl7bridge.store: 'hl7bridge serve' and 'hl7bridge log' die with ImportError/ModuleNotFoundError. Fix: [tool.setuptools.packages.find] include = [\"hl7bridge*\"]. Workaround here: that fix applied to the VM's copy, then pip install --force-reinstall --no-deps."
    python3 - "$SRC/pyproject.toml" <<'EOF'
import sys
p = sys.argv[1]
s = open(p).read()
s = s.replace('[tool.setuptools]\npackages = ["hl7bridge"]\n', '[tool.setuptools.packages.find]\ninclude = ["hl7bridge*"]\n')
open(p, "w").write(s)
EOF
    step "$BIN/pip install --force-reinstall --no-deps $SRC && cd / && $BIN/python -c 'import hl7bridge.store'"
fi
step 'install -d -m 0750 -o root -g hl7bridge /etc/hl7bridge'
step "install -m 0640 -o root -g hl7bridge $SRC/config/hl7bridge.example.toml /etc/hl7bridge/hl7bridge.toml"

# The editor step, scripted: database under StateDirectory, [api] base_url -> the sandbox (run
# below as a separate process), token_file = "", [health] listen on 127.0.0.1:9102, [sandbox] dropped.
printf '\n# $ editor %s   (scripted edit)\n' "$CFG"
python3 - "$CFG" <<'EOF'
import re, sys, tomllib
p = sys.argv[1]
s = open(p).read()
def sub(pattern, repl):
    global s
    s, n = re.subn(pattern, repl, s, count=1, flags=re.M)
    assert n == 1, pattern
sub(r'^database = ".*"$', 'database = "sqlite:////var/lib/hl7bridge/hl7bridge.db"')
sub(r'^base_url = ".*"$', 'base_url = "http://127.0.0.1:8080"')
sub(r'^token_file = ".*"$', 'token_file = ""')
sub(r'^(\[health\]\n(?:#.*\n)*)listen = ".*"$', r'\1listen = "tcp:9102:interface=127.0.0.1"')
s = s[: s.index("# ---- The sandbox")].rstrip() + "\n"   # drops [sandbox] and all its tables
open(p, "w").write(s)   # in place: mode and owner stay
c = tomllib.loads(s)
assert "sandbox" not in c and c["api"]["token_file"] == "" and c["health"]["listen"].startswith("tcp:9102")
print("edited:", c["service"]["database"], c["api"]["base_url"], c["api"]["org_id"],
      "token_credential=" + c["api"]["token_credential"], "health=" + c["health"]["listen"])
EOF
step "ls -l $CFG; diff -u config/hl7bridge.example.toml $CFG | head -40"

step 'install -m 0600 /root/medchat-token /etc/hl7bridge/medchat-token'
step 'ls -l /etc/hl7bridge/medchat-token'
CHECK_CONFIG="sudo -u hl7bridge $BIN/hl7bridge check-config --config $CFG"
if step "$CHECK_CONFIG"; then
    result PASS check-config "as user hl7bridge"
else
    if ! command -v sudo >/dev/null; then
        issue "'sudo' is not installed on a minimal Debian 12 (sudo: command not found, exit 127); the README uses sudo -u hl7bridge for check-config and the operator commands. Fix: apt-get install -y python3 python3-venv sudo curl (curl is used for /healthz too). Workaround here: apt-get install -y sudo."
        step 'apt-get install -y sudo'
    fi
    if step "$CHECK_CONFIG"; then
        result PASS check-config "as user hl7bridge (after the workaround above)"
    else
        result FAIL check-config "see transcript"
    fi
fi

# The Journeys sandbox: a separate process (transient unit), with the repository's example
# settings, which hold the [sandbox] tables and the demo token the bridge presents.
section "Journeys sandbox (separate process)"
step "mkdir -p $SANDBOX_DIR && systemd-run --unit=journeys-sandbox --working-directory=$SANDBOX_DIR $BIN/hl7bridge sandbox --config $SRC/config/hl7bridge.example.toml --listen tcp:8080:interface=127.0.0.1"
wait_for 180 'port_open 8080' || result FAIL sandbox "did not listen on 8080 within 180 s"

step "install -m 0644 $SRC/systemd/hl7bridge.service /etc/systemd/system/"
step 'systemctl daemon-reload && systemctl enable --now hl7bridge'
enable_rc=$?
step 'systemctl status hl7bridge --no-pager'

# ------------------------------------------------------------------------------------------------
section "1. status, Type=notify"
step 'systemctl show hl7bridge -p Type,WatchdogUSec,NRestarts,User,MainPID'
step 'systemctl show hl7bridge -p ActiveState,SubState,StatusText,Restart,RestartUSec'
step 'journalctl -u hl7bridge -b --no-pager -o short-monotonic'
if [ "$enable_rc" -eq 0 ] && [ "$(svc ActiveState)/$(svc SubState)" = active/running ] && [ "$(svc Type)" = notify ]; then
    result PASS "1 status" "active (running), Type=notify, READY reached; $(systemctl show hl7bridge -p Type,WatchdogUSec,NRestarts,User,MainPID | paste -sd' ')"
else
    result FAIL "1 status" "enable --now exit $enable_rc, state $(svc ActiveState)/$(svc SubState)"
fi

# ------------------------------------------------------------------------------------------------
section "2. demo fixtures"
send_out=$(step "$BIN/hl7bridge send --to 127.0.0.1:2575 $SRC/fixtures/demo")
send_rc=$?
printf '%s\n' "$send_out"
n_files=$(find "$SRC/fixtures/demo" -name '*.hl7' | wc -l)
n_aa=$(grep -c '^AA ' <<<"$send_out")
if ! command -v curl >/dev/null; then
    step 'curl -s -H "Authorization: Bearer $(cat $CONTROL_FILE)" http://127.0.0.1:8080/_sandbox/instances'
    issue "'curl' is not installed on a minimal Debian 12 (curl: command not found); the README's health check uses it. Fix: add curl to the apt-get install line. Workaround here: apt-get install -y curl."
    step 'apt-get install -y curl'
fi
wait_for 60 '[ "$(curl -s -H "Authorization: Bearer $(cat $CONTROL_FILE)" http://127.0.0.1:8080/_sandbox/instances | python3 -c "import json,sys; print(len(json.load(sys.stdin)))")" -ge 4 ]'
step 'curl -s -H "Authorization: Bearer $(cat $CONTROL_FILE)" http://127.0.0.1:8080/_sandbox/instances | python3 -c "import json,sys
for i in json.load(sys.stdin): print(i[\"chatBotId\"], i[\"parameters\"][\"appointmentId\"], i[\"parameters\"][\"appointmentDateTime\"], i[\"status\"])"'
instances=$(curl -s -H "Authorization: Bearer $(cat "$CONTROL_FILE")" http://127.0.0.1:8080/_sandbox/instances | python3 -c 'import json,sys; d=json.load(sys.stdin); print(len(d), sorted(i["parameters"]["appointmentId"] + ":" + i["status"] for i in d))')
step "sudo -u hl7bridge $BIN/hl7bridge log list --config $CFG --since 2h"
n_log=$(sudo -u hl7bridge "$BIN/hl7bridge" log list --config "$CFG" --since 2h 2>/dev/null | grep -c ' AA ')
if [ "$send_rc" -eq 0 ] && [ "$n_aa" -eq "$n_files" ] && [ "$n_log" -eq "$n_files" ] && [ "${instances%% *}" -ge 4 ]; then
    result PASS "2 fixtures" "$n_aa/$n_files AA; sandbox instances: $instances; log list: $n_log rows AA"
else
    result FAIL "2 fixtures" "send exit $send_rc, $n_aa/$n_files AA; instances: $instances; log list: $n_log AA rows"
fi

# ------------------------------------------------------------------------------------------------
section "3. health and metrics"
step 'curl -s http://127.0.0.1:9102/healthz; echo'
code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9102/healthz)
step 'curl -s http://127.0.0.1:9102/metrics | grep "^hl7bridge_" | head -40'
n_metrics=$(curl -s http://127.0.0.1:9102/metrics | grep -c '^hl7bridge_')
if [ "$code" = 200 ] && [ "$n_metrics" -gt 0 ]; then
    result PASS "3 health" "/healthz $code $(curl -s http://127.0.0.1:9102/healthz | head -c 160); /metrics: $n_metrics hl7bridge_ samples"
else
    result FAIL "3 health" "/healthz $code; /metrics: $n_metrics hl7bridge_ samples"
fi

# ------------------------------------------------------------------------------------------------
section "5. reload (SIGHUP) with an open MLLP connection"
# Connection helper: sends one message, waits for /tmp/after-reload, sends another on the same socket.
cat >/root/hold.py <<'EOF'
import os, socket, sys, time
def frame(path):
    return b"\x0b" + open(path, "rb").read().rstrip(b"\r\n") + b"\r\x1c\r"
def ack(sock):
    buf = b""
    while not buf.endswith(b"\x1c\r"):
        chunk = sock.recv(65536)
        if not chunk:
            return "connection closed"
        buf += chunk
    msa = [seg for seg in buf.strip(b"\x0b\x1c\r").split(b"\r") if seg.startswith(b"MSA")]
    return msa[0].decode() if msa else repr(buf[:80])
s = socket.create_connection(("127.0.0.1", 2575), 10)
s.settimeout(30)
s.sendall(frame(sys.argv[1]))
print("before reload:", ack(s), flush=True)
while not os.path.exists("/tmp/after-reload"):
    time.sleep(0.2)
s.sendall(frame(sys.argv[2]))
print("after reload, same connection:", ack(s), flush=True)
EOF
rm -f /tmp/after-reload /tmp/hold.out
python3 /root/hold.py "$SRC/fixtures/demo/01_s12_book_A.hl7" "$SRC/fixtures/demo/02_s12_book_B.hl7" >/tmp/hold.out 2>&1 &
hold=$!
wait_for 30 'grep -q "before reload" /tmp/hold.out'
pid_before=$(svc MainPID)
since=$(date '+%Y-%m-%d %H:%M:%S')
step 'systemctl reload hl7bridge'
reload_rc=$?
sleep 3
touch /tmp/after-reload
wait "$hold"
step 'cat /tmp/hold.out'
step "journalctl -u hl7bridge --no-pager --since '$since'"
step 'systemctl status hl7bridge --no-pager | head -12'
reload_line=$(journalctl -u hl7bridge --no-pager --since "$since" -o cat | grep -m1 'configuration reloaded')
if [ "$reload_rc" -eq 0 ] && [ -n "$reload_line" ] && [ "$(svc ActiveState)" = active ] &&
    [ "$(svc MainPID)" = "$pid_before" ] && grep -q 'after reload, same connection: MSA|AA' /tmp/hold.out; then
    result PASS "5 reload" "'$reload_line'; same MainPID $pid_before, active; open connection answered AA after reload"
else
    result FAIL "5 reload" "rc=$reload_rc line='$reload_line' state=$(svc ActiveState) pid $pid_before->$(svc MainPID); $(tr '\n' ' ' </tmp/hold.out)"
fi

# ------------------------------------------------------------------------------------------------
section "4a. watchdog: SIGSTOP"
pid=$(svc MainPID)
nr=$(svc NRestarts)
since=$(date '+%Y-%m-%d %H:%M:%S')
step "kill -STOP $pid"
t0=$(date +%s)
wait_for 180 "[ \"\$(systemctl show hl7bridge -p MainPID --value)\" != $pid ] && [ \"\$(systemctl show hl7bridge -p MainPID --value)\" != 0 ] && systemctl is-active -q hl7bridge"
took=$(($(date +%s) - t0))
step "journalctl -u hl7bridge --no-pager --since '$since' | grep -v -E '^ +File |^  File ' | head -60"
step 'systemctl show hl7bridge -p NRestarts,MainPID,ActiveState,SubState,Result'
wd_line=$(journalctl -u hl7bridge --no-pager --since "$since" | grep -m1 'Watchdog timeout')
if [ -n "$wd_line" ] && [ "$(svc NRestarts)" -eq $((nr + 1)) ] && [ "$(svc ActiveState)" = active ]; then
    result PASS "4a watchdog" "restarted ${took}s after SIGSTOP; '${wd_line#*]: }'; NRestarts $nr->$(svc NRestarts); MainPID $pid->$(svc MainPID)"
else
    result FAIL "4a watchdog" "after ${took}s: watchdog line '$wd_line', NRestarts $nr->$(svc NRestarts), $(svc ActiveState)"
fi

section "4b. kill -9"
pid=$(svc MainPID)
nr=$(svc NRestarts)
since=$(date '+%Y-%m-%d %H:%M:%S')
step "kill -9 $pid"
t0=$(date +%s)
wait_for 90 "[ \"\$(systemctl show hl7bridge -p MainPID --value)\" != $pid ] && [ \"\$(systemctl show hl7bridge -p MainPID --value)\" != 0 ] && systemctl is-active -q hl7bridge"
took=$(($(date +%s) - t0))
step "journalctl -u hl7bridge --no-pager --since '$since'"
if [ "$(svc NRestarts)" -eq $((nr + 1)) ] && [ "$(svc ActiveState)" = active ]; then
    result PASS "4b kill -9" "restarted after ${took}s; NRestarts $nr->$(svc NRestarts); MainPID $pid->$(svc MainPID)"
else
    result FAIL "4b kill -9" "after ${took}s: NRestarts $nr->$(svc NRestarts), $(svc ActiveState)"
fi
step "$BIN/hl7bridge send --to 127.0.0.1:2575 $SRC/fixtures/demo/06_s12_resend_C.hl7"

# ------------------------------------------------------------------------------------------------
section "6. journal: no patient names, no token"
# Patient names (PID-5 family and given) of the demo fixtures.
mapfile -t names < <(cat "$SRC"/fixtures/demo/*.hl7 | tr '\r' '\n' | awk -F'|' '$1 == "PID" { print $6 }' |
    tr '^' '\n' | grep -E '^[A-Za-z]{2,}$' | sort -u)
printf 'patient names searched: %s\n' "${names[*]}"
journalctl -u hl7bridge -b --no-pager -o json >/tmp/journal.json
journalctl -u hl7bridge -b --no-pager >/tmp/journal.txt
step 'wc -l /tmp/journal.txt'
hits=0
for n in "${names[@]}" "$TOKEN"; do
    c=$(grep -c -i -w -F -- "$n" /tmp/journal.json)
    printf '%-20s %s matching entries\n' "$n" "$c"
    hits=$((hits + c))
done
if [ "${#names[@]}" -gt 0 ] && [ "$hits" -eq 0 ]; then
    result PASS "6 journal" "$(wc -l </tmp/journal.txt) lines; none of ${names[*]} nor the token"
else
    result FAIL "6 journal" "$hits entries with a patient name or the token (searched ${names[*]})"
fi

# ------------------------------------------------------------------------------------------------
section "8. systemd-analyze security (online)"
step 'systemd-analyze security hl7bridge --no-pager'
score=$(systemd-analyze security hl7bridge --no-pager | grep 'Overall exposure')
result INFO "8 security" "${score:-no score}"

section "9. database file"
step 'ls -la /var/lib/hl7bridge/; stat -c "%A %a %U:%G %n" /var/lib/hl7bridge /var/lib/hl7bridge/*'
db=/var/lib/hl7bridge/hl7bridge.db
if [ "$(stat -c '%a %U:%G' "$db")" = "600 hl7bridge:hl7bridge" ] && [ "$(stat -c '%a %U' /var/lib/hl7bridge)" = "700 hl7bridge" ]; then
    result PASS "9 database" "$(stat -c '%a %U:%G %n' /var/lib/hl7bridge "$db"* | paste -sd';')"
else
    result FAIL "9 database" "$(stat -c '%a %U:%G %n' /var/lib/hl7bridge "$db"* | paste -sd';')"
fi

# ------------------------------------------------------------------------------------------------
section "7. stop"
since=$(date '+%Y-%m-%d %H:%M:%S')
step 'systemctl stop hl7bridge'
stop_rc=$?
step "journalctl -u hl7bridge --no-pager --since '$since'"
step 'systemctl show hl7bridge -p ActiveState,Result,ExecMainCode,ExecMainStatus'
step 'systemctl status hl7bridge --no-pager | head -8'
if [ "$stop_rc" -eq 0 ] && [ "$(svc Result)" = success ] && [ "$(svc ExecMainStatus)" = 0 ] && [ "$(svc ActiveState)" = inactive ]; then
    result PASS "7 stop" "Result=success ExecMainStatus=0; status line '$(svc StatusText)'; $(journalctl -u hl7bridge --no-pager --since "$since" -o cat | paste -sd'|')"
else
    result FAIL "7 stop" "rc=$stop_rc Result=$(svc Result) ExecMainStatus=$(svc ExecMainStatus) $(svc ActiveState)"
fi

# ------------------------------------------------------------------------------------------------
section "S. socket activation (docs/install.md)"
step 'install -m 0644 systemd/hl7bridge.socket /etc/systemd/system/'
step 'install -d /etc/systemd/system/hl7bridge.service.d'
step 'install -m 0644 systemd/hl7bridge-socket-activation.conf /etc/systemd/system/hl7bridge.service.d/socket-activation.conf'
step 'systemctl daemon-reload'
step 'systemctl enable --now hl7bridge.socket'
step 'systemctl enable hl7bridge.service && systemctl restart hl7bridge.service'
sa_rc=$?
step 'systemctl status hl7bridge.socket hl7bridge.service --no-pager'
sa_send=$(step "$BIN/hl7bridge send --to 127.0.0.1:2575 $SRC/fixtures/demo")
printf '%s\n' "$sa_send"
sa_aa=$(grep -c '^AA ' <<<"$sa_send")
listen_line=$(journalctl -u hl7bridge --no-pager -o cat -n 30 | grep -m1 'listener main listening')
step 'systemctl stop hl7bridge.service; systemctl is-active hl7bridge.socket hl7bridge.service'
step "$BIN/hl7bridge send --to 127.0.0.1:2575 $SRC/fixtures/demo/01_s12_book_A.hl7"
activated=$(systemctl is-active hl7bridge.service)
step 'systemctl status hl7bridge.service --no-pager | head -12'
step 'systemd-analyze security hl7bridge --no-pager | tail -1'
sa_score=$(systemd-analyze security hl7bridge --no-pager | grep 'Overall exposure')
if [ "$sa_rc" -eq 0 ] && [ "$sa_aa" -eq "$n_files" ] && [ "$activated" = active ]; then
    result PASS "S socket" "$sa_aa/$n_files AA over the passed socket ('$listen_line'); service started again by a connection after stop; $sa_score"
else
    result FAIL "S socket" "restart rc=$sa_rc, $sa_aa/$n_files AA, after stop+connect: $activated ('$listen_line')"
fi
step 'systemctl stop hl7bridge.socket hl7bridge.service'

section "done"
step 'journalctl -b --no-pager -p warning | grep -v -i -E "vm-check|kernel" | tail -30'
cat "$OUT/results.txt"
touch "$OUT/done"
