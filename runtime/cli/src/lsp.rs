//! `mailc lsp`: a Language Server Protocol server on standard input and output
//! (lsp-server + lsp-types: synchronous, no async runtime).
//!
//! Threads: the main loop only reads messages, keeps the open documents and dispatches;
//! requests are answered by a request thread from a snapshot of the documents; the
//! diagnostics of `mailc check` (the open-relay proof included) are computed by an
//! analysis thread, debounced ([`DEBOUNCE`]) after the last change, and published only
//! when no newer change has come in. So a 10,000-rule policy never blocks the main loop.
//! The language intelligence itself is `mailpolicy_lang::ide`; this file is protocol.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, Receiver, Sender};
use lsp_server::{Connection, ErrorCode, Message, Notification, Request, Response};
use lsp_types as lt;
use lsp_types::notification::Notification as _;
use lsp_types::request::Request as _;
use lsp_types::Url;
use mailpolicy_lang::ide::{self, CompletionKind, DeclKind, World};
use mailpolicy_lang::source::{SourceFile, Span};
use mailpolicy_lang::{analysis, Diagnostic, FsLoader, Loader, Severity, SourceMap};

/// Diagnostics are computed this long after the last change.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

pub fn main(args: Vec<OsString>) -> u8 {
    for a in &args {
        // Clients often pass --stdio; stdio is the only transport.
        if a != "--stdio" {
            eprintln!(
                "mailc lsp: unexpected argument {a:?}\nusage: mailc lsp   (the protocol on standard input and output)"
            );
            return 2;
        }
    }
    let (conn, io) = Connection::stdio();
    let code = match serve(&conn) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mailc lsp: {e}");
            1
        }
    };
    drop(conn);
    let _ = io.join();
    code
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Utf8,
    Utf16,
}

#[derive(Clone)]
struct Doc {
    uri: Url,
    path: PathBuf,
    text: Arc<String>,
    version: i32,
}

/// What the request and analysis threads see: the open documents at one moment.
#[derive(Clone)]
struct Snapshot {
    docs: Arc<HashMap<PathBuf, Doc>>,
    roots: Arc<Vec<PathBuf>>,
    enc: Encoding,
}

fn serve(conn: &Connection) -> Result<(), String> {
    let (id, params) = conn.initialize_start().map_err(|e| e.to_string())?;
    let init: lt::InitializeParams = serde_json::from_value(params).map_err(|e| e.to_string())?;
    let utf8 = init
        .capabilities
        .general
        .as_ref()
        .and_then(|g| g.position_encodings.as_ref())
        .is_some_and(|e| e.contains(&lt::PositionEncodingKind::UTF8));
    let enc = if utf8 { Encoding::Utf8 } else { Encoding::Utf16 };
    let mut roots: Vec<PathBuf> =
        init.workspace_folders.iter().flatten().filter_map(|f| f.uri.to_file_path().ok()).collect();
    #[allow(deprecated)]
    if roots.is_empty() {
        if let Some(p) = init.root_uri.as_ref().and_then(|u| u.to_file_path().ok()) {
            roots.push(p);
        }
    }
    let caps = lt::ServerCapabilities {
        position_encoding: Some(if utf8 { lt::PositionEncodingKind::UTF8 } else { lt::PositionEncodingKind::UTF16 }),
        text_document_sync: Some(lt::TextDocumentSyncCapability::Options(lt::TextDocumentSyncOptions {
            open_close: Some(true),
            change: Some(lt::TextDocumentSyncKind::INCREMENTAL),
            save: Some(lt::TextDocumentSyncSaveOptions::Supported(true)),
            ..Default::default()
        })),
        hover_provider: Some(lt::HoverProviderCapability::Simple(true)),
        completion_provider: Some(lt::CompletionOptions {
            trigger_characters: Some(vec![".".into(), "{".into(), " ".into()]),
            ..Default::default()
        }),
        definition_provider: Some(lt::OneOf::Left(true)),
        references_provider: Some(lt::OneOf::Left(true)),
        document_symbol_provider: Some(lt::OneOf::Left(true)),
        code_action_provider: Some(lt::CodeActionProviderCapability::Options(lt::CodeActionOptions {
            code_action_kinds: Some(vec![lt::CodeActionKind::QUICKFIX]),
            ..Default::default()
        })),
        document_formatting_provider: Some(lt::OneOf::Left(true)),
        ..Default::default()
    };
    let result = serde_json::json!({
        "capabilities": caps,
        "serverInfo": { "name": "mailc", "version": env!("CARGO_PKG_VERSION") },
    });
    conn.initialize_finish(id, result).map_err(|e| e.to_string())?;

    let (req_tx, req_rx) = unbounded::<(Request, Snapshot)>();
    let (job_tx, job_rx) = unbounded::<(u64, Snapshot)>();
    let (done_tx, done_rx) = unbounded::<Analysed>();
    let out = conn.sender.clone();
    std::thread::spawn(move || requests(req_rx, out));
    std::thread::spawn(move || analyse_loop(job_rx, done_tx));

    let mut docs: HashMap<PathBuf, Doc> = HashMap::new();
    let roots = Arc::new(roots);
    let mut generation = 0u64;
    let mut deadline: Option<Instant> = None;
    let mut published: HashSet<Url> = HashSet::new();
    let snapshot = |docs: &HashMap<PathBuf, Doc>| Snapshot { docs: Arc::new(docs.clone()), roots: roots.clone(), enc };
    loop {
        let timeout = deadline.map_or(Duration::from_secs(3600), |d| d.saturating_duration_since(Instant::now()));
        select! {
            recv(conn.receiver) -> msg => {
                let Ok(msg) = msg else { return Ok(()) };
                match msg {
                    Message::Request(req) => {
                        if conn.handle_shutdown(&req).map_err(|e| e.to_string())? {
                            return Ok(());
                        }
                        let _ = req_tx.send((req, snapshot(&docs)));
                    }
                    Message::Notification(n) => {
                        if n.method == lt::notification::Exit::METHOD {
                            return Ok(());
                        }
                        if on_notification(&mut docs, n, enc) {
                            generation += 1;
                            deadline = Some(Instant::now() + DEBOUNCE);
                        }
                    }
                    Message::Response(_) => {}
                }
            }
            recv(done_rx) -> done => {
                let Ok(done) = done else { continue };
                if done.generation != generation {
                    continue; // a newer change is being analysed
                }
                let mut now: HashSet<Url> = HashSet::new();
                for (uri, (version, diags)) in done.files {
                    now.insert(uri.clone());
                    let p = lt::PublishDiagnosticsParams { uri, diagnostics: diags, version };
                    let _ = conn.sender.send(Notification::new(lt::notification::PublishDiagnostics::METHOD.into(), p).into());
                }
                for uri in published.difference(&now) {
                    let p = lt::PublishDiagnosticsParams { uri: uri.clone(), diagnostics: Vec::new(), version: None };
                    let _ = conn.sender.send(Notification::new(lt::notification::PublishDiagnostics::METHOD.into(), p).into());
                }
                published = now;
            }
            default(timeout) => {
                if deadline.is_some_and(|d| d <= Instant::now()) {
                    deadline = None;
                    let _ = job_tx.send((generation, snapshot(&docs)));
                }
            }
        }
    }
}

/// Apply a notification; true when the documents (or files on disk) changed.
fn on_notification(docs: &mut HashMap<PathBuf, Doc>, n: Notification, enc: Encoding) -> bool {
    match n.method.as_str() {
        lt::notification::DidOpenTextDocument::METHOD => {
            let Ok(p) = serde_json::from_value::<lt::DidOpenTextDocumentParams>(n.params) else { return false };
            let Some(path) = uri_path(&p.text_document.uri) else { return false };
            docs.insert(
                path.clone(),
                Doc {
                    uri: p.text_document.uri,
                    path,
                    text: Arc::new(p.text_document.text),
                    version: p.text_document.version,
                },
            );
            true
        }
        lt::notification::DidChangeTextDocument::METHOD => {
            let Ok(p) = serde_json::from_value::<lt::DidChangeTextDocumentParams>(n.params) else { return false };
            let Some(path) = uri_path(&p.text_document.uri) else { return false };
            let Some(doc) = docs.get_mut(&path) else { return false };
            let mut text = (*doc.text).clone();
            for ch in p.content_changes {
                match ch.range {
                    None => text = ch.text,
                    Some(r) => {
                        let sf = SourceFile::new(String::new(), PathBuf::new(), text.clone());
                        let a = offset(&sf, r.start, enc);
                        let b = offset(&sf, r.end, enc).max(a);
                        text.replace_range(a..b, &ch.text);
                    }
                }
            }
            doc.text = Arc::new(text);
            doc.version = p.text_document.version;
            true
        }
        lt::notification::DidCloseTextDocument::METHOD => {
            let Ok(p) = serde_json::from_value::<lt::DidCloseTextDocumentParams>(n.params) else { return false };
            uri_path(&p.text_document.uri).is_some_and(|path| docs.remove(&path).is_some())
        }
        // Saved, or changed on disk: included files are read from disk.
        lt::notification::DidSaveTextDocument::METHOD | lt::notification::DidChangeWatchedFiles::METHOD => true,
        _ => false,
    }
}

// ---- files, positions ---------------------------------------------------------------------

/// `a/./b/../c` -> `a/c`, so that an include and a document name one file alike.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn uri_path(u: &Url) -> Option<PathBuf> {
    u.to_file_path().ok().map(|p| normalize(&p))
}

/// The open documents over the file system.
struct Overlay<'a> {
    docs: &'a HashMap<PathBuf, Doc>,
    fs: FsLoader,
}

impl Loader for Overlay<'_> {
    fn resolve(&self, name: &str, from: Option<&Path>) -> PathBuf {
        normalize(&self.fs.resolve(name, from))
    }
    fn load(&self, path: &Path) -> Result<String, String> {
        match self.docs.get(path) {
            Some(d) => Ok((*d.text).clone()),
            None => self.fs.load(path),
        }
    }
}

fn overlay(s: &Snapshot) -> Overlay<'_> {
    Overlay { docs: &s.docs, fs: FsLoader { std_dir: crate::check::std_dir() } }
}

/// Byte offset of an LSP position.
fn offset(sf: &SourceFile, p: lt::Position, enc: Encoding) -> usize {
    let Some((start, end)) = sf.line_range(p.line + 1) else { return sf.text.len() };
    let line = &sf.text[start..end];
    let mut units = 0u32;
    for (i, c) in line.char_indices() {
        if units >= p.character {
            return start + i;
        }
        units += match enc {
            Encoding::Utf8 => c.len_utf8() as u32,
            Encoding::Utf16 => c.len_utf16() as u32,
        };
    }
    end
}

fn position(sf: &SourceFile, off: u32, enc: Encoding) -> lt::Position {
    let (line, _) = sf.line_col(off);
    let (start, _) = sf.line_range(line).unwrap_or((0, 0));
    let end = (off as usize).min(sf.text.len()).max(start);
    let seg = sf.text.get(start..end).unwrap_or("");
    let character = match enc {
        Encoding::Utf8 => seg.len() as u32,
        Encoding::Utf16 => seg.encode_utf16().count() as u32,
    };
    lt::Position { line: line - 1, character }
}

fn range(sources: &SourceMap, span: Span, enc: Encoding) -> lt::Range {
    let sf = sources.get(span.file);
    lt::Range { start: position(sf, span.start, enc), end: position(sf, span.end, enc) }
}

fn location(sources: &SourceMap, span: Span, enc: Encoding) -> Option<lt::Location> {
    let uri = Url::from_file_path(&sources.get(span.file).path).ok()?;
    Some(lt::Location { uri, range: range(sources, span, enc) })
}

// ---- diagnostics ------------------------------------------------------------------------

struct Analysed {
    generation: u64,
    files: HashMap<Url, (Option<i32>, Vec<lt::Diagnostic>)>,
}

fn analyse_loop(jobs: Receiver<(u64, Snapshot)>, done: Sender<Analysed>) {
    while let Ok(mut job) = jobs.recv() {
        // Only the newest change matters.
        while let Ok(newer) = jobs.try_recv() {
            job = newer;
        }
        let (generation, snap) = job;
        let files = diagnostics(&snap);
        if done.send(Analysed { generation, files }).is_err() {
            return;
        }
    }
}

/// `mailc check` of every open document that no other open document includes; each file's
/// diagnostics are published as the policy that includes it sees them.
fn diagnostics(snap: &Snapshot) -> HashMap<Url, (Option<i32>, Vec<lt::Diagnostic>)> {
    let loader = overlay(snap);
    let mut results = Vec::new();
    for doc in snap.docs.values() {
        let entry = doc.path.display().to_string();
        let (c, _) = analysis::check(&entry, &loader);
        results.push((doc.path.clone(), c));
    }
    let included: HashSet<PathBuf> = results
        .iter()
        .flat_map(|(entry, c)| c.sources.files().map(|(_, f)| f.path.clone()).filter(move |p| p != entry))
        .collect();
    let mut out: HashMap<Url, (Option<i32>, Vec<lt::Diagnostic>)> = HashMap::new();
    for doc in snap.docs.values() {
        out.insert(doc.uri.clone(), (Some(doc.version), Vec::new()));
    }
    for (entry, c) in &results {
        if included.contains(entry) {
            continue;
        }
        for d in &c.diagnostics {
            let (path, lsp) = to_lsp(d, &c.sources, entry, snap.enc);
            let Ok(uri) = Url::from_file_path(&path) else { continue };
            let version = snap.docs.get(&path).map(|d| d.version);
            let e = out.entry(uri).or_insert((version, Vec::new()));
            if !e.1.contains(&lsp) {
                e.1.push(lsp);
            }
        }
    }
    out
}

fn severity(s: Severity) -> lt::DiagnosticSeverity {
    match s {
        Severity::Error => lt::DiagnosticSeverity::ERROR,
        Severity::Warning => lt::DiagnosticSeverity::WARNING,
    }
}

fn to_lsp(d: &Diagnostic, sources: &SourceMap, entry: &Path, enc: Encoding) -> (PathBuf, lt::Diagnostic) {
    let (path, range) = match d.span {
        Some(s) => (sources.get(s.file).path.clone(), range(sources, s, enc)),
        None => (entry.to_path_buf(), lt::Range::default()),
    };
    let related: Vec<lt::DiagnosticRelatedInformation> = d
        .related
        .iter()
        .filter_map(|(s, text)| {
            Some(lt::DiagnosticRelatedInformation { location: location(sources, *s, enc)?, message: text.clone() })
        })
        .collect();
    let mut message = d.message.clone();
    if let Some(h) = &d.help {
        message.push_str("\nhelp: ");
        message.push_str(h);
    }
    let diag = lt::Diagnostic {
        range,
        severity: Some(severity(d.severity)),
        code: Some(lt::NumberOrString::String(d.code.to_string())),
        source: Some("mailc".into()),
        message,
        related_information: (!related.is_empty()).then_some(related),
        data: Some(serde_json::json!({ "code": d.code, "help": d.help, "label": d.label })),
        ..Default::default()
    };
    (path, diag)
}

// ---- requests -----------------------------------------------------------------------------

fn requests(rx: Receiver<(Request, Snapshot)>, out: Sender<Message>) {
    let mut worlds: HashMap<(PathBuf, Arc<String>), Arc<World>> = HashMap::new();
    while let Ok((req, snap)) = rx.recv() {
        if worlds.len() > 64 {
            worlds.clear();
        }
        let resp = match handle(&req, &snap, &mut worlds) {
            Ok(v) => Response::new_ok(req.id.clone(), v),
            Err((code, msg)) => Response::new_err(req.id.clone(), code as i32, msg),
        };
        if out.send(resp.into()).is_err() {
            return;
        }
    }
}

type Reply = Result<serde_json::Value, (ErrorCode, String)>;

fn params<P: serde::de::DeserializeOwned>(req: &Request) -> Result<P, (ErrorCode, String)> {
    serde_json::from_value(req.params.clone()).map_err(|e| (ErrorCode::InvalidParams, e.to_string()))
}

fn json<T: serde::Serialize>(v: T) -> Reply {
    serde_json::to_value(v).map_err(|e| (ErrorCode::InternalError, e.to_string()))
}

/// The world of a document, from cache while its text (and path) are unchanged.
fn world_of(
    snap: &Snapshot,
    path: &Path,
    worlds: &mut HashMap<(PathBuf, Arc<String>), Arc<World>>,
) -> Option<Arc<World>> {
    let text = match snap.docs.get(path) {
        Some(d) => d.text.clone(),
        None => Arc::new(std::fs::read_to_string(path).ok()?),
    };
    let key = (path.to_path_buf(), text);
    if let Some(w) = worlds.get(&key) {
        return Some(w.clone());
    }
    let w = Arc::new(ide::load(&path.display().to_string(), &overlay(snap)));
    worlds.insert(key, w.clone());
    Some(w)
}

/// The world of the document, then those of other policies (open, or in the workspace)
/// that include it: a module's names are used by its includers.
fn worlds_with(
    snap: &Snapshot,
    path: &Path,
    worlds: &mut HashMap<(PathBuf, Arc<String>), Arc<World>>,
) -> Vec<Arc<World>> {
    let mut out: Vec<Arc<World>> = world_of(snap, path, worlds).into_iter().collect();
    let mut others: Vec<PathBuf> = snap.docs.keys().filter(|p| p.as_path() != path).cloned().collect();
    for root in snap.roots.iter() {
        workspace_files(root, &mut others, 0);
    }
    others.sort();
    others.dedup();
    for p in others.iter().filter(|p| p.as_path() != path).take(500) {
        let text = match snap.docs.get(p) {
            Some(d) => d.text.clone(),
            None => match std::fs::read_to_string(p) {
                Ok(t) => Arc::new(t),
                Err(_) => continue,
            },
        };
        if !text.contains("include") {
            continue;
        }
        if let Some(w) = world_of(snap, p, worlds) {
            if w.sources.find(path).is_some() {
                out.push(w);
            }
        }
    }
    out
}

fn workspace_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    if depth > 6 || out.len() > 2000 {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name == "target" || name == "node_modules" {
            continue;
        }
        if p.is_dir() {
            workspace_files(&p, out, depth + 1);
        } else if name.ends_with(".mailpolicy") {
            out.push(normalize(&p));
        }
    }
}

fn doc_pos(
    snap: &Snapshot,
    tdp: &lt::TextDocumentPositionParams,
    worlds: &mut HashMap<(PathBuf, Arc<String>), Arc<World>>,
) -> Result<(Arc<World>, mailpolicy_lang::source::FileId, u32, PathBuf), (ErrorCode, String)> {
    let path = uri_path(&tdp.text_document.uri).ok_or((ErrorCode::InvalidParams, "not a file URI".into()))?;
    let w = world_of(snap, &path, worlds).ok_or((ErrorCode::InvalidParams, "unknown document".into()))?;
    let file = w.sources.find(&path).ok_or((ErrorCode::InvalidParams, "unknown document".into()))?;
    let off = offset(w.sources.get(file), tdp.position, snap.enc) as u32;
    Ok((w, file, off, path))
}

fn handle(req: &Request, snap: &Snapshot, worlds: &mut HashMap<(PathBuf, Arc<String>), Arc<World>>) -> Reply {
    let enc = snap.enc;
    match req.method.as_str() {
        lt::request::HoverRequest::METHOD => {
            let p: lt::HoverParams = params(req)?;
            let (w, file, off, _) = doc_pos(snap, &p.text_document_position_params, worlds)?;
            let h = ide::hover(&w, file, off).map(|(text, span)| lt::Hover {
                contents: lt::HoverContents::Markup(lt::MarkupContent { kind: lt::MarkupKind::Markdown, value: text }),
                range: Some(range(&w.sources, span, enc)),
            });
            json(h)
        }
        lt::request::Completion::METHOD => {
            let p: lt::CompletionParams = params(req)?;
            let (w, file, off, _) = doc_pos(snap, &p.text_document_position, worlds)?;
            let (items, replace) = ide::complete(&w, file, off);
            let r = range(&w.sources, replace, enc);
            let items: Vec<lt::CompletionItem> = items
                .into_iter()
                .map(|c| lt::CompletionItem {
                    kind: Some(match c.kind {
                        CompletionKind::Fact => lt::CompletionItemKind::FIELD,
                        CompletionKind::Test => lt::CompletionItemKind::FUNCTION,
                        CompletionKind::Action => lt::CompletionItemKind::METHOD,
                        CompletionKind::Keyword | CompletionKind::Stage => lt::CompletionItemKind::KEYWORD,
                        CompletionKind::Name(DeclKind::Var) => lt::CompletionItemKind::VARIABLE,
                        CompletionKind::Name(DeclKind::Rules) => lt::CompletionItemKind::MODULE,
                        CompletionKind::Name(_) => lt::CompletionItemKind::REFERENCE,
                        CompletionKind::Setting => lt::CompletionItemKind::PROPERTY,
                        CompletionKind::Value => lt::CompletionItemKind::VALUE,
                    }),
                    detail: (!c.detail.is_empty()).then_some(c.detail),
                    documentation: (!c.doc.is_empty()).then(|| {
                        lt::Documentation::MarkupContent(lt::MarkupContent {
                            kind: lt::MarkupKind::Markdown,
                            value: c.doc,
                        })
                    }),
                    text_edit: Some(lt::CompletionTextEdit::Edit(lt::TextEdit { range: r, new_text: c.label.clone() })),
                    label: c.label,
                    ..Default::default()
                })
                .collect();
            json(lt::CompletionResponse::List(lt::CompletionList { is_incomplete: false, items }))
        }
        lt::request::GotoDefinition::METHOD => {
            let p: lt::GotoDefinitionParams = params(req)?;
            let (w, file, off, path) = doc_pos(snap, &p.text_document_position_params, worlds)?;
            // On an include: the file it names.
            if let Some((_, target)) = w.includes.iter().find(|(s, _)| s.file == file && s.start <= off && off <= s.end)
            {
                let loc = Url::from_file_path(target).ok().map(|uri| lt::Location { uri, range: lt::Range::default() });
                return json(loc.map(|l| lt::GotoDefinitionResponse::Array(vec![l])));
            }
            let Some((name, var)) = w.name_at(file, off) else { return json(None::<()>) };
            let mut locs = Vec::new();
            for w in worlds_with(snap, &path, worlds) {
                for d in w.definitions(&name, var) {
                    if let Some(l) = location(&w.sources, d.span, enc) {
                        if !locs.contains(&l) {
                            locs.push(l);
                        }
                    }
                }
            }
            json(lt::GotoDefinitionResponse::Array(locs))
        }
        lt::request::References::METHOD => {
            let p: lt::ReferenceParams = params(req)?;
            let (w, file, off, path) = doc_pos(snap, &p.text_document_position, worlds)?;
            let Some((name, var)) = w.name_at(file, off) else { return json(Vec::<lt::Location>::new()) };
            let mut locs: Vec<lt::Location> = Vec::new();
            for w in worlds_with(snap, &path, worlds) {
                for s in w.references(&name, var, p.context.include_declaration) {
                    if let Some(l) = location(&w.sources, s, enc) {
                        if !locs.contains(&l) {
                            locs.push(l);
                        }
                    }
                }
            }
            json(locs)
        }
        lt::request::DocumentSymbolRequest::METHOD => {
            let p: lt::DocumentSymbolParams = params(req)?;
            let path = uri_path(&p.text_document.uri).ok_or((ErrorCode::InvalidParams, "not a file URI".into()))?;
            let Some(w) = world_of(snap, &path, worlds) else { return json(None::<()>) };
            let Some(file) = w.sources.find(&path) else { return json(None::<()>) };
            let syms: Vec<lt::DocumentSymbol> =
                ide::symbols(&w, file).iter().map(|s| symbol(&w.sources, s, enc)).collect();
            json(lt::DocumentSymbolResponse::Nested(syms))
        }
        lt::request::CodeActionRequest::METHOD => {
            let p: lt::CodeActionParams = params(req)?;
            let path = uri_path(&p.text_document.uri).ok_or((ErrorCode::InvalidParams, "not a file URI".into()))?;
            let text = match snap.docs.get(&path) {
                Some(d) => d.text.clone(),
                None => Arc::new(std::fs::read_to_string(&path).unwrap_or_default()),
            };
            let sf = SourceFile::new(String::new(), path.clone(), (*text).clone());
            let mut actions = Vec::new();
            for d in &p.context.diagnostics {
                actions.extend(code_actions(&p.text_document.uri, &sf, d, enc));
            }
            json(actions)
        }
        lt::request::Formatting::METHOD => {
            let p: lt::DocumentFormattingParams = params(req)?;
            let path = uri_path(&p.text_document.uri).ok_or((ErrorCode::InvalidParams, "not a file URI".into()))?;
            let Some(doc) = snap.docs.get(&path) else { return json(None::<()>) };
            let out = mailpolicy_lang::format::format(&doc.text).map_err(|e| (ErrorCode::InternalError, e))?;
            if out == *doc.text {
                return json(Vec::<lt::TextEdit>::new());
            }
            let sf = SourceFile::new(String::new(), path, (*doc.text).clone());
            let end = position(&sf, sf.text.len() as u32, enc);
            json(vec![lt::TextEdit { range: lt::Range { start: lt::Position::default(), end }, new_text: out }])
        }
        _ => Err((ErrorCode::MethodNotFound, format!("mailc lsp does not handle {}", req.method))),
    }
}

#[allow(deprecated)]
fn symbol(sources: &SourceMap, s: &ide::Symbol, enc: Encoding) -> lt::DocumentSymbol {
    let kind = match s.kind {
        "list" => lt::SymbolKind::ARRAY,
        "table" => lt::SymbolKind::STRUCT,
        "secret" => lt::SymbolKind::KEY,
        "scanner" => lt::SymbolKind::OBJECT,
        "rules" => lt::SymbolKind::FUNCTION,
        "stage" => lt::SymbolKind::EVENT,
        "server" | "listener" => lt::SymbolKind::NAMESPACE,
        "setting" => lt::SymbolKind::PROPERTY,
        "include" => lt::SymbolKind::FILE,
        _ => lt::SymbolKind::MODULE,
    };
    lt::DocumentSymbol {
        name: s.name.clone(),
        detail: Some(s.detail.clone()),
        kind,
        tags: None,
        deprecated: None,
        range: range(sources, s.span, enc),
        selection_range: range(sources, s.selection, enc),
        children: (!s.children.is_empty()).then(|| s.children.iter().map(|c| symbol(sources, c, enc)).collect()),
    }
}

// ---- code actions -------------------------------------------------------------------------

fn help_of(d: &lt::Diagnostic) -> Option<String> {
    if let Some(h) = d.data.as_ref().and_then(|v| v.get("help")).and_then(|h| h.as_str()) {
        return Some(h.to_string());
    }
    d.message.split_once("\nhelp: ").map(|(_, h)| h.to_string())
}

fn code_of(d: &lt::Diagnostic) -> String {
    match &d.code {
        Some(lt::NumberOrString::String(s)) => s.clone(),
        _ => String::new(),
    }
}

/// The suggestion in "did you mean `X`?" (or "X" or 'X').
fn suggestion(help: &str) -> Option<String> {
    let rest = help.split("did you mean ").nth(1)?;
    let q = rest.chars().next()?;
    let inner = &rest[q.len_utf8()..];
    let end = inner.find(q)?;
    Some(inner[..end].to_string())
}

fn edit(uri: &Url, edits: Vec<lt::TextEdit>) -> lt::WorkspaceEdit {
    lt::WorkspaceEdit { changes: Some(HashMap::from([(uri.clone(), edits)])), ..Default::default() }
}

fn action(title: String, d: &lt::Diagnostic, e: lt::WorkspaceEdit) -> lt::CodeActionOrCommand {
    lt::CodeActionOrCommand::CodeAction(lt::CodeAction {
        title,
        kind: Some(lt::CodeActionKind::QUICKFIX),
        diagnostics: Some(vec![d.clone()]),
        edit: Some(e),
        is_preferred: Some(true),
        ..Default::default()
    })
}

fn code_actions(uri: &Url, sf: &SourceFile, d: &lt::Diagnostic, enc: Encoding) -> Vec<lt::CodeActionOrCommand> {
    let mut out = Vec::new();
    let Some(help) = help_of(d) else { return out };
    let code = code_of(d);
    let a = offset(sf, d.range.start, enc);
    let b = offset(sf, d.range.end, enc).max(a);
    // Did you mean: replace the misspelt name in the diagnostic's span.
    if let Some(s) = suggestion(&help) {
        // `${client.ptr}` suggested for `${client.adr}`: the name inside.
        let s = s.strip_prefix("${").and_then(|x| x.strip_suffix('}')).map(str::to_string).unwrap_or(s);
        let text = &sf.text[a..b];
        // The name-like run of the span closest to the suggestion.
        let mut best: Option<(usize, usize, usize)> = None;
        let mut run: Option<usize> = None;
        let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
        for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
            match (run, is_name(c)) {
                (None, true) => run = Some(i),
                (Some(r), false) => {
                    let dist = distance(&text[r..i], &s);
                    if best.is_none_or(|(_, _, bd)| dist < bd) {
                        best = Some((r, i, dist));
                    }
                    run = None;
                }
                _ => {}
            }
        }
        if let Some((x, y, _)) = best {
            let start = sf.text.len().min(a + x);
            let end = sf.text.len().min(a + y);
            let range = lt::Range { start: position(sf, start as u32, enc), end: position(sf, end as u32, enc) };
            out.push(action(
                format!("Replace with `{s}`"),
                d,
                edit(uri, vec![lt::TextEdit { range, new_text: s.clone() }]),
            ));
        }
    }
    // Move to the right stage.
    if code == "mailc::stage" {
        if let Some(stage) = help.split("move the rule to `on ").nth(1).and_then(|r| r.split('`').next()) {
            if let Some(e) = move_to_stage(sf, a, stage, enc) {
                out.push(action(format!("Move the rule to `on {stage}`"), d, edit(uri, e)));
            }
        }
    }
    // A missing capability.
    if code == "mailc::require" {
        if let Some(req) = help.split("add `").nth(1).and_then(|r| r.split('`').next()) {
            let at = lt::Position::default();
            out.push(action(
                format!("Add `{req}`"),
                d,
                edit(uri, vec![lt::TextEdit { range: lt::Range { start: at, end: at }, new_text: format!("{req}\n") }]),
            ));
        }
    }
    out
}

fn distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + usize::from(a[i - 1] != b[j - 1]));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Edits that move the statement of a stage block holding byte `at` into the block of
/// `stage` (made at the end of the file when there is none).
fn move_to_stage(sf: &SourceFile, at: usize, stage: &str, enc: Encoding) -> Option<Vec<lt::TextEdit>> {
    use mailpolicy_lang::syntax::{self, Tree};
    let text = &sf.text;
    let toks = syntax::lex(text);
    let trees = syntax::tree(text, &toks, true);
    let items = syntax::statements(text, &toks, &trees, true);
    let word = |k: &Tree| match k {
        Tree::Tok(i) => toks[*i].text(text),
        _ => "",
    };
    let mut from: Option<(usize, usize)> = None;
    let mut target_close: Option<usize> = None;
    for (a, b) in &items {
        let kids = &trees[*a..*b];
        let head: Vec<&str> = kids.iter().take(2).map(word).collect();
        let is_target = match head.as_slice() {
            ["on", s] => *s == stage,
            ["route", ..] => stage == "route",
            _ => false,
        };
        let Some(Tree::Group { kids: body, close, .. }) = kids.iter().find(|k| matches!(k, Tree::Group { .. })) else {
            continue;
        };
        if is_target {
            target_close = close.map(|c| toks[c].start as usize);
        }
        if !matches!(head.first(), Some(&"on" | &"route")) {
            continue;
        }
        for (x, y) in syntax::statements(text, &toks, body, false) {
            let (s, e) = syntax::range(&toks, &body[x..y])?;
            if s <= at && at <= e {
                // Whole lines, from the statement's line start to its line end.
                let ls = text[..s].rfind('\n').map_or(0, |n| n + 1);
                let le = text[e..].find('\n').map_or(text.len(), |n| e + n + 1);
                if !text[ls..s].trim().is_empty() || !text[e..le].trim().is_empty() {
                    return None; // shares its line with other code
                }
                from = Some((ls, le));
            }
        }
    }
    let (ls, le) = from?;
    let mut moved = text[ls..le].to_string();
    if !moved.ends_with('\n') {
        moved.push('\n');
    }
    let pos = |o: usize| position(sf, o as u32, enc);
    let delete = lt::TextEdit { range: lt::Range { start: pos(ls), end: pos(le) }, new_text: String::new() };
    let insert = match target_close {
        Some(c) if c < ls || c >= le => {
            let line_start = text[..c].rfind('\n').map_or(0, |n| n + 1);
            let at = if text[line_start..c].trim().is_empty() { line_start } else { c };
            lt::TextEdit { range: lt::Range { start: pos(at), end: pos(at) }, new_text: moved }
        }
        _ => {
            let end = text.len();
            let sep = if text.ends_with('\n') { "\n" } else { "\n\n" };
            let head = if stage == "route" { "route".to_string() } else { format!("on {stage}") };
            lt::TextEdit {
                range: lt::Range { start: pos(end), end: pos(end) },
                new_text: format!("{sep}{head} {{\n{moved}}}\n"),
            }
        }
    };
    Some(vec![delete, insert])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fix(text: &str, line: u32, start: u32, end: u32, code: &str, help: &str) -> String {
        let sf = SourceFile::new(String::new(), PathBuf::from("/p.mailpolicy"), text.to_string());
        let uri = Url::from_file_path("/p.mailpolicy").expect("uri");
        let d = lt::Diagnostic {
            range: lt::Range {
                start: lt::Position { line, character: start },
                end: lt::Position { line, character: end },
            },
            code: Some(lt::NumberOrString::String(code.into())),
            message: format!("x\nhelp: {help}"),
            ..Default::default()
        };
        let acts = code_actions(&uri, &sf, &d, Encoding::Utf16);
        let Some(lt::CodeActionOrCommand::CodeAction(a)) = acts.first() else { panic!("no action") };
        let edits =
            a.edit.as_ref().and_then(|e| e.changes.as_ref()).and_then(|c| c.get(&uri)).cloned().unwrap_or_default();
        let mut out = text.to_string();
        let mut spans: Vec<(usize, usize, String)> = edits
            .iter()
            .map(|e| {
                (
                    offset(&sf, e.range.start, Encoding::Utf16),
                    offset(&sf, e.range.end, Encoding::Utf16),
                    e.new_text.clone(),
                )
            })
            .collect();
        spans.sort_by_key(|s| std::cmp::Reverse(s.0));
        for (a, b, t) in spans {
            out.replace_range(a..b, &t);
        }
        out
    }

    #[test]
    fn quick_fixes() {
        let t = "on rcpt {\n  reject 554 5.7.1 \"${client.adr} no\";\n}\n";
        assert!(
            fix(t, 1, 20, 33, "mailc::interpolation", "did you mean `${client.ptr}`?").contains("\"${client.ptr} no\"")
        );
        let t = "server {\n  max_mesage_size 10M;\n}\n";
        assert!(
            fix(t, 1, 2, 17, "mailc::setting", "did you mean `max_message_size`?").contains("  max_message_size 10M;")
        );
        let t = "require \"dnsbll\";\n";
        assert_eq!(fix(t, 0, 8, 16, "mailc::require", "did you mean \"dnsbl\"?"), "require \"dnsbl\";\n");
        let t = "on rcpt {\n  if dnsbl \"z.example\" { reject; }\n}\n";
        assert!(fix(t, 1, 5, 10, "mailc::require", "add `require \"dnsbl\";` at the top of the policy")
            .starts_with("require \"dnsbl\";\non rcpt"));
        // No block of the stage yet: one is made at the end.
        let t = "on rcpt {\n  if header \"s\" :is \"x\" { reject; }\n  accept;\n}\n";
        let out = fix(t, 1, 5, 11, "mailc::stage", "move the rule to `on data`");
        assert_eq!(out, "on rcpt {\n  accept;\n}\n\non data {\n  if header \"s\" :is \"x\" { reject; }\n}\n");
    }
}
