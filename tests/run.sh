#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with the Rust toolchain.
# Installs the Debian packages the tests need when they are missing, then runs every
# crate's tests (unit tests, the diagnostics corpus, the transcript corpus, the example
# transcripts, and the daemon's end-to-end tests against real peers on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests drive (each checked by the program it provides).
declare -A want=(
  [swaks]=swaks
  [smtp-sink]=postfix
  [doveadm]=dovecot-lmtpd
  [slapd]=slapd
  [unbound]=unbound
  [spamd]=spamd
  [pg_ctlcluster]=postgresql
  [nvim]=neovim
  [redis-server]=redis-server
  [haproxy]=haproxy
  [opendkim]=opendkim
  [spamass-milter]=spamass-milter
  [rspamd]=rspamd
  [proxsmtpd]=proxsmtp
  [spamc]=spamc
  [openssl]=openssl
  [pflogsumm]=pflogsumm
  [zsh]=zsh
  [fish]=fish
  [man]=man-db
  [nroff]=groff-base
  [socat]=socat
  [curl]=curl
)
missing=()
for prog in "${!want[@]}"; do
  if ! command -v "$prog" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$prog" ]; then
    missing+=("${want[$prog]}")
  fi
done
# git send-email (a real submitter through `mailc sendmail`) is not on PATH.
[ -e /usr/lib/git-core/git-send-email ] || missing+=(git-email)
# swaks needs these Perl modules for STARTTLS and AUTH.
for mod in Net::SSLeay IO::Socket::SSL Authen::SASL; do
  perl -M"$mod" -e1 >/dev/null 2>&1 || missing+=(libnet-ssleay-perl)
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # postfix asks configuration questions; answer them up front.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections || true
    echo "slapd slapd/no_configuration boolean true" | debconf-set-selections || true
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" spamassassin dovecot-core ldap-utils libnet-ssleay-perl libio-socket-ssl-perl libauthen-sasl-perl >/dev/null
    # The packages' own daemons are not used: the tests start their own on loopback.
    for svc in postfix dovecot slapd unbound spamd spamassassin postgresql redis-server haproxy opendkim spamass-milter rspamd proxsmtp; do service "$svc" stop >/dev/null 2>&1 || true; done
  else
    echo "note: not root, cannot install ${missing[*]}; tests that need them will say so" >&2
  fi
fi

cargo build --workspace --all-targets
cargo test --workspace
# The policies and transcripts shipped as examples, through the real binary.
cargo run -q -- check --deny-warnings examples/*.mailpolicy
# Every policy is in the canonical layout (mailc fmt, spec/cli.md).
cargo run -q -- fmt --check examples tests/check tests/assurance tests/transcripts/policies stdlib/policy
cargo run -q -- test tests/transcripts examples
# The editors' grammars (tree-sitter, TextMate) against every policy.
bash editors/test.sh
# The Debian package: built with cargo-deb (installed from crates.io when missing), installed
# with dpkg, the daemon started as its systemd unit starts it, mail through it, removed.
if [ "$(id -u)" = 0 ]; then
  bash tests/deb.sh
else
  echo "note: not root, tests/deb.sh (dpkg -i) not run" >&2
fi
