#!/usr/bin/env bash
# CPU per message of one mailc binary on the accept-and-relay job of accept-relay.sh (the
# same policy), without Postfix: for A/B comparisons of a change, and for the system-call
# and futex profiles of bench/README.md.
#
# Usage: bench/cpu-per-message.sh MAILC [MESSAGES] [MODE]
#   MODE  (none)   rates and daemon CPU per message (user, system; from /proc/PID/stat)
#         strace   also `strace -c -f` of the daemon over the run (STRACE_OPTS replaces -c,
#                  e.g. STRACE_OPTS="-k -e trace=futex" for the stack of every futex call)
#         perf     also `perf record -g` of the daemon (PERF_FREQ, default 997)
# Prints one line; the strace/perf output stays in $OUT (default /tmp/cpu-per-message).
# Needs smtp-source and smtp-sink (Debian postfix), root (smtp-sink -u nobody).
set -euo pipefail
BIN=${1:?mailc binary}; N=${2:-4000}; MODE=${3:-}
OUT=${OUT:-/tmp/cpu-per-message}; mkdir -p "$OUT"
D=$(mktemp -d /tmp/cpu-per-message.XXXXXX); chmod 755 "$D"
free_port() { python3 -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
P=$(free_port); SP=$(free_port)
cat > "$D/p.mailpolicy" <<POL
list bench_domains = domains ["bench.test"];
list loopback = cidr ["127.0.0.0/8"];
server { hostname "mailpolicy.bench.test"; networks loopback; destination_concurrency 50; spool "spool"; }
listener bench { address "127.0.0.1:$P"; tls none; }
on rcpt { if client.ip not in loopback and recipient.domain not in bench_domains { reject 554 5.7.1 "Relay access denied"; } accept; }
route { deliver smtp "[127.0.0.1]:$SP"; }
POL
cd "$D"
smtp-sink -u nobody 127.0.0.1:"$SP" 200 & SINK=$!
"$BIN" serve --policy p.mailpolicy --user nobody 2>daemon.log & DPID=$!
sleep 0.2; kill -0 "$DPID" 2>/dev/null || { cat daemon.log >&2; exit 1; }
ST=""
cleanup() { [ -n "$ST" ] && kill -INT "$ST" 2>/dev/null; kill "$DPID" "$SINK" 2>/dev/null; wait 2>/dev/null; rm -rf "$D"; }
trap cleanup EXIT
for _ in $(seq 100); do python3 -c "import socket,sys; s=socket.socket(); sys.exit(s.connect_ex(('127.0.0.1',$P)))" && break; sleep 0.1; done
sleep 0.5
case "$MODE" in
  strace) strace ${STRACE_OPTS:--c} -f -p "$DPID" -o "$OUT/strace.txt" & ST=$!; sleep 1 ;;
  perf) perf record -F "${PERF_FREQ:-997}" -g -p "$DPID" -o "$OUT/perf.data" 2>/dev/null & ST=$!; sleep 1 ;;
esac
read -r u0 s0 < <(awk '{print $14, $15}' /proc/$DPID/stat)
t0=$(date +%s.%N)
smtp-source -s 20 -m "$N" -l 2000 -f a@x.test -t b@bench.test 127.0.0.1:"$P"
t1=$(date +%s.%N)
for _ in $(seq 600); do
  [ "$(find spool/incoming spool/active spool/deferred -type f 2>/dev/null | wc -l)" = 0 ] && break; sleep 0.1
done
t2=$(date +%s.%N)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$DPID/stat)
if [ -n "$ST" ]; then kill -INT "$ST"; wait "$ST" || true; ST=""; fi
tck=$(getconf CLK_TCK)
python3 - "$N" "$t0" "$t1" "$t2" "$u0" "$s0" "$u1" "$s1" "$tck" <<'PY'
import sys
n,t0,t1,t2=int(sys.argv[1]),*map(float,sys.argv[2:5])
u0,s0,u1,s1,tck=map(int,sys.argv[5:10])
us=lambda ticks: round(ticks*1e6/tck/n)
print(f"accept {round(n/(t1-t0))} msg/s; relayed {round(n/(t2-t0))} msg/s; daemon CPU per message user {us(u1-u0)} us, system {us(s1-s0)} us")
PY
