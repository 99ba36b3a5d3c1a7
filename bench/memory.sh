#!/usr/bin/env bash
# Peak memory of `mailc serve` receiving N concurrent messages of SIZE bytes (issue 10.2):
# every session streams its message past the first MiB into the spool, so the peak stays
# bounded whatever the messages' size. The policy holds every message (`hold`), so what is
# measured is the receiving side: sessions, engine, spool writes.
#
# Usage: bench/memory.sh [SESSIONS=200] [SIZE_MB=25]
# Prints the daemon's peak RSS (VmHWM) before and after the burst, and its RSS once idle.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
MB=${2:-25}
cargo build -q --release -p mailc
D=$(mktemp -d /tmp/mailpolicy-mem.XXXXXX)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$D"' EXIT
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$D/policy.mailpolicy" <<POLICY
list local = domains ["d.test"];
server { hostname "mx.test"; spool "spool"; maildir "mail"; local_domains local; max_message_size 30M; max_sessions 1000; client_connection_limit 0; }
listener smtp { address "127.0.0.1:$PORT"; tls none; }
on data { hold "benchmark"; }
route { deliver maildir; }
POLICY
./target/release/mailc serve --policy "$D/policy.mailpolicy" --user "$(id -un)" 2>"$D/log" &
PID=$!
for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$PORT)).close()" 2>/dev/null && break; sleep 0.1; done
grep VmHWM /proc/$PID/status | sed 's/^/before: /'
python3 - "$PORT" "$N" "$MB" <<'PY'
import socket, sys, threading
port, n, mb = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n"
chunk = line * (1024 * 1024 // len(line))
ok = []
start = threading.Barrier(n)
def one(i):
    start.wait()
    s = socket.create_connection(("127.0.0.1", port)); f = s.makefile("rb")
    def reply():
        while True:
            l = f.readline()
            if l[3:4] != b"-": return l
    reply(); s.sendall(b"EHLO bench.test\r\n"); reply()
    s.sendall(b"MAIL FROM:<a@d.test>\r\n"); reply(); s.sendall(b"RCPT TO:<u@d.test>\r\n"); reply()
    s.sendall(b"DATA\r\n"); reply()
    s.sendall(b"Subject: memory benchmark\r\n\r\n")
    for _ in range(mb): s.sendall(chunk)
    s.sendall(b".\r\n"); r = reply(); ok.append(r.startswith(b"250")); s.sendall(b"QUIT\r\n"); s.close()
ts = [threading.Thread(target=one, args=(i,)) for i in range(n)]
[t.start() for t in ts]; [t.join() for t in ts]
print(f"accepted: {sum(ok)} of {n} messages of {mb} MB")
PY
grep VmHWM /proc/$PID/status | sed 's/^/peak:   /'
sleep 12
echo "sessions cut off: $(grep -c " timeout " "$D/log" || true), refused: $(grep -c " refused " "$D/log" || true), failed stores: $(grep -c "store-failed" "$D/log" || true)"
grep -E " timeout | refused |store-failed" "$D/log" | head -3
grep VmRSS /proc/$PID/status | sed 's/^/idle:   /'
