//! Policy assurance: analyses of a compiled [`Program`] that `mailc check` runs after
//! lowering (issue 6). No I/O: everything comes from the program and its sources.
//!
//! - [`relay`]: the open-relay proof (`mailc::open-relay`, B1, R14, R15), with a
//!   counterexample transcript for every listener that relays;
//! - [`lint`]: backscatter (`mailc::backscatter`, R3, R27), conditions that never hold or
//!   are already decided (`mailc::dead`), rules shadowed by an earlier terminal rule
//!   (`mailc::shadowed`, B3), and network lookups made before a cheap deciding test
//!   (`mailc::cost`);
//! - [`paths`]: delivery paths whose directory part is interpolated (`mailc::path`).

pub mod lint;
pub mod paths;
pub mod relay;

use crate::check::{compile, Compilation};
use crate::diag::Diagnostic;
use crate::ir::{LocId, Program};
use crate::source::{FileId, Loader, SourceMap, Span};

/// A transcript that shows a listener relaying.
#[derive(Clone, Debug)]
pub struct Counterexample {
    pub listener: Option<String>,
    /// One `case:` of a transcript file, without the `policy:` line.
    pub transcript: String,
}

#[derive(Debug, Default)]
pub struct Analysis {
    pub diagnostics: Vec<Diagnostic>,
    pub counterexamples: Vec<Counterexample>,
}

/// Compile `entry` and, when it compiles, analyse it: what `mailc check` reports. The
/// program is kept only when neither step found an error.
pub fn check(entry: &str, loader: &dyn Loader) -> (Compilation, Vec<Counterexample>) {
    let mut c = compile(entry, loader);
    let Some(prog) = c.program.take() else {
        return (c, Vec::new());
    };
    let a = analyse(&prog, &c.sources);
    c.diagnostics.extend(a.diagnostics);
    c.diagnostics.sort_by_key(|d| (d.span.map(|s| (s.file, s.start)), d.severity));
    if !c.has_errors() {
        c.program = Some(prog);
    }
    (c, a.counterexamples)
}

/// Run every analysis.
pub fn analyse(prog: &Program, sources: &SourceMap) -> Analysis {
    let mut out = Analysis::default();
    for (listener, verdict) in relay::prove(prog) {
        let who = match &listener {
            Some(l) => format!("listener `{l}`"),
            None => "the default listener".to_string(),
        };
        match verdict {
            relay::Verdict::Safe | relay::Verdict::AuthRequired => {}
            relay::Verdict::Unknown(_) => out.diagnostics.push(
                Diagnostic::warning(
                    "mailc::open-relay",
                    format!("{who}: the open-relay proof gave up (too many paths)"),
                )
                .at(listener_span(prog, sources, listener.as_deref()))
                .help(
                    "split the rcpt rules into rules blocks with fewer independent tests, or check the policy by hand",
                ),
            ),
            relay::Verdict::Open(r) => {
                let mut steps = Vec::new();
                for (loc, what) in &r.chain {
                    steps.push(format!(
                        "  {} `{}` -> {what}",
                        prog.describe_loc(*loc),
                        source_line(prog, sources, *loc)
                    ));
                }
                let span = r
                    .decided_by
                    .and_then(|l| loc_span(prog, sources, l))
                    .or_else(|| r.setting.and_then(|n| setting_span(sources, n)))
                    .unwrap_or_else(|| listener_span(prog, sources, listener.as_deref()));
                let help = format!(
                    "a client that is not authenticated and not in `networks` gets 250 for <{}>: {}.\nThe path:\n{}\nrelay only for `local_domains`, listed domains, `networks` and authenticated clients: end rcpt with `if recipient.domain not in local_domains and not authenticated {{ reject 554 5.7.1 \"Relay access denied\"; }}` before any `accept`, and never decide relaying on the sender, HELO, client name, DNS or `recipient.routing`; `mailc check --emit-counterexample DIR` writes a transcript that relays",
                    r.recipient,
                    r.why,
                    if steps.is_empty() {
                        "  (no rule: the stage falls off its end)".to_string()
                    } else {
                        steps.join("\n")
                    }
                );
                out.diagnostics.push(
                    Diagnostic::error("mailc::open-relay", format!("{who} is an open relay"))
                        .at(span)
                        .label("lets a stranger relay")
                        .help(help),
                );
                out.counterexamples
                    .push(Counterexample { listener: listener.clone(), transcript: r.transcript.clone() });
            }
        }
    }
    out.diagnostics.extend(lint::lint(prog, sources));
    out.diagnostics.extend(paths::lint(prog, sources));
    out
}

/// The span of a rule: from its location to the end of its line.
pub fn loc_span(prog: &Program, sources: &SourceMap, loc: LocId) -> Option<Span> {
    let l = prog.locs.get(loc.index())?;
    let file = FileId(l.file);
    let sf = sources.get(file);
    let (line_start, line_end) = sf.line_range(l.line)?;
    let line = sf.text.get(line_start..line_end)?;
    let col_off: usize = line.chars().take(l.col.saturating_sub(1) as usize).map(char::len_utf8).sum();
    let start = line_start + col_off;
    let end = line_start + line.trim_end().len();
    Some(Span::new(file, start, end.max(start)))
}

pub fn source_line(prog: &Program, sources: &SourceMap, loc: LocId) -> String {
    match loc_span(prog, sources, loc) {
        Some(s) => sources.text(s).trim().trim_end_matches('{').trim().to_string(),
        None => String::new(),
    }
}

/// Where a server setting is written (`networks everyone;`).
fn setting_span(sources: &SourceMap, name: &str) -> Option<Span> {
    for (id, sf) in sources.files() {
        let mut offset = 0;
        for line in sf.text.split_inclusive('\n') {
            let t = line.trim_start();
            if t.starts_with(name) && t[name.len()..].starts_with([' ', '\t']) {
                let start = offset + (line.len() - t.len());
                return Some(Span::new(id, start, offset + line.trim_end().len()));
            }
            offset += line.len();
        }
    }
    None
}

/// Where a listener is declared (or the first line of the policy).
fn listener_span(prog: &Program, sources: &SourceMap, name: Option<&str>) -> Span {
    let _ = prog;
    let (file, f) = sources.files().next().expect("a compiled policy has a file");
    let needle = match name {
        Some(n) => format!("listener {n}"),
        None => "on rcpt".to_string(),
    };
    for (id, sf) in sources.files() {
        if let Some(i) = sf.text.find(&needle) {
            return Span::new(id, i, i + needle.len());
        }
    }
    let end = f.text.find('\n').unwrap_or(f.text.len());
    Span::new(file, 0, end)
}
