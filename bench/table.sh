#!/usr/bin/env bash
# A 1,000,000-entry `map` table (issue 13): how long it takes to load and to look up, as
# text and compiled (`mailc table compile`, a cdb file beside the source), and what the
# daemon pays for it: start-up until it listens, and the first RCPT that needs the table.
#
# Usage: bench/table.sh [ENTRIES=1000000]
# Environment: NO_BUILD=1 skips `cargo build --release`; MAILC=PATH another binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000000}
BIN=${MAILC:-$PWD/target/release/mailc}
if [ -z "${NO_BUILD:-}" ] && [ -z "${MAILC:-}" ]; then cargo build -q --release -p mailc; fi
D=$(mktemp -d /tmp/mailpolicy-table.XXXXXX)
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$D"' EXIT
echo "table: $N entries; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 - "$N" "$D" <<'PY'
import random, sys
n, d = int(sys.argv[1]), sys.argv[2]
with open(f"{d}/users", "w") as f:
    for i in range(n): f.write(f"user{i}@example{i % 1000}.com mailhost{i % 17}.example.net\n")
r = random.Random(1)
with open(f"{d}/keys", "w") as f:   # half hits, half misses, in random order
    for _ in range(n):
        i = r.randrange(2 * n); f.write(f"user{i}@example{i % 1000}.com\n")
PY
echo "source: $(du -m "$D/users" | cut -f1) MB"
t0=$(date +%s.%N); "$BIN" table compile "$D/users" >/dev/null; t1=$(date +%s.%N)
echo "mailc table compile: $(python3 -c "print(f'{$t1-$t0:.2f}')") s, users.cdb $(du -m "$D/users.cdb" | cut -f1) MB"
# Lookups through the daemon's own code (load, then every key of the file once).
"$BIN" table query --stats --source "$D/users" <"$D/keys" 2>&1 >/dev/null | sed 's/^mailc table query: /text:     /'
"$BIN" table query --stats "$D/users" <"$D/keys" 2>&1 >/dev/null | sed 's/^mailc table query: /compiled: /'
cmp <("$BIN" table query --source "$D/users" <"$D/keys") <("$BIN" table query "$D/users" <"$D/keys") && echo "answers: the compiled table and the text agree on all $N keys"

# The daemon: start-up (policy check with the open-relay proof, which reads the text) and
# the first RCPT that looks the table up (the table is loaded then), text against compiled.
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$D/policy.mailpolicy" <<POLICY
list local = domains ["example0.com", "example1.com"];
table users = map "users";
server { hostname "mx.test"; spool "spool"; maildir "mail"; local_domains local; }
listener smtp { address "127.0.0.1:$PORT"; tls none; }
on rcpt {
  if recipient.domain not in local { reject 554 5.7.1 "Relay access denied"; }
  if recipient not in users { reject 550 5.1.1 "No such user"; }
  accept;
}
route { deliver maildir; }
POLICY
daemon() { # label
  local t0 t1 t2
  t0=$(date +%s.%N)
  "$BIN" serve --policy "$D/policy.mailpolicy" --user "$(id -un)" 2>"$D/log-$1" & PID=$!
  for _ in $(seq 600); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT)).close()" 2>/dev/null && break; sleep 0.05; done
  t1=$(date +%s.%N)
  python3 - "$PORT" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); f = s.makefile("rb")
def reply():
    while True:
        l = f.readline()
        if l[3:4] != b"-": return l
reply(); s.sendall(b"EHLO b.test\r\n"); reply(); s.sendall(b"MAIL FROM:<a@b.test>\r\n"); reply()
s.sendall(b"RCPT TO:<user1000@example0.com>\r\n"); r1 = reply()
s.sendall(b"RCPT TO:<nobody@example0.com>\r\n"); r2 = reply()
assert r1.startswith(b"250") and r2.startswith(b"550"), (r1, r2)
PY
  t2=$(date +%s.%N)
  echo "daemon, $1: listening $(python3 -c "print(f'{$t1-$t0:.2f}')") s after start; first RCPT answered (table loaded) $(python3 -c "print(f'{$t2-$t1:.2f}')") s later; RSS $(( $(awk '/^VmRSS:/{print $2}' /proc/$PID/status) / 1024 )) MB"
  kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
}
mv "$D/users.cdb" "$D/users.cdb.off"
daemon text
mv "$D/users.cdb.off" "$D/users.cdb"
daemon compiled
grep -h "table" "$D"/log-* | head -3 || true
echo "mailpolicy: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- runtime stdlib lang 2>/dev/null || echo '+local changes'); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "reproduce: bench/table.sh $N"
