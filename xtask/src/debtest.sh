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
# The NAT side needs CAP_NET_ADMIN, which only its drop-in gives: shipped as
# an example, not active, and without it --nat auto says unavailable.
check "NAT drop-in shipped as an example" test -s /usr/share/doc/timewaitd/examples/nat.conf
check "NAT drop-in not active" sh -c '! test -e /etc/systemd/system/timewaitd.service.d/nat.conf'
na=$(metric timewait_probe_path 'signal="nat_ports"' 'path="unavailable"')
if [ "$na" = 1 ]; then ok "NAT side unavailable under the shipped unit"; else
    fail "NAT side under the shipped unit: $(curl -s "http://$M/metrics" | grep 'signal="nat_ports"' | tr '\n' ' ')"; fi

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

# --- the NAT side, with the nat drop-in ----------------------------------------
# The VM's own namespace routes between a client namespace and a server
# namespace and masquerades UDP toward the server onto 8 ports
# (iptables-nft, Debian's default): ten flows, eight get a port, two are
# dropped. Nothing leaves the VM. The service must show what `conntrack -L`
# shows, with the range read from the ruleset.
ip netns add twc
ip netns add tws
ip link add tw-c type veth peer name eth0 netns twc
ip link add tw-s type veth peer name eth0 netns tws
ip addr add 10.99.1.1/24 dev tw-c
ip addr add 10.99.3.1/24 dev tw-s
ip link set tw-c up
ip link set tw-s up
ip -n twc addr add 10.99.1.2/24 dev eth0
ip -n tws addr add 10.99.3.2/24 dev eth0
for ns in twc tws; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
ip -n twc route add default via 10.99.1.1
sysctl -qw net.ipv4.ip_forward=1
if iptables -t nat -A POSTROUTING -o tw-s -p udp -j MASQUERADE --to-ports 40000-40007 2>/tmp/ipt.log; then
    ok "NAT: iptables MASQUERADE --to-ports 40000-40007 ($(iptables --version))"
else
    fail "NAT: iptables: $(tr '\n' ' ' < /tmp/ipt.log)"
fi
# Unanswered UDP entries live 30 s; long enough for the checks below.
sysctl -qw net.netfilter.nf_conntrack_udp_timeout=600
# Ten flows: each redirection is a new socket, so a new source port.
ip netns exec twc bash -c 'for i in 1 2 3 4 5 6 7 8 9 10; do echo x > /dev/udp/10.99.3.2/5000; done' 2>/dev/null
ct_nat() { conntrack -L -p udp 2>/dev/null | grep -c 'dst=10.99.3.1 '; }
ct_stat() { conntrack -S 2>/dev/null | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { s += $2 } END { print s + 0 }'; }
want=$(ct_nat)
info "NAT: conntrack -L: $want entries toward 10.99.3.1; conntrack -S: insert_failed $(ct_stat insert_failed), drop $(ct_stat drop)"
if [ "$want" = 8 ]; then ok "NAT: 8 flows got a port (conntrack -L)"; else fail "NAT: conntrack -L shows $want entries, want 8"; fi
install -D -m 0644 /usr/share/doc/timewaitd/examples/nat.conf /etc/systemd/system/timewaitd.service.d/nat.conf
sed -i 's/^#nat-interval = 10$/nat-interval = 1/' /etc/timewait/timewaitd.toml
systemctl daemon-reload
since=$(date '+%Y-%m-%d %H:%M:%S')
systemctl start timewaitd
if wait_for 180 ready; then ok "NAT drop-in: active and ready"; else
    fail "NAT drop-in: $(journalctl -u timewaitd -o cat --since "$since" | tail -3 | tr '\n' ' ')"; fi
pid=$(systemctl show -p MainPID --value timewaitd)
# The unit's four and CAP_NET_ADMIN (12).
want_caps=000000c400001004
got=$(awk '$1 == "CapEff:" {print $2}' "/proc/$pid/status")
if [ "$got" = "$want_caps" ]; then ok "NAT drop-in: CapEff = the four and CAP_NET_ADMIN"; else fail "NAT drop-in: CapEff $got, want $want_caps"; fi
nat_ok() {
    [ "$(metric timewait_nat_ports_in_use 'nat_address="10.99.3.1"')" = "$(ct_nat)" ] &&
        [ "$(metric timewait_probe_path 'signal="nat_ports"' 'path="ctnetlink"')" = 1 ]
}
if wait_for 30 nat_ok; then
    ok "NAT: timewait_nat_ports_in_use = $(metric timewait_nat_ports_in_use 'nat_address="10.99.3.1"') = conntrack -L, path ctnetlink"
else
    fail "NAT: in use $(metric timewait_nat_ports_in_use 'nat_address="10.99.3.1"'), conntrack -L $(ct_nat); $(curl -s "http://$M/metrics" | grep -E 'signal="nat_ports"|^timewait_nat_ports_in_use' | tr '\n' ' ')"
fi
l='nat_address="10.99.3.1" remote="10.99.3.2" port="5000" protocol="udp"'
r=$(metric timewait_nat_port_exhaustion_ratio $l)
size=$(metric timewait_nat_port_range_size 'nat_address="10.99.3.1"' 'protocol="udp"' 'source="nftables"')
if [ "$r" = 1 ] && [ "$size" = 8 ]; then ok "NAT: ratio 1 of the 8 ports read from the ruleset"; else fail "NAT: ratio $r, range size (nftables) $size"; fi
f=$(metric timewait_conntrack_stat_total 'stat="insert_failed"')
if [ "$f" = "$(ct_stat insert_failed)" ] && [ "$f" -ge 2 ]; then ok "NAT: insert_failed $f = conntrack -S"; else fail "NAT: insert_failed $f, conntrack -S $(ct_stat insert_failed)"; fi
info "NAT: $(curl -s "http://$M/metrics" | grep -E '^timewait_(nat_|conntrack_entries|conntrack_limit)|signal="nat' | tr '\n' ' ')"
info "$(systemd-analyze security timewaitd.service --no-pager 2>/dev/null | grep -i 'overall exposure') (with the NAT drop-in)"
if journalctl -u timewaitd -o cat --since "$since" | grep -qE ' (WARN|ERROR) '; then
    fail "NAT drop-in: $(journalctl -u timewaitd -o cat --since "$since" | grep -E ' (WARN|ERROR) ' | head -2 | tr '\n' '|')"
else
    ok "NAT drop-in: no warning or error in the journal"
fi
systemctl stop timewaitd
rm -r /etc/systemd/system/timewaitd.service.d
systemctl daemon-reload
iptables -t nat -F POSTROUTING
ip netns del twc
ip netns del tws

# --- purge -------------------------------------------------------------------
if DEBIAN_FRONTEND=noninteractive apt-get purge -y timewaitd > /tmp/purge.log 2>&1; then ok "apt purge"; else fail "apt purge: $(tail -3 /tmp/purge.log | tr '\n' ' ')"; fi
check "purge removed the binary" sh -c '! test -e /usr/bin/timewaitd'
check "purge removed the config" sh -c '! test -e /etc/timewait/timewaitd.toml'
check "purge removed the unit" sh -c '! systemctl cat timewaitd.service'
check "purge: not installed" sh -c '! dpkg-query -W -f="\${Status}" timewaitd 2>/dev/null | grep -q "ok installed"'

echo "DEBTEST done"
systemctl poweroff
