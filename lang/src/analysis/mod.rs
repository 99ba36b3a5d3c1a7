//! Policy assurance: analyses of a compiled [`Program`] that `mailc check` runs after
//! lowering (issue 6). No I/O: everything comes from the program and its sources.
//!
//! - [`relay`]: the open-relay proof (`mailc::open-relay`, B1, R14, R15), with a
//!   counterexample transcript for every listener that relays;
//! - [`lint`]: backscatter (`mailc::backscatter`, R3, R27), conditions that never hold or
//!   are already decided (`mailc::dead`), rules shadowed by an earlier terminal rule
//!   (`mailc::shadowed`, B3), and network lookups made before a cheap deciding test
//!   (`mailc::cost`);
//! - [`paths`]: delivery paths whose directory part is interpolated (`mailc::path`);
//! - [`lists`]: mailing lists a stranger can post to (`mailc::open-list`), which the
//!   relay proof does not follow through `expand LIST`.

pub mod lint;
pub mod lists;
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
    /// Other transcripts for the same finding, tried when the first does not relay.
    pub alternatives: Vec<String>,
    /// Index of the diagnostic this counterexample belongs to.
    pub diagnostic: usize,
}

#[derive(Debug, Default)]
pub struct Analysis {
    pub diagnostics: Vec<Diagnostic>,
    pub counterexamples: Vec<Counterexample>,
}

/// Compile `entry` and, when it compiles, analyse it: what `mailc check` reports. The
/// program is kept only when neither step found an error. File tables the policy names
/// are read through the loader, as the daemon will read them (relative to the policy).
pub fn check(entry: &str, loader: &dyn Loader) -> (Compilation, Vec<Counterexample>) {
    let (c, cases, _) = check_keeping_tables(entry, loader);
    (c, cases)
}

/// [`check`], also giving the file tables' contents the open-relay proof read (what the
/// daemon keeps to prove a table's new contents against, without reading every file twice).
pub fn check_keeping_tables(
    entry: &str,
    loader: &dyn Loader,
) -> (Compilation, Vec<Counterexample>, Vec<Option<relay::Known>>) {
    let mut c = compile(entry, loader);
    let Some(prog) = c.program.take() else {
        return (c, Vec::new(), Vec::new());
    };
    let dir = loader.resolve(entry, None).parent().map(|d| d.to_path_buf()).unwrap_or_default();
    let tables = read_tables(&prog, &dir, loader);
    let mut a = analyse(&prog, &c.sources, &tables);
    let base = c.diagnostics.len();
    for cx in &mut a.counterexamples {
        cx.diagnostic += base;
    }
    c.diagnostics.extend(a.diagnostics);
    // Keep counterexamples pointing at their diagnostics through the sort.
    let mut order: Vec<usize> = (0..c.diagnostics.len()).collect();
    order.sort_by_key(|i| {
        let d = &c.diagnostics[*i];
        (d.span.map(|s| (s.file, s.start)), d.severity)
    });
    let mut pos = vec![0; order.len()];
    for (new, old) in order.iter().enumerate() {
        pos[*old] = new;
    }
    let mut sorted: Vec<Option<Diagnostic>> = c.diagnostics.drain(..).map(Some).collect();
    c.diagnostics = order.iter().filter_map(|i| sorted[*i].take()).collect();
    for cx in &mut a.counterexamples {
        cx.diagnostic = pos.get(cx.diagnostic).copied().unwrap_or(cx.diagnostic);
    }
    if !c.has_errors() {
        c.program = Some(prog);
    }
    (c, a.counterexamples, tables)
}

/// The contents of every file table, where the file can be read now (None: unknown).
pub fn read_tables(prog: &Program, dir: &std::path::Path, loader: &dyn Loader) -> Vec<Option<relay::Known>> {
    prog.tables
        .iter()
        .map(|t| {
            let src = t.source.as_ref()?;
            if !matches!(t.kind.as_str(), "list" | "map" | "access" | "cidr" | "regexp" | "pcre") {
                return None;
            }
            let text = loader.load(&dir.join(src)).ok()?;
            crate::tables::parse_rows(&t.kind, &text).ok()
        })
        .collect()
}

/// Run every analysis.
pub fn analyse(prog: &Program, sources: &SourceMap, tables: &[Option<relay::Known>]) -> Analysis {
    let mut out = Analysis::default();
    for (listener, verdict) in relay::prove(prog, tables) {
        let who = match &listener {
            Some(l) => format!("listener `{l}`"),
            None => "the default listener".to_string(),
        };
        let steps_of = |chain: &[(LocId, String)]| -> String {
            let mut steps = Vec::new();
            for (loc, what) in chain {
                steps.push(format!("  {} `{}` -> {what}", prog.describe_loc(*loc), source_line(prog, sources, *loc)));
            }
            if steps.is_empty() {
                "  (no rule: the stages fall off their ends)".to_string()
            } else {
                steps.join("\n")
            }
        };
        match verdict {
            relay::Verdict::Safe | relay::Verdict::AuthRequired | relay::Verdict::LoopbackOnly => {}
            relay::Verdict::Undecided { why, chain, .. } => out.diagnostics.push(
                Diagnostic::error("mailc::open-relay", format!("{who} could not be proven not to relay"))
                    .at(listener_span(prog, sources, listener.as_deref()))
                    .label("not proven")
                    .help(format!(
                        "the open-relay proof cannot decide a way a stranger may relay: {why}.\nThe path:\n{}\nrefuse recipients outside `local_domains` and `relay_domains` before anything that tests client-chosen values, e.g. `if recipient.domain not in local_domains and not authenticated {{ reject 554 5.7.1 \"Relay access denied\"; }}`",
                        steps_of(&chain)
                    )),
            ),
            relay::Verdict::Open(r) => {
                let span = r
                    .decided_by
                    .and_then(|l| loc_span(prog, sources, l))
                    .or_else(|| r.setting.and_then(|n| setting_span(sources, n)))
                    .unwrap_or_else(|| listener_span(prog, sources, listener.as_deref()));
                let help = format!(
                    "a client that is not authenticated and not in `networks` makes the server send its message to <{}>: {}.\nThe path:\n{}\nrelay only for `local_domains`, `relay_domains`, `networks` and authenticated clients: end rcpt with `if recipient.domain not in local_domains and not authenticated {{ reject 554 5.7.1 \"Relay access denied\"; }}` before any `accept`, never decide relaying on the sender, HELO, client name, DNS, `recipient.routing` or a table you do not control, and never send copies to addresses the client supplies; `mailc check --emit-counterexample DIR` writes a transcript that relays",
                    r.recipient,
                    r.why,
                    steps_of(&r.chain),
                );
                let index = out.diagnostics.len();
                out.diagnostics.push(
                    Diagnostic::error("mailc::open-relay", format!("{who} is an open relay"))
                        .at(span)
                        .label("lets a stranger relay")
                        .help(help),
                );
                let mut ts = r.transcripts.clone().into_iter();
                if let Some(first) = ts.next() {
                    out.counterexamples.push(Counterexample {
                        listener: listener.clone(),
                        transcript: first,
                        alternatives: ts.collect(),
                        diagnostic: index,
                    });
                }
            }
        }
    }
    // A public suffix among the local or relay domains makes everyone's mail under it
    // ours to take or to pass on (R14).
    for (setting, list) in [("local_domains", prog.server.local_domains), ("relay_domains", prog.server.relay_domains)]
    {
        if let Some(id) = list {
            if let Some(l) = prog.lists.get(id.index()) {
                for item in &l.items {
                    if relay::public_suffix(item) {
                        let span = setting_span(sources, setting).unwrap_or_else(|| listener_span(prog, sources, None));
                        out.diagnostics.push(
                            Diagnostic::error(
                                "mailc::open-relay",
                                format!(
                                    "`{setting}` holds \"{item}\", a public suffix: every domain under it would be {}",
                                    if setting == "local_domains" { "local" } else { "relayed" }
                                ),
                            )
                            .at(span)
                            .label("a public suffix")
                            .help(format!(
                                "list `{}`'s own domains (e.g. \"example.{}\"), not a suffix anyone can register under",
                                l.name,
                                item.trim_start_matches('.')
                            )),
                        );
                    }
                }
            }
        }
    }
    out.diagnostics.extend(lint::lint(prog, sources));
    out.diagnostics.extend(paths::lint(prog, sources));
    out.diagnostics.extend(lists::lint(prog, sources));
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
