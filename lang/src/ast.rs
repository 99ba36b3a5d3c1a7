//! The syntax tree, with byte spans on every node. Built by `parse`, read by `check`.

use crate::source::Span;

#[derive(Clone, Debug)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Clone, Debug)]
pub enum Item {
    Require { caps: Vec<StrLit>, span: Span },
    Include { path: StrLit, span: Span },
    List { name: Ident, kind: ListKind, items: Vec<Value>, span: Span },
    Resource { kw: ResourceKw, name: Ident, kind: Ident, source: Option<StrLit>, options: Vec<Opt>, span: Span },
    Settings { kw: SettingsKw, name: Option<Ident>, options: Vec<Opt>, span: Span },
    Rules { name: Ident, body: Vec<Stmt>, span: Span },
    Stage { stage: Ident, body: Vec<Stmt>, span: Span },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListKind {
    Strings,
    Domains,
    Cidr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKw {
    Table,
    Secret,
    Scanner,
    MailingList,
}

impl ResourceKw {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKw::Table => "table",
            ResourceKw::Secret => "secret",
            ResourceKw::Scanner => "scanner",
            ResourceKw::MailingList => "mailing_list",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingsKw {
    Server,
    Listener,
}

#[derive(Clone, Debug)]
pub struct Opt {
    pub name: Ident,
    pub value: Value,
    pub span: Span,
}

/// A string literal: `raw` is the text between the quotes as written (escapes and `${}` intact).
#[derive(Clone, Debug)]
pub struct StrLit {
    pub raw: String,
    /// Span of the whole literal including quotes.
    pub span: Span,
}

impl StrLit {
    /// Source offset of the first character inside the quotes.
    pub fn inner_start(&self) -> u32 {
        self.span.start + 1
    }
}

#[derive(Clone, Debug)]
pub enum ValueKind {
    Str(StrLit),
    Num(f64),
    /// Bytes.
    Size(u64),
    /// Milliseconds.
    Duration(u64),
    /// Enhanced status code `class.subject.detail`.
    Enh(u16, u16, u16),
    List(Vec<Value>),
    Path(String),
}

#[derive(Clone, Debug)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Arg {
    Tag(Ident),
    Eq(Span),
    Value(Value),
}

impl Arg {
    pub fn span(&self) -> Span {
        match self {
            Arg::Tag(i) => i.span,
            Arg::Eq(s) => *s,
            Arg::Value(v) => v.span,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Stmt {
    If { arms: Vec<(Cond, Vec<Stmt>)>, otherwise: Option<Vec<Stmt>>, span: Span },
    Action { name: Ident, args: Vec<Arg>, span: Span },
}

impl Stmt {
    pub fn span(&self) -> Span {
        match self {
            Stmt::If { span, .. } | Stmt::Action { span, .. } => *span,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Is,
    Contains,
    Matches,
    Regex,
    In,
    NotIn,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    IsNull,
    IsNotNull,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Is => ":is",
            Op::Contains => ":contains",
            Op::Matches => ":matches",
            Op::Regex => ":regex",
            Op::In => "in",
            Op::NotIn => "not in",
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::IsNull => "is null",
            Op::IsNotNull => "is not null",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Term {
    pub name: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Cond {
    Or(Vec<Cond>, Span),
    And(Vec<Cond>, Span),
    Not(Box<Cond>, Span),
    Test { term: Term, op: Option<(Op, Span)>, operand: Option<Value>, span: Span },
}

impl Cond {
    pub fn span(&self) -> Span {
        match self {
            Cond::Or(_, s) | Cond::And(_, s) | Cond::Not(_, s) | Cond::Test { span: s, .. } => *s,
        }
    }
}
