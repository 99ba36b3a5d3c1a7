#!/usr/bin/env bash
# Memory of `mailc serve` holding N idle SMTP sessions (issue 13): each client connects,
# reads the greeting, says EHLO and then waits. Prints the daemon's RSS before, with all N
# sessions open (and per session), its peak (VmHWM), and its RSS some seconds after every
# session closed (is the memory given back?).
#
# Usage: bench/idle-sessions.sh [SESSIONS=10000]
# Environment: NO_BUILD=1 skips `cargo build --release`; MAILC=PATH benchmarks another
# binary (A/B; implies NO_BUILD).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
BIN=${MAILC:-$PWD/target/release/mailc}
if [ -z "${NO_BUILD:-}" ] && [ -z "${MAILC:-}" ]; then cargo build -q --release -p mailc; fi
# Each side (the daemon, the client) holds one descriptor per session.
WANT=$((N + 1000)); HARD=$(ulimit -Hn)
[ "$HARD" != unlimited ] && [ "$HARD" -lt "$WANT" ] && { echo "idle-sessions: needs $WANT open files, the hard limit is $HARD" >&2; exit 2; }
ulimit -n "$WANT"
D=$(mktemp -d /tmp/mailpolicy-idle.XXXXXX)
PID=""
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$D"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$D/policy.mailpolicy" <<POLICY
list local = domains ["d.test"];
server { hostname "mx.test"; spool "spool"; maildir "mail"; local_domains local; max_sessions $((N * 2)); client_connection_limit 0; }
listener smtp { address "127.0.0.1:$PORT"; tls none; }
on rcpt { accept; }
route { deliver maildir; }
POLICY
"$BIN" serve --policy "$D/policy.mailpolicy" --user "$(id -un)" 2>"$D/log" &
PID=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT)).close()" 2>/dev/null && break; sleep 0.1; done
rss() { awk '/^VmRSS:/{print $2}' "/proc/$PID/status"; }
BEFORE=$(rss)
echo "idle-sessions: $N sessions; load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "before:            $((BEFORE / 1024)) MB RSS"
python3 - "$PORT" "$N" "$PID" "$BEFORE" <<'PY'
import selectors, socket, sys, time
port, n, pid, before = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def rss():
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])
sel = selectors.DefaultSelector()
socks, state = [], {}
# Open in batches of 500 so the listen backlog never overflows.
for base in range(0, n, 500):
    batch = []
    for _ in range(min(500, n - base)):
        s = socket.create_connection(("127.0.0.1", port)); s.setblocking(False)
        socks.append(s); batch.append(s); state[s] = [b"", 0]
        sel.register(s, selectors.EVENT_READ)
    pending = set(batch)
    deadline = time.time() + 60
    while pending and time.time() < deadline:
        for key, _ in sel.select(timeout=1):
            s = key.fileobj; buf = s.recv(4096)
            if not buf: raise SystemExit("a session closed early")
            st = state[s]; st[0] += buf
            # Greeting, then the EHLO reply (its last line has a space after the code).
            while b"\r\n" in st[0]:
                line, st[0] = st[0].split(b"\r\n", 1)
                if line[3:4] == b" ":
                    st[1] += 1
                    if st[1] == 1: s.sendall(b"EHLO idle.bench.test\r\n")
                    elif st[1] == 2: pending.discard(s)
    if pending: raise SystemExit(f"{len(pending)} sessions got no EHLO reply")
time.sleep(3)
held = rss()
print(f"{n} sessions open: {held // 1024} MB RSS, {(held - before) / n:.1f} KB per session")
for s in socks: s.close()
PY
HWM=$(awk '/^VmHWM:/{print $2}' "/proc/$PID/status")
echo "peak (VmHWM):      $((HWM / 1024)) MB"
sleep 12
AFTER=$(rss)
echo "12 s after close:  $((AFTER / 1024)) MB RSS ($(( (AFTER - BEFORE) / 1024 )) MB above the start)"
echo "timeouts/refusals in the log: $(grep -cE ' timeout | refused ' "$D/log" || true)"
echo "mailpolicy: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- runtime 2>/dev/null || echo '+local changes'); load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "reproduce: bench/idle-sessions.sh $N"
