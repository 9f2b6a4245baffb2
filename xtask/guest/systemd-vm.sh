#!/bin/bash
# The scenario of `cargo xtask vmtest --systemd` (xtask/src/sysvm.rs), run as root by
# enforcer-vmtest.service in a Debian 12 guest booted with systemd as PID 1. It installs the
# package, sends real traffic through network namespaces and checks the service across
# reload, restart, stop, upgrade, a control plane and a reboot.
#
# Output goes to the serial console, which the host parses: `SYSVM: ok NAME`,
# `SYSVM: FAIL NAME: WHY`, `SYSVM: info WHAT`, and `SYSVM: done` at the very end. A failed
# check never stops the run: the next ones still say what they can.
#
# The payload disk (mounted on $PAYLOAD by the runner) holds the two packages and `env`,
# which names them. The phase is kept in $STATE/phase: phase 1 ends with a reboot, phase 2
# with a power-off.
set -u

PAYLOAD=${PAYLOAD:-/mnt/payload}
STATE=/var/lib/enforcer-vmtest
# shellcheck source=/dev/null
. "$PAYLOAD/env" # DEB_V1, DEB_V2, VERSION_V1, VERSION_V2
mkdir -p "$STATE"
cd "$PAYLOAD" || exit 1

# Datagrams per measurement, and the pace of the background sender (seconds per pair).
N=50
PACE=0.02
ALLOWED=10.77.1.2
DENIED=10.77.2.2
PORT=9000

ok() { echo "SYSVM: ok $1"; }
fail() {
	echo "SYSVM: FAIL $1: $2"
	# What the daemon logged since the last failure (at most 20 lines), colours removed.
	journalctl -u enforcer -n 20 --no-pager -o cat --cursor-file="$STATE/journal-cursor" 2>&1 |
		sed 's/\x1b\[[0-9;]*m//g; s/^/    journal: /'
}
# check NAME WHY COMMAND...: ok if COMMAND succeeds, else FAIL with WHY.
check() {
	local name=$1 why=$2
	shift 2
	if "$@"; then ok "$name"; else fail "$name" "$why"; fi
}
info() { echo "SYSVM: info $*"; }
# After a traffic check failed: what the daemon and the kernel say about agt1.
diagnose() {
	{
		enforcer status
		enforcer stats
		tc filter show dev agt1 ingress
		ip -d link show agt1
	} 2>&1 | sed 's/^/    diag: /'
}

# The agent's namespace a1 behind host veth agt1 (the policy's interface), and one server
# namespace per destination, so each one's UDP counters count exactly what reached it.
make_network() {
	sysctl -qw net.ipv4.ip_forward=1
	ip netns add a1
	ip link add agt1 type veth peer name eth0 netns a1
	ip addr add 10.77.0.1/24 dev agt1
	ip link set agt1 up
	ip -n a1 addr add 10.77.0.2/24 dev eth0
	ip -n a1 link set eth0 up
	ip -n a1 link set lo up
	ip -n a1 route add default via 10.77.0.1
	local ns net
	for ns in srv1 srv2; do
		net=${ns#srv}
		ip netns add "$ns"
		ip link add "$ns" type veth peer name eth0 netns "$ns"
		ip addr add "10.77.$net.1/24" dev "$ns"
		ip link set "$ns" up
		ip -n "$ns" addr add "10.77.$net.2/24" dev eth0
		ip -n "$ns" link set eth0 up
		ip -n "$ns" route add default via "10.77.$net.1"
	done
}

# Datagrams that reached the server at $1: delivered or refused for want of a listener.
received() {
	local ns=srv${1#10.77.}
	ns=${ns%.2}
	ip netns exec "$ns" awk '/^Udp: [0-9]/ { print $2 + $3 }' /proc/net/snmp
}

# send_udp DEST COUNT: COUNT datagrams from the agent, each from a fresh socket (an ICMP
# port unreachable makes a connected socket's next send fail).
send_udp() {
	ip netns exec a1 bash -c 'for ((i = 0; i < $2; i++)); do echo x >"/dev/udp/$1/'$PORT'"; done 2>/dev/null' _ "$1" "$2"
}

# measure ALLOWED_DEST DENIED_DEST NAME: N datagrams to each, then exact counts.
measure() {
	local allow=$1 deny=$2 name=$3 a0 d0 a1 d1
	a0=$(received "$allow")
	d0=$(received "$deny")
	send_udp "$allow" "$N"
	send_udp "$deny" "$N"
	sleep 0.5
	a1=$(received "$allow")
	d1=$(received "$deny")
	if ((a1 - a0 == N && d1 - d0 == 0)); then
		ok "$name"
	else
		fail "$name" "sent $N to $allow and $N to $deny; $((a1 - a0)) and $((d1 - d0)) arrived (want $N and 0)"
		diagnose
	fi
}

# wait_enforcing DENIED_DEST: until a datagram to DENIED_DEST is dropped (the program is
# attached to agt1 with the policy in force), at most 45 s: under TCG the verifier alone
# takes 10 to 20 s per program.
wait_enforcing() {
	local before end=$((SECONDS + 45))
	while ((SECONDS < end)); do
		before=$(received "$1")
		send_udp "$1" 1
		sleep 0.3
		[ "$(received "$1")" = "$before" ] && return 0
		sleep 0.2
	done
	return 1
}

# The agent's egress_denied packet counter, from the pinned maps through the CLI.
denied_counter() {
	enforcer --json stats | jq -r '.agents[] | select(.id == 1) | .reasons.egress_denied.packets // 0'
}

active() { systemctl is-active --quiet enforcer; }

# across NAME COMMAND...: a background sender paces allowed and denied datagrams from
# before COMMAND until after it; every allowed one must arrive and no denied one (the
# pinned program enforces while the daemon is down), and the service is active after.
across() {
	local name=$1 a0 d0 a1 d1 sent
	shift
	a0=$(received "$ALLOWED")
	d0=$(received "$DENIED")
	rm -f "$STATE/stop-sender" "$STATE/sent"
	ip netns exec a1 bash -c '
		n=0
		while [ ! -e "$1/stop-sender" ]; do
			echo x >"/dev/udp/$2/'$PORT'"
			echo x >"/dev/udp/$3/'$PORT'"
			n=$((n + 1))
			sleep "$4"
		done 2>/dev/null
		echo "$n" >"$1/sent"' _ "$STATE" "$ALLOWED" "$DENIED" "$PACE" &
	local sender=$!
	sleep 1
	local out
	if ! out=$("$@" 2>&1); then
		fail "$name-command" "\`$*\` failed: $(echo "$out" | tail -3 | tr '\n' ' ')"
	fi
	# Until the daemon is back (Type=notify: active means enforcing), then a little more.
	for ((i = 0; i < 50; i++)); do active && break; sleep 0.2; done
	sleep 1
	touch "$STATE/stop-sender"
	wait "$sender"
	sleep 0.5
	sent=$(cat "$STATE/sent" 2>/dev/null || echo 0)
	a1=$(received "$ALLOWED")
	d1=$(received "$DENIED")
	if ((sent > 0 && a1 - a0 == sent && d1 - d0 == 0)); then
		ok "fail-static-$name"
		info "$name: $sent allowed and $sent denied datagrams sent across it"
	else
		fail "fail-static-$name" "$sent allowed and $sent denied sent across \`$*\`; $((a1 - a0)) and $((d1 - d0)) arrived (want $sent and 0)"
		diagnose
	fi
	check "active-after-$name" "enforcer is $(systemctl is-active enforcer) after \`$*\`" active
}

stop_then_start() { systemctl stop enforcer && sleep 2 && systemctl start enforcer; }

write_policy() { # FILE ALLOWED_PREFIX
	cat >"$1" <<EOF
[defaults]
unknown = "pass"

[[agents]]
id = 1
name = "a1"
interfaces = ["agt1"]
mode = "enforce"
egress_default = "deny"
rate = { packets_per_sec = 100000, packets_burst = 10000, bytes_per_sec = 100_000_000 }

[[agents.egress]]
action = "allow"
to = ["$2"]
proto = "udp"
EOF
}

status_field() { enforcer --json status 2>/dev/null | jq -r ".$1 // empty"; }

phase1() {
	echo "SYSVM: phase 1 ($(uname -r))"
	local out
	if out=$(DEBIAN_FRONTEND=noninteractive apt-get install -y "./$DEB_V1" 2>&1); then
		ok install-v1
	else
		fail install-v1 "apt-get install ./$DEB_V1: $(echo "$out" | tail -3 | tr '\n' ' ')"
	fi
	check active-after-install "enforcer is $(systemctl is-active enforcer) after installing" active

	# The policy names agt1 before it exists: the service must stay up and attach later.
	write_policy /etc/enforcer/policy.toml 10.77.1.0/24
	systemctl reload enforcer
	sleep 3
	check late-interface-reload \
		"enforcer is $(systemctl is-active enforcer) after a reload naming the missing interface agt1" active
	make_network
	if wait_enforcing "$DENIED"; then
		ok late-interface-attach
	else
		fail late-interface-attach "datagrams to $DENIED still arrive 45 s after agt1 appeared"
		# So that the checks below still test something: start it with agt1 present (the
		# unit is Type=notify: the restart returns once the daemon attached).
		systemctl reset-failed enforcer
		systemctl restart enforcer
		info "enforcer restarted with agt1 present: $(systemctl is-active enforcer)"
	fi

	local before after
	before=$(denied_counter)
	measure "$ALLOWED" "$DENIED" traffic
	after=$(denied_counter)
	if [[ "$before" =~ ^[0-9]+$ && "$after" =~ ^[0-9]+$ ]] && ((after - before == N)); then
		ok drop-counter
	else
		fail drop-counter "egress_denied of agent 1 went from '$before' to '$after' (want +$N)"
	fi

	out=$(curl -s -m 10 http://127.0.0.1:9464/metrics)
	check metrics "curl http://127.0.0.1:9464/metrics gave no enforcer_build_info ($(echo "$out" | wc -c) bytes)" \
		grep -q '^enforcer_build_info' <<<"$out"

	across reload systemctl reload enforcer
	across restart systemctl restart enforcer
	across stop-start stop_then_start
	across upgrade env DEBIAN_FRONTEND=noninteractive apt-get install -y "./$DEB_V2"
	local installed
	installed=$(dpkg-query -W -f='${Version}' enforcer)
	check upgraded-version "dpkg-query shows enforcer $installed, want $VERSION_V2" \
		test "$installed" = "$VERSION_V2"

	control_plane
	echo 2 >"$STATE/phase"
	echo "SYSVM: rebooting"
	systemctl reboot
	# Stopped by the reboot: returning would tell the runner the scenario ended early.
	exec sleep infinity
}

# A control plane on 127.0.0.1 whose policy allows the other destination (10.77.2.0/24):
# what passes shows whose policy enforces.
control_plane() {
	# Not under /root: the service's ProtectHome= hides it, and the daemon reads the CA.
	local cp=$STATE/cp
	mkdir -p "$cp/policies"
	enforcer keygen --dir "$cp/keys" >/dev/null &&
		enforcer certs --dir "$cp/tls" --server-name 127.0.0.1 >/dev/null ||
		fail cp-setup "enforcer keygen or certs failed"
	write_policy "$cp/policies/default.toml" 10.77.2.0/24
	cat >"$cp/cp.toml" <<EOF
dir = "$cp/policies"
signing_key = "$cp/keys/signing.key"
listen = "127.0.0.1:7443"
tls_cert = "$cp/tls/server.pem"
tls_key = "$cp/tls/server.key"
EOF
	systemd-run --quiet --unit=enforcer-cp enforcer control-plane serve "$cp/cp.toml"
	local i
	for ((i = 0; i < 50; i++)); do
		ss -Hltn 'sport = :7443' | grep -q . && break
		sleep 0.2
	done
	check cp-listening "the control plane does not listen on 127.0.0.1:7443 ($(systemctl is-active enforcer-cp))" \
		bash -c "ss -Hltn 'sport = :7443' | grep -q ."
	cp "$cp/tls/ca.pem" /etc/enforcer/ca.pem
	cat >>/etc/enforcer/enforcer.toml <<EOF

[control_plane]
url = "https://127.0.0.1:7443"
ca = "/etc/enforcer/ca.pem"
node_id = "sysvm"
trusted_keys = ["$(cat "$cp/keys/signing.pub")"]
EOF
	systemctl restart enforcer
	local origin=
	for ((i = 0; i < 60; i++)); do
		origin=$(status_field policy_origin)
		[[ "$origin" == default.toml@v* ]] && break
		sleep 0.5
	done
	if [[ "$origin" == default.toml@v* ]]; then
		ok cp-bundle-applied
	else
		fail cp-bundle-applied "enforcer status shows policy '$origin' 30 s after the restart, not default.toml@vN"
	fi
	echo "$origin" >"$STATE/cp-origin"
	wait_enforcing "$ALLOWED"
	measure "$DENIED" "$ALLOWED" cp-policy-enforced
	check cp-bundle-persisted "no bundle in /var/lib/enforcer ($(ls /var/lib/enforcer | tr '\n' ' '))" \
		test -s /var/lib/enforcer/bundle.pb
	systemctl stop enforcer-cp
}

phase2() {
	echo "SYSVM: phase 2 ($(uname -r), after the reboot)"
	check boot-active "enforcer is $(systemctl is-active enforcer) at boot" active
	local enforcer_at runner_at
	enforcer_at=$(systemctl show enforcer -P ActiveEnterTimestampMonotonic)
	runner_at=$(systemctl show enforcer-vmtest -P ExecMainStartTimestampMonotonic)
	check boot-order "enforcer became active at ${enforcer_at} us, the runner started at ${runner_at} us" \
		test "${enforcer_at:-0}" -gt 0 -a "${enforcer_at:-0}" -lt "${runner_at:-0}"
	make_network
	wait_enforcing "$ALLOWED"
	# The policy file allows 10.77.1.0/24; the held bundle allows 10.77.2.0/24 only.
	measure "$DENIED" "$ALLOWED" persisted-policy-enforced
	local held origin
	held=$(cat "$STATE/cp-origin" 2>/dev/null)
	origin=$(status_field policy_origin)
	check status-held-version "enforcer status shows policy '$origin', the control plane sent '$held'" \
		test "$origin" = "$held" -a "${held#default.toml@v}" != "$held"
	local score
	score=$(systemd-analyze security enforcer --no-pager 2>&1 | grep -i 'overall exposure' | sed 's/.*: *//' | awk '{ print $1, $2 }')
	info "security ${score:-unknown}"
	echo "SYSVM: done"
	systemctl poweroff
	exec sleep infinity
}

case "$(cat "$STATE/phase" 2>/dev/null || echo 1)" in
1) phase1 ;;
2) phase2 ;;
*)
	fail phase "unknown phase in $STATE/phase: $(cat "$STATE/phase")"
	;;
esac
