#!/usr/bin/env bash
# Accept rate with a `rate` rule on the in-process state store against the same rule on a
# Redis store (spec/language.md section 5.3), same machine, same run, alternating rounds;
# and the Redis commands (round trips) per message, read from Redis's own counters.
#
# Usage: bench/state-store.sh [SESSIONS=20] [MESSAGES=3000] [SIZE=2000] [ROUNDS=3]
# Environment: NO_BUILD=1 skips `cargo build --release`; MAILC=PATH benchmarks another binary;
# PERFSTAT=1 counts the daemon's context switches and syscalls per message (`perf stat`);
# KEEP=1 keeps the temp dir; PROFILE=1 records the daemon with `perf record -e cpu-clock -g`
# (Debian linux-perf; PROFILE=dwarf unwinds with DWARF) in the first round of each kind and prints both profiles (self time and
# the state store's own frames); BEFORE=PATH adds, to every round, the Redis policy served by
# another binary (an A/B of two builds in one run: `before` in the table). Needs redis-server, smtp-source and smtp-sink (Debian
# redis-server, postfix) and python3.
#
# Each round starts `mailc serve` on the same policy but for its `state` setting, injects
# MESSAGES (one per connection) with smtp-source, and relays them to an smtp-sink that keeps
# nothing. The policy counts every session's messages and connections and asks one `rate`
# and one `concurrent` count per message (limits never reached), as a real MX's limits do:
#   accept rate = MESSAGES / the time smtp-source took (it ends after the last 250)
#   round trips = the daemon's own count of its Redis calls (logged when it stops) / MESSAGES
#   commands    = (Redis total_commands_processed after - before) / MESSAGES: the commands
#                 Redis ran, those inside the Lua scripts included
#   CPU         = CPU time (user + system, /proc/PID/stat) per message of the daemon (from
#                 its start to smtp-source's end) and of redis-server (over the round): less
#                 disturbed than the rate by other work on a shared machine
set -euo pipefail
S=${1:-20}; M=${2:-3000}; L=${3:-2000}; ROUNDS=${4:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${MAILC:-$ROOT/target/release/mailc}
for t in redis-server redis-cli /usr/sbin/smtp-source /usr/sbin/smtp-sink python3; do
  command -v "$t" >/dev/null || { echo "state-store: $t is missing (apt-get install redis-server postfix python3)" >&2; exit 2; }
done
if [ -z "${NO_BUILD:-}" ] && [ -z "${MAILC:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p mailc)
fi
[ -x "$BIN" ] || { echo "state-store: $BIN not built" >&2; exit 2; }

# PROFILE=dwarf unwinds with the release build's line tables (the async frames a
# frame-pointer walk loses), at a lower frequency: its samples are larger.
PERFARGS=(-F 997 -g); [ "${PROFILE:-}" = dwarf ] && PERFARGS=(-F 300 --call-graph dwarf,32768)
D=$(mktemp -d /tmp/state-store.XXXXXX)
RPID=""; SPID=""; MPPID=""
cleanup() {
  set +e
  for p in $MPPID $SPID $RPID; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  if [ -z "${KEEP:-}" ]; then rm -rf "$D"; else echo "kept $D" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

read -r RPORT SINK PORT < <(python3 - <<'PY'
import socket
ss=[socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1",0))
print(*[s.getsockname()[1] for s in ss])
PY
)
listening() { python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(('127.0.0.1',$1)))" 2>/dev/null; }
wait_listen() { for _ in $(seq 1 100); do listening "$1" && return 0; sleep 0.1; done; echo "state-store: nothing listens on $1" >&2; return 1; }
now() { date +%s.%N; }

mkdir -p "$D/redis"
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
  --dir "$D/redis" --logfile "$D/redis/log" </dev/null & RPID=$!
wait_listen "$RPORT"
SINKUSER=(); [ "$(id -u)" = 0 ] && SINKUSER=(-u nobody)
smtp-sink "${SINKUSER[@]}" "127.0.0.1:$SINK" 1000 >/dev/null 2>&1 </dev/null & SPID=$!
wait_listen "$SINK"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)
commands() { redis-cli -p "$RPORT" info stats | awk -F: '/^total_commands_processed:/{print $2+0}'; }

policy() { # state-url
  cat <<POL
require ["ratelimit"];
list bench_domains = domains ["bench.test"];
list loopback = cidr ["127.0.0.0/8"];

server {
  hostname "mailpolicy.bench.test";
  networks loopback;
  destination_concurrency 50;
  client_connection_limit 0;
  state "$1";
}

listener bench {
  address "127.0.0.1:$PORT";
  tls none;
}

on mail {
  if rate messages by client.ip per 1h > 100000000 {
    tempfail 451 4.7.1 "Too many messages from \${client.ip}";
  }
  if concurrent by client.ip > 100000 {
    tempfail 451 4.7.1 "Too many sessions from \${client.ip}";
  }
}

on rcpt {
  if recipient.domain not in bench_domains {
    reject 554 5.7.1 "Relay access denied";
  }
  accept;
}

route {
  deliver smtp "[127.0.0.1]:$SINK";
}
POL
}
policy local > "$D/local.mailpolicy"
policy "redis://127.0.0.1:$RPORT/0" > "$D/redis.mailpolicy"
"$BIN" check "$D/redis.mailpolicy" >/dev/null 2>&1

round() { # name [binary] (the policy is $name.mailpolicy; `before` serves redis.mailpolicy)
  local bin=${2:-$BIN} pol=$1
  [ "$1" = before ] && pol=redis
  rm -rf "$D/spool"
  # Every round starts on an empty store (a `before` build may keep other structures).
  redis-cli -p "$RPORT" flushall >/dev/null
  local cmd=("$bin" serve --policy "$D/$pol.mailpolicy" --spool "$D/spool" --user "$(id -un)") perfpid=""
  if [ -n "${PROFILE:-}" ] && [ ! -e "$D/perf-$1.data" ]; then
    # perf follows every thread the daemon starts (the blocking pool's come and go).
    perf record -q -e cpu-clock "${PERFARGS[@]}" -o "$D/perf-$1.data" -- "${cmd[@]}" >>"$D/$1.log" 2>&1 </dev/null & perfpid=$!
    wait_listen "$PORT"
    MPPID=$(pgrep -P "$perfpid" | head -1)
  elif [ -n "${PERFSTAT:-}" ]; then
    # Counts per round (context switches, syscalls, futex and epoll calls) of the daemon.
    perf stat -x, -o "$D/perfstat-$1.$(date +%s%N)" -e task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sendto,syscalls:sys_enter_write,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read \
      -- "${cmd[@]}" >>"$D/$1.log" 2>&1 </dev/null & perfpid=$!
    wait_listen "$PORT"
    MPPID=$(pgrep -P "$perfpid" | head -1)
  else
    "${cmd[@]}" >>"$D/$1.log" 2>&1 </dev/null & MPPID=$!
    wait_listen "$PORT"
  fi
  local c0 c1 t0 t1 r0 r1 d1
  c0=$(commands)
  r0=$(cpu "$RPID")
  t0=$(now)
  if ! smtp-source -s "$S" -m "$M" -l "$L" -f a@src.test -t b@bench.test "127.0.0.1:$PORT" >"$D/source-$1.out" 2>&1; then
    echo "state-store: smtp-source against $1 failed:" >&2; cat "$D/source-$1.out" >&2; exit 1
  fi
  t1=$(now)
  d1=$(cpu "$MPPID")
  r1=$(cpu "$RPID")
  c1=$(commands)
  kill "$MPPID"; wait "$MPPID" 2>/dev/null || true; MPPID=""
  if [ -n "$perfpid" ]; then wait "$perfpid" 2>/dev/null || true; fi
  local trips
  trips=$( (grep -o "stopped state_round_trips=[0-9]*" "$D/$1.log" || true) | tail -1 | cut -d= -f2)
  : > "$D/$1.log.done"; cat "$D/$1.log" >> "$D/$1.log.done"; : > "$D/$1.log"
  python3 -c "import sys; n,t0,t1,c0,c1,m,rt=sys.argv[1],float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]),int(sys.argv[5]),int(sys.argv[6]),int(sys.argv[7] or 0); d,r,tick=int(sys.argv[8]),int(sys.argv[9]),int(sys.argv[10]); print(n, f'{m/(t1-t0):.1f}', f'{rt/m:.2f}', f'{(c1-c0-1)/m:.2f}', f'{d*1e6/tick/m:.0f}', f'{r*1e6/tick/m:.0f}')" \
    "$1" "$t0" "$t1" "$c0" "$c1" "$M" "${trips:-0}" "$d1" "$((r1 - r0))" "$TICK" >> "$D/results"
  tail -1 "$D/results" | awk '{printf "  %-6s %7.0f msg/s accepted; per message %s Redis round trips, %s Redis commands, CPU %s us daemon + %s us redis\n", $1, $2, $3, $4, $5, $6}'
}

echo "state-store: $S sessions x $M messages of $L bytes, $ROUNDS round(s); load $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
KINDS=(local redis); [ -n "${BEFORE:-}" ] && KINDS+=(before)
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  # The order turns every round: a daemon run right after another finds its deleted spool
  # files in ext4's inode tables (bench/README.md, issue 13), which no kind should always pay.
  n=${#KINDS[@]}
  for i in $(seq 0 $((n - 1))); do
    k=${KINDS[$(( (i + r - 1) % n ))]}
    if [ "$k" = before ]; then round before "$BEFORE"; else round "$k"; fi
  done
done
python3 - "$D/results" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
names = [k for k in ("local", "redis", "before") if any(r[0] == k for r in rows)]
rate = {k: statistics.median(float(r[1]) for r in rows if r[0] == k) for k in names}
for k in names[1:]:
    trips = statistics.median(float(r[2]) for r in rows if r[0] == k)
    print(f"median accept rate: local {rate['local']:.0f} msg/s, {k} {rate[k]:.0f} msg/s, "
          f"{k}/local {rate[k]/rate['local']:.3f} (cost {100*(1-rate[k]/rate['local']):.1f} %); "
          f"{trips:.2f} Redis round trips per message")
# Paired: each round's ratio to the local store of the same round (the machine drifts
# between rounds more than within one), and their median.
for k in names[1:]:
    loc = [float(r[1]) for r in rows if r[0] == "local"]
    oth = [float(r[1]) for r in rows if r[0] == k]
    ratios = sorted(o / l for o, l in zip(oth, loc))
    if ratios:
        print(f"paired per round: {k}/local median {statistics.median(ratios):.3f} (cost {100*(1-statistics.median(ratios)):.1f} %), "
              f"range {ratios[0]:.3f}-{ratios[-1]:.3f} over {len(ratios)} rounds")
cpu = {k: statistics.median(float(r[4]) + float(r[5]) for r in rows if r[0] == k) for k in names}
for k in names[1:]:
    print(f"median CPU per message (daemon + redis): local {cpu['local']:.0f} us, {k} {cpu[k]:.0f} us, "
          f"{k}/local {cpu[k]/cpu['local']:.3f}")
PY
if [ -n "${PERFSTAT:-}" ]; then
  echo
  echo "perf stat of the daemon, per message (each round; the whole run of the daemon, start-up included):"
  for f in "$D"/perfstat-*; do
    k=$(basename "$f" | cut -d- -f2 | cut -d. -f1)
    awk -F, -v k="$k" -v m="$M" 'BEGIN { printf "%-6s", k } $3 != "" && $1 ~ /^[0-9.]+$/ { split($3, n, ":"); printf " %s=%.2f", n[length(n)], $1/m } END { print "" }' "$f"
  done
fi
for k in local redis before; do
  [ -e "$D/perf-$k.data" ] || continue
  echo
  echo "profile of the daemon, $k store (first round; self time, entries of 0.8 % and more):"
  perf report -i "$D/perf-$k.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.8 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | head -30
  echo "inclusive (children) of the state store, the Redis client and the task machinery, 1 % and more:"
  perf report -i "$D/perf-$k.data" --stdio --children --sort symbol -g none --percent-limit 1 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | grep -i -E 'state::|redis|spawn|timeout|futex|epoll|schedule|tcp_sendmsg|send_recv|session::' | head -30
done
echo "state-store: after, load $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
