#!/usr/bin/env bash
# How long `mailc check` takes on a policy of 10,000 rules (issue: "well under a second").
# Usage: bench/check-10k.sh [RULES]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10000}
cargo build --release -q -p mailc
BIN=target/release/mailc
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
POLICY=$DIR/big.mailpolicy
{
  echo 'require ["dnsbl"];'
  echo 'list local_domains = domains ["example.com", ".example.com"];'
  echo 'list trusted = cidr ["10.0.0.0/8", "192.0.2.0/24"];'
  echo 'table users = map "users";'
  echo 'on connect {'
  echo '  if client.ip in trusted { set internal; }'
  echo '  if dnsbl "zen.example.net" { reject 554 5.7.1 "listed by ${dnsbl.zone}"; }'
  echo '}'
  echo 'on rcpt {'
  for i in $(seq 1 "$N"); do
    case $((i % 4)) in
      0) echo "  if recipient :is \"user$i@example.com\" and not flag internal { reject 550 5.1.1 \"User user$i unknown\"; }" ;;
      1) echo "  if sender.domain :matches \"*.spam$i.example\" { tempfail 451 4.7.1 \"Try later ($i)\"; }" ;;
      2) echo "  if helo.name :regex \"^bad$i[0-9]+\\\\.example\$\" { reject 550 5.7.1 \"Bad HELO $i\"; }" ;;
      3) echo "  if recipient.domain in local_domains and recipient.local :is \"x$i\" and lookup users recipient :is \"gone\" { reject 550 5.1.6 \"Moved ($i)\"; }" ;;
    esac
  done
  echo '}'
} > "$POLICY"
echo "policy: $N rules, $(wc -c < "$POLICY") bytes"
"$BIN" check "$POLICY" >/dev/null 2>&1 || { "$BIN" check "$POLICY"; exit 1; }
times=()
for _ in 1 2 3 4 5; do
  s=$(date +%s%N)
  "$BIN" check "$POLICY" >/dev/null 2>&1
  e=$(date +%s%N)
  times+=($(( (e - s) / 1000000 )))
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n | tr '\n' ' ')
median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
echo "mailc check, 5 runs (ms): $sorted"
echo "median: ${median} ms for $N rules"
if command -v /usr/bin/time >/dev/null; then
  /usr/bin/time -f "max RSS: %M KiB" "$BIN" check "$POLICY" >/dev/null 2>/dev/null || true
fi
