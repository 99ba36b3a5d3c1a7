//! Diagnostics as values: many per run, each with a stable code, a span and a hint.
//! Rendering (miette, JSON) happens in the `mailc` binary, never here.

use crate::source::{SourceMap, Span};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable code, e.g. `mailc::stage`. Documented in spec/language.md.
    pub code: &'static str,
    pub message: String,
    pub span: Option<Span>,
    /// Short text shown under the primary span.
    pub label: Option<String>,
    pub help: Option<String>,
    /// Secondary spans, e.g. "first declared here".
    pub related: Vec<(Span, String)>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            span: None,
            label: None,
            help: None,
            related: Vec::new(),
        }
    }
    pub fn warning(code: &'static str, message: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, message) }
    }
    pub fn at(mut self, span: Span) -> Self {
        self.span = Some(span);
        self
    }
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
    pub fn related(mut self, span: Span, text: impl Into<String>) -> Self {
        self.related.push((span, text.into()));
        self
    }
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// `file:line:col`, or the bare message's file-less form.
    pub fn location(&self, sources: &SourceMap) -> Option<(String, u32, u32)> {
        let span = self.span?;
        let (line, col) = sources.line_col(span);
        Some((sources.get(span.file).name.clone(), line, col))
    }

    /// One-line plain rendering: `file:line:col: severity[code]: message (help: ...)`.
    /// Used by tests; the binary renders with miette.
    pub fn render_short(&self, sources: &SourceMap) -> String {
        let loc = match self.location(sources) {
            Some((f, l, c)) => format!("{f}:{l}:{c}: "),
            None => String::new(),
        };
        format!("{loc}{}[{}]: {}", self.severity.as_str(), self.code, self.message)
    }
}

/// Closest candidate by edit distance, for "did you mean" hints.
pub fn did_you_mean<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        let d = edit_distance(name, c);
        // One edit in three characters; names shorter than three get no guess (any other
        // one-letter name is one edit away from a one-letter name).
        let longest = name.len().max(c.len());
        if longest < 3 {
            continue;
        }
        let limit = (longest / 3).max(1);
        if d <= limit && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn suggestions() {
        assert_eq!(did_you_mean("internl", ["internal", "external"]), Some("internal"));
        assert_eq!(did_you_mean("rcpt", ["rcpt", "mail"]), Some("rcpt"));
        assert_eq!(did_you_mean("zzzzzz", ["internal"]), None);
        // One-letter names are all one edit apart: no guess.
        assert_eq!(did_you_mean("b", ["a", "c"]), None);
        assert_eq!(did_you_mean("ab", ["ac"]), None);
    }
}
