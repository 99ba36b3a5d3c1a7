#!/usr/bin/env bash
# Accept rate and relay rate of mailpolicy side by side with Postfix, same machine, same run.
#
# Both MTAs listen on loopback, accept mail for bench.test from 127.0.0.0/8 durably (Postfix's
# default queue fsyncs each message before its 250; mailpolicy's spool fsyncs data and
# directory entry before its 250), and relay everything to an smtp-sink of their own.
# smtp-source injects the same load into each, one after the other:
#
#   accept rate = messages / (time smtp-source took; it ends after the last 250 and QUIT)
#   relay rate  = messages / (first injection .. last message written by the MTA's sink)
#   no-disk limit = the same smtp-source load straight into an smtp-sink that writes nothing:
#                 what this machine's loopback, kernel and smtp-source allow at most
#
# Usage: bench/accept-relay.sh [SESSIONS] [MESSAGES] [SIZE] [ROUNDS]
#   SESSIONS  parallel smtp-source sessions (default 20)
#   MESSAGES  messages in total per MTA and round (default 5000)
#   SIZE      message size in bytes (default 2000)
#   ROUNDS    rounds, each measuring Postfix then mailpolicy (default 1); the table shows
#             the median of the rounds, every round is printed as it ends
# Environment: NO_BUILD=1 skips `cargo build --release`; MAILC=PATH benchmarks another mailc
# binary (for A/B comparisons; implies NO_BUILD); KEEP=1 keeps the temp dir.
#   BACKLOG=N  adds a last round in which each MTA first gets N messages (not timed as the
#              round) and then the measured MESSAGES while it drains that backlog;
#   RULES=N    also measures mailpolicy with the bench policy plus N rules (the examples'
#              rules repeated with different literals; DNS answered by a local responder),
#              every round, against the plain policy of the same round.
#   MAILC_B=PATH  also measures this second mailc binary on the plain policy every round,
#              next to the first, in alternating order (A/B in one run: same load, same
#              Postfix rounds; use an even number of ROUNDS).
#   PROFILE=1  records the daemon with `perf record -g` (Debian linux-perf) during the first
#              plain mailpolicy round and prints the top entries (self time by symbol) at
#              the end; the data stays in the temp dir with KEEP=1. PROFILE=rules records
#              the first RULES round too, into a profile of its own (with RULES=N).
#              PERF_CALLGRAPH="--call-graph dwarf" gives call chains through Rust code (built
#              without frame pointers; large files: lower PERF_FREQ, default 997).
# The summary ends with every goal of issue 13 (met / not met, with the measured figure).
# Needs root (Postfix's master), postfix, smtp-source, smtp-sink, python3.
set -euo pipefail
S=${1:-20}; M=${2:-5000}; L=${3:-2000}; ROUNDS=${4:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CMD="${BACKLOG:+BACKLOG=$BACKLOG }${RULES:+RULES=$RULES }${MAILC_B:+MAILC_B=$MAILC_B }bench/accept-relay.sh $S $M $L $ROUNDS"
BIN=${MAILC:-$ROOT/target/release/mailc}
BACKLOG=${BACKLOG:-0}; RULES=${RULES:-0}
DRAIN_LIMIT=${DRAIN_LIMIT:-$((150 + BACKLOG / 100))}

for t in /usr/sbin/postfix /usr/sbin/smtp-source /usr/sbin/smtp-sink python3; do
  command -v "$t" >/dev/null || { echo "accept-relay: $t is missing (apt-get install postfix python3)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "accept-relay: needs root (Postfix's master runs as root)" >&2; exit 2; }
if [ -z "${NO_BUILD:-}" ] && [ -z "${MAILC:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p mailc)
fi
[ -x "$BIN" ] || { echo "accept-relay: $BIN not built" >&2; exit 2; }
BIN_B=${MAILC_B:-}
[ -z "$BIN_B" ] || [ -x "$BIN_B" ] || { echo "accept-relay: $BIN_B is not an executable" >&2; exit 2; }

D=$(mktemp -d /tmp/accept-relay.XXXXXX); chmod 755 "$D"
SINKPIDS=(); MPPID=""; SAMPLER=""; DNSPID=""
cleanup() {
  set +e
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null
  pf_stop
  if [ -n "$MPPID" ]; then kill "$MPPID" 2>/dev/null; wait "$MPPID" 2>/dev/null; fi
  for p in "${SINKPIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  if [ -n "$DNSPID" ]; then kill "$DNSPID" 2>/dev/null; wait "$DNSPID" 2>/dev/null; fi
  if [ -z "${KEEP:-}" ]; then rm -rf "$D"; else echo "kept $D" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Six free loopback ports (the last one for UDP: the DNS responder of RULES).
read -r PFPORT PFSINK MPPORT MPSINK NDSINK DNSPORT < <(python3 - <<'PY'
import socket
ss=[socket.socket() for _ in range(5)] + [socket.socket(socket.AF_INET, socket.SOCK_DGRAM)]
for s in ss: s.bind(("127.0.0.1",0))
print(*[s.getsockname()[1] for s in ss])
PY
)

listening() { python3 -c "import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(s.connect_ex(('127.0.0.1',$1)))" 2>/dev/null; }
wait_listen() { for _ in $(seq 1 100); do listening "$1" && return 0; sleep 0.1; done; echo "accept-relay: nothing listens on $1" >&2; return 1; }
now() { date +%s.%N; }

# ---------------------------------------------------------------- sinks (one per MTA)
start_sink() { # name port
  mkdir -p "$D/$1"; chown postfix "$D/$1"
  smtp-sink -u postfix -d "$D/$1/%H/m." "127.0.0.1:$2" 1000 >/dev/null 2>&1 & SINKPIDS+=($!)
  wait_listen "$2"
}
start_sink sink-postfix "$PFSINK"
start_sink sink-mailpolicy "$MPSINK"
# The no-disk limit: an smtp-sink that keeps nothing (no -d), for smtp-source directly.
smtp-sink -u postfix "127.0.0.1:$NDSINK" 1000 >/dev/null 2>&1 & SINKPIDS+=($!)
wait_listen "$NDSINK"

# ---------------------------------------------------------------- Postfix
PF=$D/postfix
mkdir -p "$PF/etc" "$PF/spool" "$PF/data"; chown postfix "$PF/data"
cat > "$PF/etc/main.cf" <<CF
compatibility_level = 3.6
queue_directory = $PF/spool
data_directory = $PF/data
mail_owner = postfix
myhostname = postfix.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = bench.test
relayhost = [127.0.0.1]:$PFSINK
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
default_destination_concurrency_limit = 50
smtp_connection_cache_on_demand = yes
maillog_file = $PF/maillog
maillog_file_prefixes = /tmp
CF
{
  echo "127.0.0.1:$PFPORT inet n - n - 100 smtpd"
  cat <<'CF'
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
CF
} > "$PF/etc/master.cf"
PF_STARTED=""
pf_start() { postfix -c "$PF/etc" start >/dev/null 2>&1 </dev/null; PF_STARTED=1; wait_listen "$PFPORT"; }
pf_stop() {
  [ -n "$PF_STARTED" ] || return 0
  local pid; pid=$(cat "$PF/spool/pid/master.pid" 2>/dev/null | tr -d ' ' || true)
  postfix -c "$PF/etc" stop >/dev/null 2>&1 </dev/null || true
  for _ in $(seq 1 100); do [ -n "$pid" ] && [ -d "/proc/$pid" ] || break; sleep 0.05; done
  if [ -n "$pid" ] && [ -d "/proc/$pid" ]; then postfix -c "$PF/etc" abort >/dev/null 2>&1 </dev/null || kill -9 "$pid" 2>/dev/null || true; fi
  PF_STARTED=""
}
pf_pids() { local m; m=$(tr -d ' ' < "$PF/spool/pid/master.pid" 2>/dev/null) || return 0; echo "$m"; pgrep -P "$m" || true; }

# ---------------------------------------------------------------- mailpolicy
MP=$D/mailpolicy
mkdir -p "$MP"
cat > "$MP/bench.mailpolicy" <<POL
# The same job as the Postfix above: relay bench.test for 127.0.0.0/8, everything to a sink.
list bench_domains = domains ["bench.test"];
list loopback = cidr ["127.0.0.0/8"];

server {
  hostname "mailpolicy.bench.test";
  networks loopback;
  destination_concurrency 50;
}

listener bench {
  address "127.0.0.1:$MPPORT";
  tls none;
}

on rcpt {
  if client.ip not in loopback and recipient.domain not in bench_domains {
    reject 554 5.7.1 "Relay access denied";
  }
  accept;
}

route {
  deliver smtp "[127.0.0.1]:$MPSINK";
}
POL
# RULES=N: the same policy plus N rules that never fire on the benchmark's mail, made from
# the examples' rules (DNSBL and RHSBL checks, rate limits, HELO, sender and recipient
# tests with literals, lists, regexes and globs, header checks) with different literals,
# DNS answered by a local responder (NXDOMAIN for the lists, localhost for 127.0.0.1) as a
# local caching resolver would.
if [ "$RULES" -gt 0 ]; then
  python3 - "$DNSPORT" >"$MP/dns.log" 2>&1 <<'PY' & DNSPID=$!
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", int(sys.argv[1])))
def name(b, i):
    out = []
    while b[i]: out.append(b[i+1:i+1+b[i]].decode("ascii", "replace")); i += 1 + b[i]
    return ".".join(out).lower(), i + 1
def enc(n): return b"".join(bytes([len(p)]) + p.encode() for p in n.split(".") if p) + b"\0"
while True:
    q, a = s.recvfrom(4096)
    try:
        qn, end = name(q, 12); qtype, = struct.unpack("!H", q[end:end+2]); question = q[12:end+4]
    except Exception:
        continue
    ans = b""
    if qtype == 12 and qn == "1.0.0.127.in-addr.arpa":
        rd = enc("localhost"); ans = b"\xc0\x0c" + struct.pack("!HHIH", 12, 1, 300, len(rd)) + rd
    elif qtype == 1 and qn == "localhost":
        ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([127, 0, 0, 1])
    if ans:
        hdr = q[:2] + struct.pack("!HHHHH", 0x8180, 1, 1, 0, 0); s.sendto(hdr + question + ans, a)
    else:
        zone = ".".join(qn.split(".")[-2:])
        soa = enc("ns." + zone) + enc("hostmaster." + zone) + struct.pack("!IIIII", 1, 3600, 600, 86400, 300)
        auth = enc(zone) + struct.pack("!HHIH", 6, 1, 300, len(soa)) + soa
        hdr = q[:2] + struct.pack("!HHHHH", 0x8183, 1, 0, 1, 0); s.sendto(hdr + question + auth, a)
PY
  python3 - "$RULES" "$DNSPORT" "$MP/bench.mailpolicy" >"$MP/rules.mailpolicy" <<'PY'
import sys
n, port, base = int(sys.argv[1]), sys.argv[2], open(sys.argv[3]).read()
base = base.replace("server {\n", f'server {{\n  dns_server "127.0.0.1:{port}";\n', 1)
stages = {"connect": [], "helo": [], "mail": [], "rcpt": [], "data": []}
lists = []
t = [
  ("connect", lambda i: f'if dnsbl "bl{i}.dnsbl.test" {{ reject 554 5.7.1 "${{client.ip}} is listed by bl{i}"; }}'),
  ("connect", lambda i: f'if client.ip in nets{i} {{ reject 554 5.7.1 "Blocked network {i}"; }}'),
  ("connect", lambda i: f'if rate connections by client.ip per 1m > {1000000 + i} {{ tempfail 421 4.7.0 "Too many connections"; }}'),
  ("helo", lambda i: f'if helo.name :is "spammer{i}.example" {{ reject 550 5.7.1 "Bad HELO {i}"; }}'),
  ("helo", lambda i: f'if helo.name :regex "^(bad|evil){i}\\\\." {{ reject 550 5.7.1 "Bad HELO pattern {i}"; }}'),
  ("mail", lambda i: f'if sender.domain in blocked{i} {{ reject 550 5.7.1 "Sender domain blocked {i}"; }}'),
  ("mail", lambda i: f'if sender is not null and rhsbl "dbl{i}.rhsbl.test" sender.domain {{ reject 554 5.7.1 "listed {i}"; }}'),
  ("mail", lambda i: f'if sender.local :is "MAILER-DAEMON-{i}" {{ reject 550 5.7.1 "No {i}"; }}'),
  ("rcpt", lambda i: f'if recipient.local :is "nobody{i}" {{ reject 550 5.1.1 "No such user {i}"; }}'),
  ("rcpt", lambda i: f'if recipient.local :matches ["spamtrap{i}*", "honeypot{i}*"] {{ reject 550 5.1.1 "Trap {i}"; }}'),
  ("rcpt", lambda i: f'if rate recipients by client.ip per 1m > {1000000 + i} {{ tempfail 450 4.7.1 "Slow down"; }}'),
  ("data", lambda i: f'if header "subject" :regex "^(ILOVEYOU{i}|Important Message {i})$" {{ reject 550 5.7.1 "Virus {i}"; }}'),
  ("data", lambda i: f'if header "x-mailer" :contains "The Bat! (v{i}.0 beta)" {{ reject 550 5.7.1 "Mailer {i}"; }}'),
]
# DNS-based rules are few in real policies (the examples have four per policy): every 20th.
dns = [0, 6]
other = [k for k in range(len(t)) if k not in dns]
for i in range(n):
    k = dns[(i // 20) % len(dns)] if i % 20 == 0 else other[i % len(other)]
    st, f = t[k]
    stages[st].append(f(i))
    if k == 1: lists.append(f'list nets{i} = cidr ["10.{i % 250}.0.0/16", "192.0.2.{i % 250}/32"];')
    if k == 5: lists.append(f'list blocked{i} = domains ["spam{i}.example", ".spam{i}.example"];')
out = base.replace("on rcpt {\n", "on rcpt {\n" + "".join(f"  {r}\n" for r in stages["rcpt"]), 1)
out = "require [\"dnsbl\", \"ratelimit\"];\n" + "\n".join(lists) + "\n" + out
for st in ("connect", "helo", "mail", "data"):
    out += f"\non {st} {{\n" + "".join(f"  {r}\n" for r in stages[st]) + "}\n"
print(out)
PY
  "$BIN" check "$MP/rules.mailpolicy" >"$MP/rules.check" 2>&1 || { echo "accept-relay: the $RULES-rule policy does not check:" >&2; cat "$MP/rules.check" >&2; exit 1; }
fi
PERFPID=""
mp_start() { # [policy file] [binary] [profile: the perf data file]
  local cmd=("${2:-$BIN}" serve --policy "${1:-$MP/bench.mailpolicy}" --spool "$MP/spool" --user "$(id -un)")
  if [ -n "${3:-}" ]; then
    # The daemon runs under perf, which then follows every thread it starts (the blocking
    # pool's threads, which do the spool's file work, come and go).
    perf record -q -e cpu-clock -F "${PERF_FREQ:-997}" ${PERF_CALLGRAPH:--g} -o "$3" -- "${cmd[@]}" >>"$MP/log" 2>&1 </dev/null & PERFPID=$!
    wait_listen "$MPPORT"
    MPPID=$(pgrep -P "$PERFPID" | head -1)
  else
    "${cmd[@]}" >>"$MP/log" 2>&1 </dev/null & MPPID=$!
    wait_listen "$MPPORT"
  fi
}
mp_stop() {
  kill "$MPPID" 2>/dev/null || true; wait "$MPPID" 2>/dev/null || true; MPPID=""
  if [ -n "$PERFPID" ]; then wait "$PERFPID" 2>/dev/null || true; PERFPID=""; fi
}
mp_pids() { [ -n "$MPPID" ] && echo "$MPPID"; }

# ---------------------------------------------------------------- memory sampler
# Peak of the summed RSS and PSS (proportional: shared pages divided among their users, so
# Postfix's many processes are not charged each for the same libraries) over the processes
# of one MTA, sampled every 0.2 s.
sample_mem() { # pids-function outfile
  local peak_rss=0 peak_pss=0 rss pss
  while :; do
    read -r rss pss < <(for p in $($1); do cat "/proc/$p/smaps_rollup" 2>/dev/null; done |
      awk '/^Rss:/{r+=$2} /^Pss:/{p+=$2} END{print r+0, p+0}')
    [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
    [ "$pss" -gt "$peak_pss" ] && peak_pss=$pss
    # Written whole, then renamed: the sampler is killed at any moment, and a reader must
    # never find the file truncated (an empty read ended the script under set -e).
    echo "$peak_rss $peak_pss" > "$2.tmp" && mv -f "$2.tmp" "$2"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- one measurement
measure() { # name pids-function port sinkdir [backlog] -> appends a row to results
  # Row: name accept-rate relay-rate accept-s relay-s peak-rss peak-pss. With a backlog,
  # BACKLOG messages go in first; the accept rate is the measured MESSAGES' while the MTA
  # drains them, the relay rate counts every message from the first injection on.
  local name=$1 pids=$2 port=$3 sink=$4 pre=${5:-0} t0 start accepted last n total
  total=$((pre + M))
  # The sink's files of the previous measurement are moved aside, not deleted: ext4 skips
  # inodes freed in the last 60-300 s when it allocates one, so deleting 5,000 files before
  # each measurement made every later daemon's (and sink's) file creations slower, an order
  # penalty that grew through the run. They are deleted with the temp dir at the end.
  if [ -n "$(ls -A "$sink")" ]; then
    MEASURED=$((${MEASURED:-0} + 1)); mv "$sink" "$sink.old.$MEASURED"; mkdir "$sink"; chown postfix "$sink"
  fi
  sample_mem "$pids" "$D/mem-$name" & SAMPLER=$!
  t0=$(now)
  if [ "$pre" -gt 0 ]; then
    if ! smtp-source -s "$S" -m "$pre" -l "$L" -f a@src.test -t b@bench.test "127.0.0.1:$port" >"$D/backlog-$name.out" 2>&1; then
      echo "accept-relay: smtp-source (backlog) against $name failed:" >&2; cat "$D/backlog-$name.out" >&2; exit 1
    fi
  fi
  start=$(now)
  if [ "$pre" -gt 0 ]; then
    n=$(find "$sink" -type f | wc -l)
    python3 -c "import sys; p,t0,s,n=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]),int(sys.argv[4]); print(f'  {sys.argv[5]:<10} backlog: {p} msgs accepted in {s-t0:.2f} s = {p/(s-t0):.0f} msg/s; {p-n} still queued as the measured injection starts')" "$pre" "$t0" "$start" "$n" "$name"
  fi
  if ! smtp-source -s "$S" -m "$M" -l "$L" -f a@src.test -t b@bench.test "127.0.0.1:$port" >"$D/source-$name.out" 2>&1; then
    echo "accept-relay: smtp-source against $name failed:" >&2; cat "$D/source-$name.out" >&2; exit 1
  fi
  accepted=$(now)
  for _ in $(seq 1 $((DRAIN_LIMIT * 10))); do
    n=$(find "$sink" -type f | wc -l)
    [ "$n" -ge "$total" ] && break
    sleep 0.1
  done
  kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
  n=$(find "$sink" -type f | wc -l)
  if [ "$n" -lt "$total" ]; then echo "accept-relay: $name relayed only $n of $total messages in ${DRAIN_LIMIT}s" >&2; exit 1; fi
  if [ -s "$D/source-$name.out" ]; then echo "accept-relay: smtp-source said, for $name:" >&2; head -5 "$D/source-$name.out" >&2; fi
  last=$(find "$sink" -type f -printf '%T@\n' | sort -n | tail -1)
  rss=0; pss=0
  read -r rss pss < "$D/mem-$name" || true
  python3 - "$name" "$t0" "$start" "$accepted" "$last" "$M" "$total" "$rss" "$pss" >> "$D/results" <<'PY'
import sys
n,t0,s,a,l,m,total,rss,pss=sys.argv[1],*map(float,sys.argv[2:])
print(n, f"{m/(a-s):.1f}", f"{total/(l-t0):.1f}", f"{a-s:.3f}", f"{l-t0:.3f}", int(rss), int(pss))
PY
  tail -1 "$D/results" | awk '{printf "  %-10s accepted %d msgs in %6.2f s = %7.0f msg/s; relayed '"$total"' in %6.2f s = %7.0f msg/s\n", $1, '"$M"', $4, $2, $5, $3}'
}

measure_nodisk() { # the same load straight into an smtp-sink that writes nothing
  local start accepted
  start=$(now)
  if ! smtp-source -s "$S" -m "$M" -l "$L" -f a@src.test -t b@bench.test "127.0.0.1:$NDSINK" >"$D/source-nodisk.out" 2>&1; then
    echo "accept-relay: smtp-source against the no-disk sink failed:" >&2; cat "$D/source-nodisk.out" >&2; exit 1
  fi
  accepted=$(now)
  python3 -c "import sys; s,a,m=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]); print('nodisk', f'{m/(a-s):.1f}', 0, f'{a-s:.3f}', 0, 0, 0)" "$start" "$accepted" "$M" >> "$D/results"
  tail -1 "$D/results" | awk '{printf "  %-10s accepted %d msgs in %6.2f s = %7.0f msg/s (smtp-source into smtp-sink, no MTA, no disk)\n", $1, '"$M"', $4, $2}'
}

mp_round() { # name policy [backlog] [binary]
  local prof=""
  # PROFILE=1 profiles the first plain round; PROFILE=rules the first plain and the first
  # RULES round, each into its own file, so the two profiles come from the same run.
  if [ ! -e "$D/perf-$1.data" ]; then
    case "${PROFILE:-}:$1" in 1:mailpolicy | rules:mailpolicy | rules:rules*) prof="$D/perf-$1.data" ;; esac
  fi
  mp_start "$2" "${4:-$BIN}" "$prof"
  measure "$1" mp_pids "$MPPORT" "$D/sink-mailpolicy" "${3:-0}"
  HWM=$(awk '/^VmHWM:/{print $2}' "/proc/$MPPID/status")
  # The daemon's CPU time (user, system; clock ticks) for the whole round: per message it
  # is the A/B figure that a busy machine disturbs least.
  read -r UT ST < <(sed 's/.*) //' "/proc/$MPPID/stat" | awk '{print $12, $13}')
  echo "$1 $HWM $UT $ST $(( ${3:-0} + M ))" >> "$D/hwm"
  mp_stop
  # Moved aside, not deleted (see the sinks in measure()): the next daemon starts afresh.
  SPOOLS=$((${SPOOLS:-0} + 1)); mv "$MP/spool" "$MP/spool.old.$SPOOLS"
}

echo "accept-relay: $S sessions x $M messages of $L bytes, $ROUNDS round(s)$([ "$BACKLOG" -gt 0 ] && echo ", then a round behind a backlog of $BACKLOG")$([ "$RULES" -gt 0 ] && echo ", plus a $RULES-rule policy"); ports postfix $PFPORT->$PFSINK, mailpolicy $MPPORT->$MPSINK, no-disk sink $NDSINK"
echo "  load before: $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r (load $(cut -d' ' -f1 /proc/loadavg))"
  pf_start
  measure postfix pf_pids "$PFPORT" "$D/sink-postfix"
  pf_stop
  # The daemons of a round: the plain policy (A), the second binary (B), the RULES policy
  # (and with both, the RULES policy under B). The order reverses every other round (odd
  # rounds A, B, rules, rules-B; even rounds the other way round):
  # a daemon run right after another is 10-25 % slower whichever it is (it finds the
  # previous daemon's and sink's deleted files in the file system's inode tables), so A
  # against B and the plain policy against the rules are each first in half the rounds.
  order=(A); [ -n "$BIN_B" ] && order+=(B); [ "$RULES" -gt 0 ] && order+=(R)
  [ -n "$BIN_B" ] && [ "$RULES" -gt 0 ] && order+=(RB)
  if [ $((r % 2)) = 0 ]; then order=($(printf '%s\n' "${order[@]}" | tac)); fi
  for o in "${order[@]}"; do
    case $o in
      A) mp_round mailpolicy "$MP/bench.mailpolicy" ;;
      B) mp_round mailpolicy-B "$MP/bench.mailpolicy" 0 "$BIN_B" ;;
      R) mp_round "rules$RULES" "$MP/rules.mailpolicy" ;;
      RB) mp_round "rules$RULES-B" "$MP/rules.mailpolicy" 0 "$BIN_B" ;;
    esac
  done
  measure_nodisk
done
if [ "$BACKLOG" -gt 0 ]; then
  echo "backlog round: $BACKLOG messages first, then $M measured while they drain (load $(cut -d' ' -f1 /proc/loadavg))"
  pf_start
  measure postfix-backlog pf_pids "$PFPORT" "$D/sink-postfix" "$BACKLOG"
  pf_stop
  mp_round mailpolicy-backlog "$MP/bench.mailpolicy" "$BACKLOG"
fi

python3 - "$D/results" "$D/hwm" "$RULES" "$BIN_B" <<PY
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
hwm = [l.split() for l in open(sys.argv[2])]
rules = int(sys.argv[3])
bin_b = sys.argv[4]
tick = int("$(getconf CLK_TCK)")
def us(h, col=None):
    # microseconds of daemon CPU per message (user + system, or one of them)
    t = (int(h[2]) + int(h[3])) if col is None else int(h[col])
    return t * 1e6 / tick / int(h[4])
def med(name, col):
    v = [float(r[col]) for r in rows if r[0] == name]
    return statistics.median(v) if v else None
pa, pr = med("postfix", 1), med("postfix", 2)
ma, mr = med("mailpolicy", 1), med("mailpolicy", 2)
na = med("nodisk", 1)
prss, ppss = med("postfix", 5), med("postfix", 6)
mrss, mpss = med("mailpolicy", 5), med("mailpolicy", 6)
print()
print(f"{'':30}{'Postfix':>10}{'mailpolicy':>12}{'ratio':>8}")
print(f"{'accept rate (msg/s)':30}{pa:10.0f}{ma:12.0f}{ma/pa:8.2f}")
print(f"{'relay rate (msg/s)':30}{pr:10.0f}{mr:12.0f}{mr/pr:8.2f}")
print(f"{'peak RSS, summed (MB)':30}{prss/1024:10.1f}{mrss/1024:12.1f}{mrss/prss:8.2f}")
print(f"{'peak PSS, summed (MB)':30}{ppss/1024:10.1f}{mpss/1024:12.1f}{mpss/ppss:8.2f}")
print(f"{'daemon VmHWM (MB)':30}{'':>10}{statistics.median(int(h[1]) for h in hwm if h[0] == 'mailpolicy')/1024:12.1f}")
print(f"{'daemon CPU per message (us)':30}{'':>10}{statistics.median(us(h) for h in hwm if h[0] == 'mailpolicy'):12.0f}   (user + system, accept and relay)")
print()
print(f"{'no-disk limit (msg/s)':30}{na:10.0f}   (smtp-source -> smtp-sink, same sessions and sizes)")
print(f"{'mailpolicy accept / no-disk':30}{ma/na:10.2f}")
print(f"{'mailpolicy relay / accept':30}{mr/ma:10.2f}")
print(f"{'Postfix accept / no-disk':30}{pa/na:10.2f}")
if rules:
    ra = med(f"rules{rules}", 1)
    print(f"{f'accept, {rules}-rule policy':30}{ra:10.0f}   = {ra/ma:.3f} x the plain policy's {ma:.0f} (same rounds)")
    for r, h in zip([r for r in rows if r[0] in ("mailpolicy", f"rules{rules}")], [h for h in hwm if h[0] in ("mailpolicy", f"rules{rules}")]):
        print(f"  {'plain' if r[0] == 'mailpolicy' else 'rules'}: accept {float(r[1]):7.0f}  relay {float(r[2]):7.0f}  {us(h):5.0f} us CPU/msg ({us(h, 2):.0f} user, {us(h, 3):.0f} system)")
    cp, cr = (statistics.median(us(h) for h in hwm if h[0] == n) for n in ("mailpolicy", f"rules{rules}"))
    print(f"  median CPU per message: rules {cr:.0f} us / plain {cp:.0f} us = {cr/cp:.2f}")
pb, mb = med("postfix-backlog", 1), med("mailpolicy-backlog", 1)
if pb and mb:
    print(f"{'accept behind backlog':30}{pb:10.0f}{mb:12.0f}{mb/pb:8.2f}")
    print(f"{'  / own accept without':30}{pb/pa:10.2f}{mb/ma:12.2f}")
    print(f"{'relay behind backlog (all)':30}{med('postfix-backlog', 2):10.0f}{med('mailpolicy-backlog', 2):12.0f}{med('mailpolicy-backlog', 2)/med('postfix-backlog', 2):8.2f}")
if bin_b:
    ba, br = med("mailpolicy-B", 1), med("mailpolicy-B", 2)
    print()
    print(f"A/B, same rounds: A = {'$BIN'}, B = {bin_b}")
    cpu = [h for h in hwm if h[0] in ("mailpolicy", "mailpolicy-B")]
    for r, h in zip([r for r in rows if r[0] in ("mailpolicy", "mailpolicy-B")], cpu):
        print(f"  {'A' if r[0] == 'mailpolicy' else 'B'}: accept {float(r[1]):7.0f}  relay {float(r[2]):7.0f}  relay/accept {float(r[2])/float(r[1]):.2f}  {us(h):5.0f} us CPU/msg ({us(h, 2):.0f} user, {us(h, 3):.0f} system)")
    ca, cb = (statistics.median(us(h) for h in cpu if h[0] == n) for n in ("mailpolicy", "mailpolicy-B"))
    print(f"  median B / A: accept {ba/ma:.2f}, relay {br/mr:.2f}, CPU per message {cb/ca:.2f}; B / Postfix: accept {ba/pa:.2f}, relay {br/pr:.2f}")
    if rules:
        rb = med(f"rules{rules}-B", 1)
        crb = statistics.median(us(h) for h in hwm if h[0] == f"rules{rules}-B")
        cra = statistics.median(us(h) for h in hwm if h[0] == f"rules{rules}")
        print(f"  {rules}-rule policy: A {ra:.0f} msg/s ({ra/ma:.3f} x A plain), {cra:.0f} us CPU/msg; B {rb:.0f} msg/s ({rb/ba:.3f} x B plain), {crb:.0f} us CPU/msg")
print()
print("issue 13 goals (medians of this run):")
def goal(text, ok, figure):
    print(f"  {'met    ' if ok else 'NOT met'}  {text:44} {figure}")
goal("accept >= 5x Postfix", ma / pa >= 5, f"{ma/pa:.2f}x")
goal("relay >= 5x Postfix", mr / pr >= 5, f"{mr/pr:.2f}x")
goal("relay >= 0.9x own accept", mr / ma >= 0.9, f"{mr/ma:.2f}x")
goal("accept >= 0.8x no-disk limit", ma / na >= 0.8, f"{ma/na:.2f}x ({ma:.0f} of {na:.0f} msg/s)")
if pb and mb:
    goal("accept behind backlog not below own (-5 %)", mb / ma >= 0.95, f"{mb/ma:.2f}x ({mb:.0f} vs {ma:.0f} msg/s)")
else:
    print("  (no backlog round: BACKLOG=50000 adds it)")
if rules:
    goal(f"{rules}-rule policy within 5 % of plain", ra / ma >= 0.95, f"{ra/ma:.3f}x")
else:
    print("  (no rules round: RULES=200 adds it)")
PY
for pd in "$D"/perf-*.data; do
  [ -e "$pd" ] || continue
  echo
  echo "profile of the daemon, first $(basename "$pd" .data | sed 's/^perf-//') round (self time, entries of 0.7 % and more):"
  perf report -i "$pd" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.7 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | head -40  || true
  echo "inclusive (children), 5 % and more:"
  perf report -i "$pd" --stdio --children --sort symbol -g none --percent-limit 5 2>/dev/null |
    grep -v '^#' | grep -v '^$' | sed 's/ *- *- *$//' | head -40  || true
done
echo
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r), $(df -T "$D" | awk 'NR==2{print $2}') on /tmp"
echo "postfix: $(postconf -d -h mail_version 2>/dev/null) ($(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo '?')); mailpolicy: $(if [ -n "${MAILC:-}" ]; then echo "MAILC=$MAILC"; else cd "$ROOT" && echo "$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet HEAD -- runtime stdlib lang 2>/dev/null || echo '+local changes')"; fi)"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
echo "reproduce: $CMD"
