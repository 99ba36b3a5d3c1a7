#!/usr/bin/env bash
# The highlighting grammars under editors/ against every policy of the repository.
#
# - tree-sitter (editors/tree-sitter-mailpolicy): `tree-sitter generate`, then `tree-sitter
#   parse` of every policy: those `mailc check` parses must give no ERROR or MISSING node,
#   and each case of tests/check/syntax_* (made to be syntax errors) must give one; the
#   highlight query must compile against the grammar.
# - TextMate (editors/vscode): every policy tokenized by vscode-textmate, the engine of VS
#   Code, and checked against the language's lexical rules (editors/vscode/test.js).
#
# Tools are installed into editors/.cache when missing: vscode-textmate and
# vscode-oniguruma from npm; the tree-sitter CLI from npm (tree-sitter-cli), or, where its
# install step cannot fetch its prebuilt binary, built from crates.io with cargo (once).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="$PWD/editors/.cache"
mkdir -p "$cache"
TS_NPM=0.27.0
TS_CRATE=0.27.1

mapfile -t policies < <(find examples tests stdlib/policy -name '*.mailpolicy' | sort)
mapfile -t broken < <(printf '%s\n' "${policies[@]}" | grep '/syntax_' || true)

# ---- TextMate ------------------------------------------------------------------------
if ! [ -d "$cache/node_modules/vscode-textmate" ] || ! [ -d "$cache/node_modules/vscode-oniguruma" ]; then
  npm install --prefix "$cache" --no-audit --no-fund --silent vscode-textmate@9 vscode-oniguruma@2 >/dev/null
fi
NODE_PATH="$cache/node_modules" node editors/vscode/test.js "${policies[@]}"

# ---- tree-sitter -----------------------------------------------------------------------
ts=""
for c in "$(command -v tree-sitter || true)" "$cache/node_modules/.bin/tree-sitter" "$cache/bin/tree-sitter"; do
  if [ -n "$c" ] && [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then ts="$c"; break; fi
done
if [ -z "$ts" ]; then
  if npm install --prefix "$cache" --no-audit --no-fund --silent "tree-sitter-cli@$TS_NPM" >/dev/null 2>&1 \
    && "$cache/node_modules/.bin/tree-sitter" --version >/dev/null 2>&1; then
    ts="$cache/node_modules/.bin/tree-sitter"
  else
    echo "tree-sitter-cli from npm could not fetch its binary; building tree-sitter-cli $TS_CRATE from crates.io (once)"
    cargo install --quiet --locked --root "$cache" "tree-sitter-cli@$TS_CRATE"
    ts="$cache/bin/tree-sitter"
  fi
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cp -r editors/tree-sitter-mailpolicy "$work/grammar"
(cd "$work/grammar" && "$ts" generate >/dev/null)
export XDG_CONFIG_HOME="$work/config" TREE_SITTER_DIR="$work/config"
# Files with a parse error, as `tree-sitter parse --quiet` names them.
set +e
"$ts" parse -p "$work/grammar" -q "${policies[@]}" 2>/dev/null | awk '{print $1}' | sort -u > "$work/errors"
set -e
if ! diff <(printf '%s\n' "${broken[@]}" | sort -u) "$work/errors" > "$work/diff"; then
  echo "tree-sitter: the grammar and mailc disagree on which policies parse (< only mailc fails, > only tree-sitter fails):"
  cat "$work/diff"
  exit 1
fi
"$ts" query -p "$work/grammar" -q editors/tree-sitter-mailpolicy/queries/highlights.scm examples/*.mailpolicy >/dev/null 2>&1 || {
  echo "tree-sitter: queries/highlights.scm does not compile against the grammar"
  exit 1
}
echo "tree-sitter: ${#policies[@]} files, $(( ${#policies[@]} - ${#broken[@]} )) parse without error, ${#broken[@]} syntax-error cases rejected"
