#!/bin/sh
# The package test inside the Debian guest (xtask/src/debtest.rs), run as
# root by a oneshot unit from the payload disk (/mnt/payload). Every check
# prints one `DEBTEST ok|fail NAME: detail` line on the console; `DEBTEST
# info` lines are figures for the note; `DEBTEST done` is the end.
set -u
P=/mnt/payload
M=127.0.0.1:19868
ok() { echo "DEBTEST ok $*"; }
fail() { echo "DEBTEST fail $*"; }
info() { echo "DEBTEST info $*"; }
check() { name=$1; shift; if "$@" >/dev/null 2>&1; then ok "$name"; else fail "$name"; fi; }
# wait_for SECS CMD...: CMD every half second until it succeeds, SECS at most.
wait_for() {
    n=$(($1 * 2)); shift
    while [ "$n" -gt 0 ]; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5; n=$((n - 1))
    done
    return 1
}
ready() { systemctl is-active -q timewaitd && curl -sf --max-time 5 "http://$M/readyz"; }
# Sum of the samples of metric $1 whose labels contain every further argument.
metric() {
    name=$1; shift
    curl -s --max-time 5 "http://$M/metrics" | awk -v n="$name" -v want="$*" '
        index($0, n "{") == 1 || index($0, n " ") == 1 {
            split(want, w, " "); keep = 1
            for (i in w) if (index($0, w[i]) == 0) keep = 0
            if (keep) s += $NF
        }
        END { print s + 0 }'
}
# TIME_WAIT toward the daemon's port, as ss shows them.
ss_tw() { ss -Htan state time-wait dst "$M" | wc -l; }
TW_LABELS='direction="outbound" remote="127.0.0.1" port="19868"'

info "kernel $(uname -r); $(systemctl --version | head -1)"

# --- install -------------------------------------------------------------
deb=$(ls "$P"/timewaitd_*.deb)
if DEBIAN_FRONTEND=noninteractive apt-get install -y "$deb" > /tmp/apt.log 2>&1; then
    ok "apt install ./$(basename "$deb")"
else
    fail "apt install: $(tail -3 /tmp/apt.log | tr '\n' ' ')"
fi
info "$(timewaitd --version)"
check "enabled on install" systemctl is-enabled -q timewaitd
if wait_for 180 ready; then ok "active and ready after install"; else fail "not ready: $(systemctl status timewaitd --no-pager | tail -5 | tr '\n' ' ')"; fi
check "man page" sh -c 'test -s /usr/share/man/man8/timewaitd.8.gz || test -s /usr/share/man/man8/timewaitd.8'
check "bash completion" test -s /usr/share/bash-completion/completions/timewaitd
check "config is a conffile" sh -c 'dpkg-query -W -f="\${Conffiles}" timewaitd | grep -q /etc/timewait/timewaitd.toml'
check "license and README" sh -c 'test -s /usr/share/doc/timewaitd/LICENSE-MIT && test -s /usr/share/doc/timewaitd/README.md'

# --- identity and capabilities, from /proc ---------------------------------
pid=$(systemctl show -p MainPID --value timewaitd)
st=/proc/$pid/status
uid=$(awk '/^Uid:/ {print $2}' "$st")
info "process $pid user $(ps -o user= -p "$pid") uid $uid; $(grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' "$st" | tr '\t\n' '  ')"
# CAP_DAC_READ_SEARCH (2), CAP_SYSLOG (34), CAP_PERFMON (38), CAP_BPF (39).
want=000000c400000004
if [ "$uid" != 0 ]; then ok "not root (uid $uid)"; else fail "runs as root"; fi
for c in CapEff CapPrm CapBnd; do
    got=$(awk -v k="$c:" '$1 == k {print $2}' "$st")
    if [ "$got" = "$want" ]; then ok "$c = the unit's four capabilities"; else fail "$c $got, want $want"; fi
done
info "probe paths: $(curl -s "http://$M/metrics" | grep '^timewait_probe_path{' | grep ' 1$' | tr '\n' ' ')"
lc=$(metric timewait_probe_path 'signal="lifecycle"' 'path="fentry"')
if [ "$lc" = 1 ]; then ok "lifecycle on fentry inside the sandbox"; else fail "lifecycle not on fentry inside the sandbox"; fi

# --- TIME_WAIT made here, against ss ----------------------------------------
# curl closes first, so each request leaves one TIME_WAIT on its side.
i=0; while [ $i -lt 40 ]; do curl -s -o /dev/null "http://$M/readyz"; i=$((i + 1)); done
n=0; got=x; want=y
while [ $n -lt 20 ]; do
    want=$(ss_tw)
    got=$(metric timewait_sockets $TW_LABELS)
    [ "$got" = "$want" ] && break
    sleep 0.5; n=$((n + 1))
done
if [ "$got" = "$want" ] && [ "$want" -ge 40 ]; then
    ok "timewait_sockets{$TW_LABELS} = $got = ss"
else
    fail "timewait_sockets $got, ss $want"
fi

# --- reload ----------------------------------------------------------------
sed -i 's/^#top-remotes = 100$/top-remotes = 7/' /etc/timewait/timewaitd.toml
systemctl reload timewaitd
if wait_for 30 sh -c 'journalctl -u timewaitd -o cat | grep "SIGHUP: configuration reloaded" | grep -q "top_remotes=7"'; then
    ok "systemctl reload re-read the config (top_remotes=7)"
else
    fail "no reload in the journal: $(journalctl -u timewaitd -o cat | tail -3 | tr '\n' ' ')"
fi
check "active after reload" ready

# --- the journal -------------------------------------------------------------
journalctl -u timewaitd -o cat > /tmp/journal.txt
esc=$(printf '\033')
if grep -q "$esc" /tmp/journal.txt; then fail "colour codes in the journal"; else ok "journal is plain text"; fi
check "journal lines carry their level" grep -q ' INFO timewaitd' /tmp/journal.txt
# Inside its sandbox nothing failed to attach or load (Debian's kernels
# refuse perf_event_open, which classic tracepoints and kprobes attach
# through, to all but CAP_SYS_ADMIN at perf_event_paranoid 3: the fentry
# path must not need it).
if grep -qE ' (WARN|ERROR) ' /tmp/journal.txt; then
    fail "warnings in the journal: $(grep -E ' (WARN|ERROR) ' /tmp/journal.txt | head -2 | tr '\n' '|')"
else
    ok "no warning or error in the journal"
fi
info "journal: $(head -3 /tmp/journal.txt | tr '\n' '|')"
info "$(systemd-analyze security timewaitd.service --no-pager 2>/dev/null | grep -i 'overall exposure')"

# --- stop leaves nothing in the kernel -----------------------------------------
ours='name (fentry_|fexit_|kprobe_|kretprobe_|tw_|iter_)'
before=$(bpftool prog show | grep -cE "$ours")
systemctl stop timewaitd
after=$(bpftool prog show | grep -cE "$ours")
links=$(bpftool link show | grep -cE '^[0-9]+: (tracing|perf_event|iter|raw_tracepoint|kprobe)')
if [ "$before" -gt 0 ] && [ "$after" = 0 ] && [ "$links" = 0 ]; then
    ok "stop: $before programs before, none and no tracing link after"
else
    fail "stop: programs before $before, after $after, tracing links $links"
fi
check "inactive after stop" sh -c '! systemctl is-active -q timewaitd'

# --- --all-netns under the unit: refused at start with one line --------------
# The unit gives no CAP_SYS_ADMIN and RestrictNamespaces=yes: the daemon cannot
# enter other namespaces, so it must refuse (exit 2, not restarted) rather
# than show and then wipe their counts (issue 25).
mkdir -p /etc/systemd/system/timewaitd.service.d
printf '[Service]\nExecStart=\nExecStart=/usr/bin/timewaitd run --config /etc/timewait/timewaitd.toml --all-netns\n' \
    > /etc/systemd/system/timewaitd.service.d/all-netns.conf
systemctl daemon-reload
systemctl start timewaitd
if wait_for 30 sh -c 'systemctl show -p ExecMainStatus --value timewaitd | grep -qx 2'; then
    ok "--all-netns under the unit: exit 2"
else
    fail "--all-netns under the unit: $(systemctl status timewaitd --no-pager | tail -3 | tr '\n' ' ')"
fi
check "--all-netns under the unit: one line says why" sh -c \
    'journalctl -u timewaitd -o cat | grep -q -- "--all-netns: cannot enter network namespaces"'
check "--all-netns under the unit: not restarted" sh -c '! systemctl is-active -q timewaitd'
# With the drop-in README "Every namespace" gives, it works: it enters a
# namespace made before it started (start-up snapshot) without a warning.
ip netns add twtest
cat >> /etc/systemd/system/timewaitd.service.d/all-netns.conf <<'DROPIN'
CapabilityBoundingSet=CAP_BPF CAP_PERFMON CAP_SYSLOG CAP_DAC_READ_SEARCH CAP_SYS_ADMIN CAP_SYS_PTRACE
AmbientCapabilities=CAP_BPF CAP_PERFMON CAP_SYSLOG CAP_DAC_READ_SEARCH CAP_SYS_ADMIN CAP_SYS_PTRACE
RestrictNamespaces=net
ProtectProc=default
SystemCallFilter=setns
DROPIN
systemctl daemon-reload
systemctl reset-failed timewaitd 2>/dev/null || true
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl start timewaitd
if wait_for 180 ready; then ok "--all-netns with the README's drop-in: active and ready"; else
    fail "--all-netns with the drop-in: $(journalctl -u timewaitd -o cat --since "$since" | tail -3 | tr '\n' ' ')"; fi
if journalctl -u timewaitd -o cat --since "$since" | grep -qE ' (WARN|ERROR) '; then
    fail "--all-netns with the drop-in: $(journalctl -u timewaitd -o cat --since "$since" | grep -E ' (WARN|ERROR) ' | head -2 | tr '\n' '|')"
else
    ok "--all-netns with the drop-in: every namespace entered, no warning"
fi
systemctl stop timewaitd
ip netns del twtest
rm -r /etc/systemd/system/timewaitd.service.d
systemctl daemon-reload
systemctl reset-failed timewaitd 2>/dev/null || true

# --- purge -------------------------------------------------------------------
if DEBIAN_FRONTEND=noninteractive apt-get purge -y timewaitd > /tmp/purge.log 2>&1; then ok "apt purge"; else fail "apt purge: $(tail -3 /tmp/purge.log | tr '\n' ' ')"; fi
check "purge removed the binary" sh -c '! test -e /usr/bin/timewaitd'
check "purge removed the config" sh -c '! test -e /etc/timewait/timewaitd.toml'
check "purge removed the unit" sh -c '! systemctl cat timewaitd.service'
check "purge: not installed" sh -c '! dpkg-query -W -f="\${Status}" timewaitd 2>/dev/null | grep -q "ok installed"'

echo "DEBTEST done"
systemctl poweroff
