#!/usr/bin/env bash
# The Debian package end to end (issue 14): build it with cargo-deb from the metadata in
# runtime/cli/Cargo.toml, install it with dpkg, start the installed daemon the way its
# systemd unit does (when systemd is PID 1: `systemctl start`; otherwise the unit's own
# ExecStartPre/ExecStart lines, with its UMask, capability bounding set and
# NoNewPrivileges through setpriv, and a NOTIFY_SOCKET this script listens on), send mail
# through it with swaks and /usr/sbin/sendmail (as root and as another user), read mailq,
# flush and reload through the control socket, stop it, then remove and purge the package.
#
# Run by tests/run.sh (as root). The package is built from the debug binary the suite has
# just built (`cargo deb --profile dev --no-build`: the same metadata and files, without a
# second, release build of the workspace); a release package is `cargo deb -p mailc`.
# Postfix (installed for the other tests' peers) also provides mail-transport-agent, which
# the package conflicts with: its sendmail, mailq and newaliases are diverted aside for the
# test (diversions that let only the mailpolicy package's files have those names), the package is installed with --force-conflicts, and everything is put back after.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "deb.sh: installing a package needs root; run as root (CI does)" >&2
  exit 1
fi
for p in dpkg-deb swaks socat setpriv runuser; do
  command -v "$p" >/dev/null || { echo "deb.sh: $p missing (tests/run.sh installs it)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/mailpolicy-deb.XXXXXX)
chmod 755 "$work"
pid=""
socat_pid=""
diverted=()
fail() { echo "deb.sh: FAILED: $*" >&2; [ -f "$work/daemon.log" ] && tail -n 40 "$work/daemon.log" >&2; exit 1; }
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  [ -n "$socat_pid" ] && kill "$socat_pid" 2>/dev/null || true
  if dpkg -s mailpolicy >/dev/null 2>&1; then dpkg -P mailpolicy >/dev/null 2>&1 || true; fi
  for f in "${diverted[@]}"; do dpkg-divert --quiet --package mailpolicy --rename --remove "$f" || true; done
  rm -rf /var/lib/mailpolicy
  userdel mailpolicy >/dev/null 2>&1 || true
  groupdel mailpolicy >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# cargo-deb: from crates.io through cargo when missing (it is a cargo subcommand, not a
# Debian package); pinned, as the metadata and the flags below are its.
if ! cargo deb --version >/dev/null 2>&1; then
  cargo install cargo-deb --version 3.8.0 --locked
fi
cargo build -q -p mailc
cargo deb -p mailc --profile dev --no-build --fast -o "$work/mailpolicy.deb" 2>"$work/cargo-deb.log" \
  || { cat "$work/cargo-deb.log" >&2; fail "cargo deb"; }
deb="$work/mailpolicy.deb"
dpkg-deb -I "$deb" >"$work/control"
dpkg-deb -c "$deb" >"$work/contents"
grep -q "Provides: mail-transport-agent" "$work/control" || fail "control fields"
for f in ./usr/sbin/mailc ./usr/sbin/sendmail ./usr/bin/mailq ./usr/bin/newaliases \
  ./etc/mailpolicy/main.mailpolicy ./usr/lib/systemd/system/mailpolicy.service; do
  grep -q " $f" "$work/contents" || fail "$f not in the package"
done
dpkg-deb -I "$deb" conffiles | grep -qx /etc/mailpolicy/main.mailpolicy || fail "the policy is not a conffile"

# Another MTA's files aside (see the top).
for f in /usr/sbin/sendmail /usr/bin/mailq /usr/bin/newaliases; do
  if dpkg -S "$f" >/dev/null 2>&1; then
    dpkg-divert --quiet --package mailpolicy --rename --divert "$f.mailpolicy-test" --add "$f"
    diverted+=("$f")
  fi
done
dpkg -i --force-conflicts "$deb" >"$work/dpkg.log" 2>&1 || { cat "$work/dpkg.log" >&2; fail "dpkg -i"; }
[ "$(readlink -f /usr/sbin/sendmail)" = /usr/sbin/mailc ] || fail "/usr/sbin/sendmail is not mailc"
[ "$(readlink -f /usr/bin/mailq)" = /usr/sbin/mailc ] || fail "/usr/bin/mailq is not mailc"
getent passwd mailpolicy >/dev/null || fail "postinst made no mailpolicy user"
[ "$(stat -c '%U %a' /var/spool/mailpolicy/maildrop)" = "mailpolicy 3733" ] || fail "maildrop: $(stat -c '%U %a' /var/spool/mailpolicy/maildrop)"

unit=/usr/lib/systemd/system/mailpolicy.service
key() { sed -n "s/^$1=//p" "$unit" | head -n 1; }
grep -qx "Type=notify" "$unit" || fail "the unit is not Type=notify"
if [ "$(ps -p 1 -o comm=)" = systemd ]; then
  systemctl daemon-reload
  systemctl start mailpolicy.service
  pid=$(systemctl show -p MainPID --value mailpolicy.service)
  systemctl is-active --quiet mailpolicy.service || fail "systemctl start"
else
  echo "deb.sh: systemd is not PID 1 ($(ps -p 1 -o comm=)): running the unit's command lines as it would"
  # shellcheck disable=SC2086
  $(key ExecStartPre) >/dev/null || fail "ExecStartPre: $(key ExecStartPre)"
  caps=$(key CapabilityBoundingSet | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')
  socat -u UNIX-RECV:"$work/notify" OPEN:"$work/notify.log",creat,append &
  socat_pid=$!
  for _ in $(seq 100); do [ -S "$work/notify" ] && break; sleep 0.1; done
  chmod 777 "$work/notify"
  # shellcheck disable=SC2046,SC2086
  (umask "$(key UMask)"; exec env NOTIFY_SOCKET="$work/notify" setpriv --no-new-privs --bounding-set "-all,$caps" \
    $(key ExecStart) </dev/null >>"$work/daemon.log" 2>&1) &
  pid=$!
  for _ in $(seq 300); do grep -q "READY=1" "$work/notify.log" 2>/dev/null && break; sleep 0.1; done
  grep -q "READY=1" "$work/notify.log" || fail "no READY=1 on NOTIFY_SOCKET"
fi
uid=$(id -u mailpolicy)
grep -Eq "^Uid:[[:space:]]+$uid[[:space:]]+$uid[[:space:]]+$uid[[:space:]]+$uid$" "/proc/$pid/status" \
  || fail "the daemon does not run as mailpolicy: $(grep Uid: /proc/$pid/status)"

host=$(tr 'A-Z' 'a-z' </proc/sys/kernel/hostname)
mail=/var/lib/mailpolicy/mail/root/new
delivered() { grep -rqs "$1" /var/lib/mailpolicy/mail/root/new; }
wait_delivered() {
  for _ in $(seq 300); do delivered "$1" && return 0; sleep 0.1; done
  fail "$1 not delivered to $mail"
}
swaks --server 127.0.0.1:25 --from "someone@$host" --to root@localhost --header "Subject: deb-swaks" >"$work/swaks.log" 2>&1 \
  || { cat "$work/swaks.log" >&2; fail "swaks"; }
wait_delivered deb-swaks
printf 'To: root@localhost\nSubject: deb-sendmail\n\ncron-style\n' | /usr/sbin/sendmail -t || fail "sendmail -t"
wait_delivered deb-sendmail
printf 'Subject: deb-nobody\n\nfrom another user\n' | runuser -u nobody -- /usr/sbin/sendmail root@localhost \
  || fail "sendmail as nobody"
wait_delivered deb-nobody
grep -rqs "nobody@" "$mail" || fail "the submitter is not nobody"
for _ in $(seq 100); do mailq >"$work/mailq" 2>&1; grep -q "Mail queue is empty" "$work/mailq" && break; sleep 0.1; done
grep -q "Mail queue is empty" "$work/mailq" || fail "mailq: $(cat "$work/mailq")"
# Any user may list the queue (through the daemon's public/showq), as with Postfix.
runuser -u nobody -- mailq >"$work/mailq.nobody" 2>&1 || fail "mailq as nobody: $(cat "$work/mailq.nobody")"
grep -q "Mail queue is empty" "$work/mailq.nobody" || fail "mailq as nobody: $(cat "$work/mailq.nobody")"
/usr/sbin/mailc queue flush >"$work/flush.out" 2>"$work/flush.err" || fail "queue flush: $(cat "$work/flush.err")"
grep -q "messages flushed" "$work/flush.out" || fail "queue flush: $(cat "$work/flush.err")"
! grep -q "no daemon" "$work/flush.err" || fail "queue flush did not reach the daemon"
/usr/sbin/mailc reload >"$work/reload.out" 2>&1 || fail "mailc reload: $(cat "$work/reload.out")"
grep -q "policy reloaded" "$work/reload.out" || fail "mailc reload: $(cat "$work/reload.out")"

if [ "$(ps -p 1 -o comm=)" = systemd ]; then
  systemctl stop mailpolicy.service
else
  kill -TERM "$pid"
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  ! kill -0 "$pid" 2>/dev/null || fail "the daemon did not stop on SIGTERM"
  grep -q "STOPPING=1" "$work/notify.log" || fail "no STOPPING=1"
  pid=""
fi

dpkg -r mailpolicy >/dev/null || fail "dpkg -r"
[ ! -e /usr/sbin/mailc ] || fail "/usr/sbin/mailc left after dpkg -r"
[ -f /etc/mailpolicy/main.mailpolicy ] || fail "the conffile went with dpkg -r (it stays until purge)"
dpkg -P mailpolicy >/dev/null || fail "dpkg -P"
[ ! -e /etc/mailpolicy/main.mailpolicy ] && [ ! -e /var/spool/mailpolicy ] || fail "purge left files"
echo "deb.sh: 1 passed, 0 failed"
