// Tokenizes every policy of the repository with the TextMate grammar (vscode-textmate,
// the engine VS Code uses) and checks it against the language's lexical rules
// (spec/language.md, section 2): every character of a comment has a comment scope, every
// character of a string a string scope, nothing else has either, `${fact}` inside a
// string is an interpolation, and `if`/`elsif`/`else` are keywords.
// Usage: node test.js POLICY...   (NODE_PATH must reach vscode-textmate and vscode-oniguruma)
'use strict';
const fs = require('fs');
const path = require('path');
const vsctm = require('vscode-textmate');
const oniguruma = require('vscode-oniguruma');

const wasm = fs.readFileSync(path.join(path.dirname(require.resolve('vscode-oniguruma')), 'onig.wasm')).buffer;
const onig = oniguruma.loadWASM(wasm).then(() => ({
  createOnigScanner: (p) => new oniguruma.OnigScanner(p),
  createOnigString: (s) => new oniguruma.OnigString(s),
}));
const registry = new vsctm.Registry({
  onigLib: onig,
  loadGrammar: async () => vsctm.parseRawGrammar(
    fs.readFileSync(path.join(__dirname, 'syntaxes/mailpolicy.tmLanguage.json'), 'utf8'), 'mailpolicy.tmLanguage.json'),
});

// What each character is, by the language's rules: 'c' comment, 's' string, ' ' other.
function classes(line) {
  const out = [];
  let i = 0;
  while (i < line.length) {
    const ch = line[i];
    if (ch === '#') { while (i < line.length) { out.push('c'); i++; } break; }
    if (ch === '"') {
      out.push('s'); i++;
      while (i < line.length) {
        if (line[i] === '\\' && i + 1 < line.length) { out.push('s', 's'); i += 2; continue; }
        out.push('s');
        if (line[i++] === '"') break;
      }
      continue;
    }
    out.push(' '); i++;
  }
  return out;
}

async function main() {
  const grammar = await registry.loadGrammar('source.mailpolicy');
  let failures = 0;
  let files = 0;
  for (const file of process.argv.slice(2)) {
    files++;
    const lines = fs.readFileSync(file, 'utf8').split('\n');
    let state = vsctm.INITIAL;
    lines.forEach((line, n) => {
      const r = grammar.tokenizeLine(line, state);
      state = r.ruleStack;
      const want = classes(line);
      const scopeAt = new Array(line.length).fill(null);
      for (const t of r.tokens) for (let i = t.startIndex; i < Math.min(t.endIndex, line.length); i++) scopeAt[i] = t.scopes;
      const fail = (what) => { failures++; console.error(`${file}:${n + 1}: ${what}\n  ${line}`); };
      for (let i = 0; i < line.length; i++) {
        const s = (scopeAt[i] || []).join(' ');
        if (/invalid/.test(s)) return fail(`invalid scope at column ${i + 1}: ${s}`);
        const isComment = /comment/.test(s);
        const isString = /\bstring\b/.test(s);
        if ((want[i] === 'c') !== isComment) return fail(`column ${i + 1}: comment scope ${isComment}, expected ${want[i] === 'c'}`);
        if ((want[i] === 's') !== isString) return fail(`column ${i + 1}: string scope ${isString}, expected ${want[i] === 's'}`);
      }
      const code = want.map((w, i) => (w === ' ' ? line[i] : ' ')).join('');
      for (const m of code.matchAll(/\b(if|elsif|else)\b/g)) {
        const s = (scopeAt[m.index] || []).join(' ');
        if (!/keyword\.control/.test(s)) return fail(`\`${m[1]}\` at column ${m.index + 1} is ${s}`);
      }
      for (const m of line.matchAll(/\$\{[A-Za-z_][A-Za-z0-9_.]*\}/g)) {
        if (want[m.index] !== 's' || line[m.index - 1] === '\\') continue;
        const s = (scopeAt[m.index + 2] || []).join(' ');
        if (!/meta\.interpolation/.test(s)) return fail(`\`${m[0]}\` is not an interpolation: ${s}`);
      }
    });
  }
  if (files === 0) { console.error('no policy given'); process.exit(2); }
  console.log(`textmate: ${files - 0} files, ${failures} failures`);
  process.exit(failures ? 1 : 0);
}
main().catch((e) => { console.error(e); process.exit(2); });
