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
#
# Usage: bench/accept-relay.sh [SESSIONS] [MESSAGES] [SIZE] [ROUNDS]
#   SESSIONS  parallel smtp-source sessions (default 20)
#   MESSAGES  messages in total per MTA and round (default 5000)
#   SIZE      message size in bytes (default 2000)
#   ROUNDS    rounds, each measuring Postfix then mailpolicy (default 1); the table shows
#             the median of the rounds, every round is printed as it ends
# Environment: NO_BUILD=1 skips `cargo build --release`; MAILC=PATH benchmarks another mailc
# binary (for A/B comparisons; implies NO_BUILD); KEEP=1 keeps the temp dir.
# Needs root (Postfix's master), postfix, smtp-source, smtp-sink, python3.
set -euo pipefail
S=${1:-20}; M=${2:-5000}; L=${3:-2000}; ROUNDS=${4:-1}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CMD="bench/accept-relay.sh $S $M $L $ROUNDS"
BIN=${MAILC:-$ROOT/target/release/mailc}
DRAIN_LIMIT=${DRAIN_LIMIT:-150}

for t in /usr/sbin/postfix /usr/sbin/smtp-source /usr/sbin/smtp-sink python3; do
  command -v "$t" >/dev/null || { echo "accept-relay: $t is missing (apt-get install postfix python3)" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "accept-relay: needs root (Postfix's master runs as root)" >&2; exit 2; }
if [ -z "${NO_BUILD:-}" ] && [ -z "${MAILC:-}" ]; then
  (cd "$ROOT" && cargo build --release -q -p mailc)
fi
[ -x "$BIN" ] || { echo "accept-relay: $BIN not built" >&2; exit 2; }

D=$(mktemp -d /tmp/accept-relay.XXXXXX); chmod 755 "$D"
SINKPIDS=(); MPPID=""; SAMPLER=""
cleanup() {
  set +e
  [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null && wait "$SAMPLER" 2>/dev/null
  pf_stop
  if [ -n "$MPPID" ]; then kill "$MPPID" 2>/dev/null; wait "$MPPID" 2>/dev/null; fi
  for p in "${SINKPIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  if [ -z "${KEEP:-}" ]; then rm -rf "$D"; else echo "kept $D" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Four free loopback ports.
read -r PFPORT PFSINK MPPORT MPSINK < <(python3 - <<'PY'
import socket
ss=[socket.socket() for _ in range(4)]
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
mp_start() {
  "$BIN" serve --policy "$MP/bench.mailpolicy" --spool "$MP/spool" >>"$MP/log" 2>&1 </dev/null & MPPID=$!
  wait_listen "$MPPORT"
}
mp_stop() { kill "$MPPID" 2>/dev/null || true; wait "$MPPID" 2>/dev/null || true; MPPID=""; }
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
    echo "$peak_rss $peak_pss" > "$2"
    sleep 0.2
  done
}

# ---------------------------------------------------------------- one measurement
measure() { # name pids-function port sinkdir -> appends "name accept relay rss pss" to results
  local name=$1 pids=$2 port=$3 sink=$4 start accepted last n
  rm -rf "${sink:?}"/*
  sample_mem "$pids" "$D/mem-$name" & SAMPLER=$!
  start=$(now)
  if ! smtp-source -s "$S" -m "$M" -l "$L" -f a@src.test -t b@bench.test "127.0.0.1:$port" >"$D/source-$name.out" 2>&1; then
    echo "accept-relay: smtp-source against $name failed:" >&2; cat "$D/source-$name.out" >&2; exit 1
  fi
  accepted=$(now)
  for _ in $(seq 1 $((DRAIN_LIMIT * 10))); do
    n=$(find "$sink" -type f | wc -l)
    [ "$n" -ge "$M" ] && break
    sleep 0.1
  done
  kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null || true; SAMPLER=""
  n=$(find "$sink" -type f | wc -l)
  if [ "$n" -lt "$M" ]; then echo "accept-relay: $name relayed only $n of $M messages in ${DRAIN_LIMIT}s" >&2; exit 1; fi
  if [ -s "$D/source-$name.out" ]; then echo "accept-relay: smtp-source said, for $name:" >&2; head -5 "$D/source-$name.out" >&2; fi
  last=$(find "$sink" -type f -printf '%T@\n' | sort -n | tail -1)
  read -r rss pss < "$D/mem-$name"
  python3 - "$name" "$start" "$accepted" "$last" "$M" "$rss" "$pss" >> "$D/results" <<'PY'
import sys
n,s,a,l,m,rss,pss=sys.argv[1],*map(float,sys.argv[2:])
print(n, f"{m/(a-s):.1f}", f"{m/(l-s):.1f}", f"{a-s:.3f}", f"{l-s:.3f}", int(rss), int(pss))
PY
  tail -1 "$D/results" | awk '{printf "  %-10s accepted %d msgs in %6.2f s = %7.0f msg/s; relayed in %6.2f s = %7.0f msg/s\n", $1, '"$M"', $4, $2, $5, $3}'
}

echo "accept-relay: $S sessions x $M messages of $L bytes, $ROUNDS round(s); ports postfix $PFPORT->$PFSINK, mailpolicy $MPPORT->$MPSINK"
echo "  load before: $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r"
  pf_start
  measure postfix pf_pids "$PFPORT" "$D/sink-postfix"
  pf_stop
  mp_start
  measure mailpolicy mp_pids "$MPPORT" "$D/sink-mailpolicy"
  HWM=$(awk '/^VmHWM:/{print $2}' "/proc/$MPPID/status")
  echo "$HWM" >> "$D/hwm"
  mp_stop
  rm -rf "$MP/spool"
done

python3 - "$D/results" "$D/hwm" <<PY
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
hwm = [int(x) for x in open(sys.argv[2])]
def med(name, col):
    return statistics.median(float(r[col]) for r in rows if r[0] == name)
pa, pr = med("postfix", 1), med("postfix", 2)
ma, mr = med("mailpolicy", 1), med("mailpolicy", 2)
prss, ppss = med("postfix", 5), med("postfix", 6)
mrss, mpss = med("mailpolicy", 5), med("mailpolicy", 6)
print()
print(f"{'':24}{'Postfix':>12}{'mailpolicy':>12}{'ratio':>8}")
print(f"{'accept rate (msg/s)':24}{pa:12.0f}{ma:12.0f}{ma/pa:8.2f}")
print(f"{'relay rate (msg/s)':24}{pr:12.0f}{mr:12.0f}{mr/pr:8.2f}")
print(f"{'peak RSS, summed (MB)':24}{prss/1024:12.1f}{mrss/1024:12.1f}{mrss/prss:8.2f}")
print(f"{'peak PSS, summed (MB)':24}{ppss/1024:12.1f}{mpss/1024:12.1f}{mpss/ppss:8.2f}")
print(f"{'daemon VmHWM (MB)':24}{'':>12}{statistics.median(hwm)/1024:12.1f}")
PY
echo
echo "machine: $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), kernel $(uname -r), $(df -T "$D" | awk 'NR==2{print $2}') on /tmp"
echo "postfix: $(postconf -d -h mail_version 2>/dev/null) ($(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo '?')); mailpolicy: $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null)$(cd "$ROOT" && git diff --quiet HEAD -- runtime 2>/dev/null || echo '+local changes')"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg), rustc processes: $(pgrep -c rustc || true)"
echo "reproduce: $CMD"
