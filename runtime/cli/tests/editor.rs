//! The editor side of `mailc`, through the real binary: `mailc lsp` spoken to over its
//! standard input and output by a JSON-RPC harness, and by a real client (Neovim,
//! headless); `mailc fmt`; `mailc check --format json`'s positions.
//!
//! No timed assertions: every wait is bounded, but only so that a broken server fails the
//! test instead of hanging it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const MAILC: &str = env!("CARGO_BIN_EXE_mailc");
const WAIT: Duration = Duration::from_secs(180);

/// A scratch directory, removed when the test ends (passed or failed).
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("mailc-editor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    TempDir(d)
}

fn uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

/// A language client over the server's stdio.
struct Client {
    child: Child,
    stdin: ChildStdin,
    rx: Receiver<Value>,
    next: i64,
    /// Notifications and server requests seen while waiting for something else.
    seen: VecDeque<Value>,
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Client {
    fn start(root: &Path) -> Client {
        let mut child = Command::new(MAILC)
            .arg("lsp")
            .env("MAILPOLICY_STDLIB", Path::new(env!("CARGO_MANIFEST_DIR")).join("../../stdlib/policy"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start mailc lsp");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            loop {
                let mut len = None;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some(v) = line.strip_prefix("Content-Length: ") {
                        len = v.parse::<usize>().ok();
                    }
                }
                let Some(n) = len else { return };
                let mut body = vec![0; n];
                if r.read_exact(&mut body).is_err() {
                    return;
                }
                let Ok(v) = serde_json::from_slice::<Value>(&body) else { return };
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        let mut c = Client { child, stdin, rx, next: 1, seen: VecDeque::new() };
        let init = c.request(
            "initialize",
            json!({
                "processId": null,
                "rootUri": uri(root),
                "workspaceFolders": [{"uri": uri(root), "name": "policies"}],
                "capabilities": {},
            }),
        );
        assert_eq!(init["capabilities"]["hoverProvider"], json!(true), "{init}");
        c.notify("initialized", json!({}));
        c
    }

    fn send(&mut self, v: Value) {
        let body = v.to_string();
        write!(self.stdin, "Content-Length: {}\r\n\r\n{body}", body.len()).expect("write to the server");
        self.stdin.flush().expect("flush");
    }

    fn notify(&mut self, method: &str, params: Value) {
        self.send(json!({"jsonrpc": "2.0", "method": method, "params": params}));
    }

    fn send_request(&mut self, method: &str, params: Value) -> i64 {
        let id = self.next;
        self.next += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        id
    }

    fn recv(&mut self, deadline: Instant) -> Value {
        match self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(v) => v,
            Err(RecvTimeoutError::Timeout) => panic!("no message from mailc lsp in time; seen: {:?}", self.seen),
            Err(RecvTimeoutError::Disconnected) => panic!("mailc lsp closed its output; seen: {:?}", self.seen),
        }
    }

    /// Wait for the response to `id`, keeping notifications for later.
    fn response(&mut self, id: i64) -> Value {
        if let Some(i) = self.seen.iter().position(|m| m["id"] == json!(id) && m.get("method").is_none()) {
            let m = self.seen.remove(i).expect("seen message");
            return m["result"].clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.recv(deadline);
            if m["id"] == json!(id) && m.get("method").is_none() {
                assert!(m.get("error").is_none(), "error response: {m}");
                return m["result"].clone();
            }
            self.seen.push_back(m);
        }
    }

    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.send_request(method, params);
        self.response(id)
    }

    /// The next `publishDiagnostics` for `u` whose diagnostics satisfy `pred`.
    fn diagnostics(&mut self, u: &str, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let is_it = |m: &Value| {
            m["method"] == json!("textDocument/publishDiagnostics") && m["params"]["uri"] == json!(u) && {
                let d = m["params"]["diagnostics"].as_array().cloned().unwrap_or_default();
                pred(&d)
            }
        };
        if let Some(i) = self.seen.iter().position(is_it) {
            let m = self.seen.remove(i).expect("seen");
            return m["params"]["diagnostics"].as_array().cloned().unwrap_or_default();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let m = self.recv(deadline);
            if is_it(&m) {
                return m["params"]["diagnostics"].as_array().cloned().unwrap_or_default();
            }
            self.seen.push_back(m);
        }
    }

    fn open(&mut self, path: &Path, text: &str) {
        self.notify(
            "textDocument/didOpen",
            json!({"textDocument": {"uri": uri(path), "languageId": "mailpolicy", "version": 1, "text": text}}),
        );
    }

    fn shutdown(mut self) {
        let id = self.send_request("shutdown", Value::Null);
        self.response(id);
        self.notify("exit", Value::Null);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                assert!(status.success(), "mailc lsp exited with {status}");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mailc lsp did not exit after shutdown and exit");
    }
}

fn pos(text: &str, needle: &str, nth: usize) -> Value {
    let off = text.match_indices(needle).nth(nth).map(|(i, _)| i).unwrap_or_else(|| panic!("{needle} not in text"));
    let line = text[..off].matches('\n').count();
    let col = off - text[..off].rfind('\n').map_or(0, |n| n + 1);
    json!({"line": line, "character": col})
}

fn codes(d: &[Value]) -> Vec<String> {
    let mut c: Vec<String> = d.iter().map(|d| d["code"].as_str().unwrap_or("").to_string()).collect();
    c.sort();
    c
}

const LISTS: &str = "list trusted = cidr [\"10.0.0.0/8\"];\nlist local_domains = domains [\"example.com\"];\n\
server {\n  local_domains local_domains;\n}\n";

const MAIN: &str = "# The policy under edit.\ninclude \"lists.mailpolicy\";\n\n\
rules checks {\n  if client.ip in trusted { set inside; }\n}\n\n\
on rcpt {\n  use checks;\n  if header \"subject\" :contains \"x\" { reject; }\n  rejct 550 \"no\";\n  if recipient.domain not in local_domains and not flag inside { reject 554 5.7.1 \"Relay access denied\"; }\n}\n\n\
on data {\n  log \"seen\";\n}\n";

#[test]
fn lsp_over_stdio() {
    let dir = tempdir("lsp");
    let lists = dir.join("lists.mailpolicy");
    let main = dir.join("main.mailpolicy");
    std::fs::write(&lists, LISTS).expect("write");
    std::fs::write(&main, MAIN).expect("write");
    let mut c = Client::start(&dir);
    c.open(&main, MAIN);
    let mu = uri(&main);
    let d = c.diagnostics(&mu, |d| !d.is_empty());
    assert_eq!(codes(&d), ["mailc::stage", "mailc::undefined"], "{d:?}");
    let stage = d.iter().find(|d| d["code"] == json!("mailc::stage")).expect("stage");
    assert_eq!(stage["range"]["start"], pos(MAIN, "header", 0), "{stage}");
    assert_eq!(
        stage["range"]["end"]["character"],
        json!(pos(MAIN, "header", 0)["character"].as_u64().unwrap_or(0) + 6)
    );
    assert!(stage["message"].as_str().unwrap_or("").contains("help: move the rule to `on data`"), "{stage}");

    // Hover on a fact, a test, an action and a declared name.
    let hover = |c: &mut Client, needle: &str, nth: usize| {
        let h =
            c.request("textDocument/hover", json!({"textDocument": {"uri": mu}, "position": pos(MAIN, needle, nth)}));
        h["contents"]["value"].as_str().unwrap_or("").to_string()
    };
    let h = hover(&mut c, "recipient.domain", 0);
    assert!(h.contains("a string") && h.contains("rcpt, route, deliver, bounce and delay"), "{h}");
    let h = hover(&mut c, "header", 0);
    assert!(h.contains("data and later"), "{h}");
    let h = hover(&mut c, "reject", 0);
    assert!(h.contains("5xx"), "{h}");
    let h = hover(&mut c, "trusted", 0);
    assert!(h.contains("list trusted = cidr"), "{h}");

    // Completion: facts of the stage at the cursor, names after `in`, settings.
    let complete = |c: &mut Client, at: Value| -> Vec<String> {
        let r = c.request("textDocument/completion", json!({"textDocument": {"uri": mu}, "position": at}));
        r["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|i| i["label"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let at_rcpt = pos(MAIN, "recipient.domain not", 0);
    let labels = complete(&mut c, at_rcpt);
    assert!(labels.contains(&"recipient.domain".to_string()) && labels.contains(&"sender".to_string()), "{labels:?}");
    assert!(!labels.contains(&"message.size".to_string()), "a data fact offered in rcpt: {labels:?}");
    let at_data = pos(MAIN, "log", 0);
    let labels = complete(&mut c, at_data);
    assert!(labels.contains(&"header".to_string()) && !labels.contains(&"greet".to_string()), "{labels:?}");
    let in_rules = pos(MAIN, "client.ip", 0);
    let labels = complete(&mut c, in_rules);
    assert!(labels.contains(&"recipient".to_string()), "the rules block is used in rcpt: {labels:?}");
    let after_in = pos(MAIN, "local_domains and", 0);
    let labels = complete(&mut c, after_in);
    assert!(labels.contains(&"local_domains".to_string()) && labels.contains(&"trusted".to_string()), "{labels:?}");

    // Definition and references across the include; variables too.
    let def =
        c.request("textDocument/definition", json!({"textDocument": {"uri": mu}, "position": pos(MAIN, "trusted", 0)}));
    assert_eq!(def[0]["uri"], json!(uri(&lists)), "{def}");
    assert_eq!(def[0]["range"]["start"], json!({"line": 0, "character": 5}), "{def}");
    let refs = c.request(
        "textDocument/references",
        json!({"textDocument": {"uri": mu}, "position": pos(MAIN, "local_domains", 0), "context": {"includeDeclaration": true}}),
    );
    let files: Vec<&str> =
        refs.as_array().map(|a| a.iter().filter_map(|l| l["uri"].as_str()).collect()).unwrap_or_default();
    assert_eq!(files.len(), 3, "declaration, the server setting and the rule: {refs}");
    let var_refs = c.request(
        "textDocument/references",
        json!({"textDocument": {"uri": mu}, "position": pos(MAIN, "inside", 1), "context": {"includeDeclaration": true}}),
    );
    assert_eq!(var_refs.as_array().map_or(0, Vec::len), 2, "{var_refs}");
    let rule_def =
        c.request("textDocument/definition", json!({"textDocument": {"uri": mu}, "position": pos(MAIN, "checks", 1)}));
    assert_eq!(rule_def[0]["range"]["start"], pos(MAIN, "checks", 0), "{rule_def}");

    // Document symbols.
    let syms = c.request("textDocument/documentSymbol", json!({"textDocument": {"uri": mu}}));
    let names: Vec<&str> =
        syms.as_array().map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect()).unwrap_or_default();
    assert_eq!(names, ["include lists.mailpolicy", "rules checks", "on rcpt", "on data"], "{syms}");

    // Code actions: did you mean, and move to the right stage.
    let undefined = d.iter().find(|d| d["code"] == json!("mailc::undefined")).expect("undefined").clone();
    let acts = c.request(
        "textDocument/codeAction",
        json!({"textDocument": {"uri": mu}, "range": undefined["range"], "context": {"diagnostics": [undefined]}}),
    );
    let e = &acts[0]["edit"]["changes"][&mu][0];
    assert_eq!(e["newText"], json!("reject"), "{acts}");
    assert_eq!(e["range"]["start"], pos(MAIN, "rejct", 0), "{acts}");
    let acts = c.request(
        "textDocument/codeAction",
        json!({"textDocument": {"uri": mu}, "range": stage["range"], "context": {"diagnostics": [stage.clone()]}}),
    );
    assert_eq!(acts[0]["title"], json!("Move the rule to `on data`"), "{acts}");
    let edits = acts[0]["edit"]["changes"][&mu].as_array().cloned().unwrap_or_default();
    let fixed = apply(MAIN, &edits);
    assert!(fixed.contains("on data {\n  log \"seen\";\n  if header"), "{fixed}");

    // The fixed document: a change with a range, then the diagnostics are gone.
    let at = pos(&fixed, "rejct", 0);
    let end = json!({"line": at["line"], "character": at["character"].as_u64().unwrap_or(0) + 14});
    let fixed = apply(&fixed, &[json!({"range": {"start": at, "end": end}, "newText": "log \"no\""})]);
    assert!(fixed.contains("  log \"no\";\n"), "{fixed}");
    let full_range =
        json!({"start": {"line": 0, "character": 0}, "end": {"line": MAIN.matches('\n').count() + 1, "character": 0}});
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": mu, "version": 2}, "contentChanges": [{"range": full_range, "text": fixed}]}),
    );
    let d = c.diagnostics(&mu, |d| d.is_empty());
    assert!(d.is_empty());

    // Formatting gives the canonical layout.
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": mu, "version": 3}, "contentChanges": [{"text": "on rcpt{reject;}\n"}]}),
    );
    let f = c.request(
        "textDocument/formatting",
        json!({"textDocument": {"uri": mu}, "options": {"tabSize": 2, "insertSpaces": true}}),
    );
    assert_eq!(f[0]["newText"], json!("on rcpt {\n  reject;\n}\n"), "{f}");
    c.shutdown();
}

/// Apply LSP text edits (ranges in UTF-16 units; the texts here are ASCII).
fn apply(text: &str, edits: &[Value]) -> String {
    let off = |p: &Value| {
        let line = p["line"].as_u64().unwrap_or(0) as usize;
        let ch = p["character"].as_u64().unwrap_or(0) as usize;
        let start: usize = text.split_inclusive('\n').take(line).map(str::len).sum();
        (start + ch).min(text.len())
    };
    let mut e: Vec<(usize, usize, String)> = edits
        .iter()
        .map(|e| (off(&e["range"]["start"]), off(&e["range"]["end"]), e["newText"].as_str().unwrap_or("").to_string()))
        .collect();
    e.sort_by_key(|x| std::cmp::Reverse(x.0));
    let mut out = text.to_string();
    for (a, b, t) in e {
        out.replace_range(a..b, &t);
    }
    out
}

/// The relay proof runs in the editor too, and several syntax errors show at once.
#[test]
fn lsp_relay_proof_and_recovery() {
    let dir = tempdir("relay");
    let p = dir.join("relay.mailpolicy");
    let text = "list local_domains = domains [\"example.com\"];\nserver { local_domains local_domains; }\non rcpt {\n  if sender.domain in local_domains { accept; }\n}\n";
    std::fs::write(&p, text).expect("write");
    let mut c = Client::start(&dir);
    c.open(&p, text);
    let d = c.diagnostics(&uri(&p), |d| !d.is_empty());
    assert_eq!(codes(&d), ["mailc::open-relay"], "{d:?}");
    let broken = "on connect {\n  reject 554 \"x\"\n}\non rcpt {\n  if a && b { reject; }\n}\n";
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri(&p), "version": 2}, "contentChanges": [{"text": broken}]}),
    );
    let d = c.diagnostics(&uri(&p), |d| codes(d).iter().all(|c| c == "mailc::syntax") && !d.is_empty());
    assert_eq!(d.len(), 2, "{d:?}");
    c.shutdown();
}

/// A 10,000-rule policy: requests are answered while its analysis runs off the main loop.
#[test]
fn lsp_big_policy_stays_responsive() {
    let dir = tempdir("big");
    let p = dir.join("big.mailpolicy");
    let mut text = String::from("list blocked = cidr [\"192.0.2.0/24\"];\non rcpt {\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  if recipient :is \"user{i}@example.com\" and client.ip not in blocked {{ reject 550 5.1.1 \"no user{i}\"; }}\n"
        ));
    }
    text.push_str("}\n");
    std::fs::write(&p, &text).expect("write");
    let mut c = Client::start(&dir);
    c.open(&p, &text);
    // Asked right after the open: answered before the analysis has published anything.
    let id = c.send_request(
        "textDocument/hover",
        json!({"textDocument": {"uri": uri(&p)}, "position": {"line": 9000, "character": 8}}),
    );
    let h = c.response(id);
    assert!(h["contents"]["value"].as_str().unwrap_or("").contains("recipient"), "{h}");
    assert!(
        !c.seen.iter().any(|m| m["method"] == json!("textDocument/publishDiagnostics")),
        "the hover waited for the analysis"
    );
    let id = c.send_request("textDocument/documentSymbol", json!({"textDocument": {"uri": uri(&p)}}));
    assert_eq!(c.response(id).as_array().map_or(0, Vec::len), 2);
    // An edit made while the first analysis runs: only the newest text's diagnostics count.
    let edited = text.replace("user9999@example.com\" and", "user9999@example.com\" and header \"x\" :is \"y\" and");
    c.notify(
        "textDocument/didChange",
        json!({"textDocument": {"uri": uri(&p), "version": 2}, "contentChanges": [{"text": edited}]}),
    );
    let d = c.diagnostics(&uri(&p), |d| !d.is_empty());
    assert_eq!(codes(&d), ["mailc::stage"], "{d:?}");
    c.shutdown();
}

/// A real client: Neovim, headless, opens a policy and receives the server's diagnostics.
#[test]
fn neovim_receives_diagnostics() {
    let nvim = ["/usr/bin/nvim", "/usr/local/bin/nvim"].into_iter().find(|p| Path::new(p).exists());
    let nvim = nvim.expect("nvim not found (Debian package neovim); run tests/run.sh, which installs it");
    let dir = tempdir("nvim");
    let p = dir.join("policy.mailpolicy");
    std::fs::write(&p, "on rcpt {\n  if header \"subject\" :contains \"x\" { reject; }\n  rejct;\n}\n").expect("write");
    let out = dir.join("diagnostics.txt");
    let init = dir.join("init.lua");
    std::fs::write(
        &init,
        format!(
            r#"
local out = "{out}"
vim.api.nvim_create_autocmd("BufReadPost", {{ pattern = "*.mailpolicy", callback = function(ev)
  local id = vim.lsp.start_client({{ name = "mailc", cmd = {{ "{mailc}", "lsp" }}, root_dir = "{root}" }})
  vim.lsp.buf_attach_client(ev.buf, id)
end }})
vim.cmd("edit {file}")
local ok = vim.wait(120000, function() return #vim.diagnostic.get(0) >= 2 end, 50)
local lines = {{}}
for _, d in ipairs(vim.diagnostic.get(0)) do
  table.insert(lines, string.format("%d:%d %s %s", d.lnum + 1, d.col + 1, tostring(d.code), (d.message:gsub("\n.*", ""))))
end
table.sort(lines)
if not ok then table.insert(lines, "TIMEOUT") end
vim.fn.writefile(lines, out)
vim.cmd("qall!")
"#,
            out = out.display(),
            mailc = MAILC,
            root = dir.display(),
            file = p.display()
        ),
    )
    .expect("write init.lua");
    let status = Command::new(nvim)
        .args(["--headless", "--clean", "-u"])
        .arg(&init)
        .env("HOME", dir.as_path())
        .env("XDG_STATE_HOME", dir.join("state"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env("MAILPOLICY_STDLIB", Path::new(env!("CARGO_MANIFEST_DIR")).join("../../stdlib/policy"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .status()
        .expect("run nvim");
    assert!(status.success(), "nvim exited with {status}");
    let got = std::fs::read_to_string(&out).expect("nvim wrote the diagnostics");
    assert_eq!(
        got,
        "2:6 mailc::stage `header` does not exist yet in `rcpt`: it becomes available in `data`\n3:3 mailc::undefined unknown action `rejct`\n",
        "{got}"
    );
}

#[test]
fn check_json_has_end_positions_and_related_spans() {
    let dir = tempdir("json");
    let p = dir.join("dup.mailpolicy");
    std::fs::write(&p, "list a = [\"x\"];\nlist a = [\"y\"];\non rcpt {\n  if recipient in a { reject; }\n}\n")
        .expect("write");
    let out = Command::new(MAILC).args(["check", "--format", "json"]).arg(&p).output().expect("run mailc check");
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    let d = &lines[0];
    assert_eq!((d["line"].clone(), d["column"].clone()), (json!(2), json!(6)));
    assert_eq!((d["end_line"].clone(), d["end_column"].clone()), (json!(2), json!(7)));
    assert_eq!(d["label"], json!("declared again here"));
    let r = &d["related"][0];
    assert_eq!(
        (r["line"].clone(), r["column"].clone(), r["end_column"].clone()),
        (json!(1), json!(6), json!(7)),
        "{d}"
    );
    assert_eq!(r["message"], json!("first declared here"));
    assert_eq!(r["file"], d["file"]);
}

#[test]
fn fmt_rewrites_checks_and_reads_stdin() {
    let dir = tempdir("fmt");
    let p = dir.join("p.mailpolicy");
    let messy = "# keep me\non rcpt{if recipient :is \"a@example.com\"{reject;}   # and me\n}\n";
    std::fs::write(&p, messy).expect("write");
    let run = |args: &[&str]| Command::new(MAILC).arg("fmt").args(args).arg(&p).output().expect("run mailc fmt");
    assert_eq!(run(&["--check"]).status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(&p).expect("read"), messy, "--check writes nothing");
    assert_eq!(run(&[]).status.code(), Some(0));
    let formatted = std::fs::read_to_string(&p).expect("read");
    assert_eq!(formatted, "# keep me\non rcpt {\n  if recipient :is \"a@example.com\" { reject; } # and me\n}\n");
    assert_eq!(run(&["--check"]).status.code(), Some(0));
    let mut child = Command::new(MAILC)
        .args(["fmt", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run mailc fmt -");
    child.stdin.take().expect("stdin").write_all(messy.as_bytes()).expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(String::from_utf8_lossy(&out.stdout), formatted);
    let missing = Command::new(MAILC).args(["fmt", "/nonexistent/x.mailpolicy"]).output().expect("run");
    assert_eq!(missing.status.code(), Some(2));
}
