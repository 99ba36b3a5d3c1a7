//! `mailc::path`: a delivery path whose directory part is interpolated (issue 10).
//!
//! At run time every interpolated value in a file-system destination is one escaped path
//! component and the path is confined to the directory its literal prefix names (the
//! runtime's `paths` module). A value in the *directory* part of the path
//! (`deliver mbox "/var/mail/${recipient.domain}/box"`) still lets the client choose which
//! directory below that prefix receives the mail, so the checker warns about it; a value
//! in the last component only (`deliver maildir "/srv/mail/${recipient.local}/"`) names
//! one entry of a fixed directory and is not reported.

use crate::diag::Diagnostic;
use crate::ir::*;
use crate::source::SourceMap;

use super::loc_span;

pub fn lint(prog: &Program, sources: &SourceMap) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for stage in Stage::ALL {
        for instr in prog.stage(stage) {
            let Instr::Do { action: Action::Deliver(t) | Action::Filter(t), loc } = instr else { continue };
            let Some(dest) = &t.dest else { continue };
            let Some(facts) = interpolated_directory(prog, t.kind, dest) else { continue };
            let Some(span) = loc_span(prog, sources, *loc) else { continue };
            out.push(
                Diagnostic::warning("mailc::path", "the directory part of this delivery path is built from client data")
                    .at(span)
                    .label("interpolated directory")
                    .help(format!(
                        "{facts} picks a directory below the path's literal prefix; each value is escaped to one path component and confined there at delivery, but interpolate only the last component (`\"/srv/mail/${{recipient.local}}/\"`) so the client names at most one entry of a fixed directory"
                    )),
            );
        }
    }
    out
}

/// When `dest` interpolates a value before its last path component: the values, as text.
fn interpolated_directory(prog: &Program, kind: TransportKind, dest: &Template) -> Option<String> {
    let lmtp_unix = kind == TransportKind::Lmtp
        && matches!(dest.0.first(), Some(Part::Lit(s)) if prog.str(*s).trim_start().starts_with("unix:"));
    if !matches!(kind, TransportKind::Maildir | TransportKind::Mbox) && !lmtp_unix {
        return None;
    }
    // The path as text with each value a NUL, to find where its last component starts.
    let mut text = String::new();
    let mut names = Vec::new();
    for p in &dest.0 {
        match p {
            Part::Lit(s) => text.push_str(prog.str(*s)),
            Part::Val(v) => {
                text.push('\0');
                names.push(describe(prog, v));
            }
        }
    }
    let trimmed = text.trim_end_matches('/');
    let last = trimmed.rfind('/').map(|i| i + 1).unwrap_or(0);
    let dir = trimmed.get(..last).unwrap_or("");
    dir.contains('\0').then(|| {
        let n = dir.matches('\0').count();
        names.into_iter().take(n).collect::<Vec<_>>().join(", ")
    })
}

fn describe(prog: &Program, v: &Val) -> String {
    match v {
        Val::Fact(f) => format!("`${{{}}}`", f.info().name),
        Val::Var(id) => {
            prog.vars.get(id.index()).map(|n| format!("`${{var.{}}}`", n.name)).unwrap_or_else(|| "a variable".into())
        }
        _ => "an interpolated value".into(),
    }
}
