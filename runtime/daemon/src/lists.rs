//! Mailing lists (R11, R39; spec/language.md section 4.9): `mailing_list NAME = newsletter
//! "ADDRESS" { ... }` declared in the policy, run by the queue manager and the `http`
//! listener (`web.rs`).
//!
//! - **Posts**: the route stage's `expand LIST` turns the list address into one queued
//!   copy whose recipients are the subscribers ([`members`]); each subscriber is then routed
//!   as usual, with the VERP sender `owner-LIST+local=domain@DOMAIN` and the List-* headers
//!   carrying the subscriber's own unsubscribe token ([`personal`]), so every subscriber
//!   gets an envelope of their own and DKIM signs it after those headers are added.
//! - **Service addresses**, handled here before the route stage ([`service`]):
//!   `LIST-request@` takes `subscribe`, `unsubscribe [TOKEN]` and `confirm TOKEN` by mail;
//!   `owner-LIST+VERP@` takes bounces (counted per subscriber, [`bounce`]); `owner-LIST@`
//!   goes to the owner, or counts a DSN that names a subscriber.
//! - **Subscribers** live in the list's table: a `list` file the daemon rewrites (a new file
//!   renamed over the old one, fsynced), an `sql` table's `members`/`insert`/`delete`, or
//!   an `ldap` table's group entry (`base`), one value of its `attribute` per subscriber,
//!   changed by LDAP modify (`ldap.rs`).
//! - **Bounces**: hard bounces (RFC 3464 `Action: failed` with a 5.x.x status, or a
//!   null-sender message to a VERP address that is no DSN) are kept per subscriber in
//!   `SPOOL/lists/LIST.bounces`; `bounce_limit` of them within `bounce_window` removes the
//!   subscriber and tells the owner.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mail_parser::MimeHeaders;
use mailpolicy_lang::ir::{Program, Resource};
use mailpolicy_lang::resources::{MailingListOptions, Options};

use crate::ldap::LdapTable;
use crate::sql::{ListStatement, SqlTable};
use mailpolicy_stdlib::listtoken;

use crate::conn::{QueuedMessage, QueuedRcpt};
use crate::headers::Edit;
use crate::lookup::Lookups;
use crate::Shared;

/// One declared mailing list with its settings resolved.
#[derive(Clone, Debug)]
pub struct List {
    pub name: String,
    /// `news@example.com`, lower case.
    pub address: String,
    pub local: String,
    pub domain: String,
    pub owner: String,
    /// The public base URL of the web endpoint, without a trailing `/`.
    pub web: String,
    pub description: String,
    pub keys: Vec<(u8, Vec<u8>)>,
    pub confirm_ms: u64,
    pub bounce_limit: usize,
    pub bounce_window_ms: u64,
    /// The subscribers' table.
    pub table: Option<Resource>,
}

impl List {
    fn from_resource(prog: &Program, lookups: &Lookups, r: &Resource) -> List {
        let address = r.source.clone().unwrap_or_default().to_ascii_lowercase();
        let (local, domain) = mailpolicy_stdlib::address::split(&address);
        let o = match &r.options {
            Options::MailingList(o) => o.clone(),
            _ => MailingListOptions::default(),
        };
        let keys = o
            .keys
            .and_then(|id| prog.secrets.get(id.index()))
            .and_then(|s| lookups.secret(&s.name))
            .map(listtoken::parse_keys)
            .unwrap_or_default();
        let table = o.subscribers.and_then(|id| prog.tables.get(id.index())).cloned();
        List {
            name: r.name.clone(),
            local: local.to_string(),
            domain: domain.to_string(),
            address: address.clone(),
            owner: o.owner.clone(),
            web: o.web.trim_end_matches('/').to_string(),
            description: o.description.clone().unwrap_or_else(|| r.name.clone()),
            keys,
            confirm_ms: o.confirm_lifetime.as_millis().try_into().unwrap_or(u64::MAX),
            bounce_limit: usize::try_from(o.bounce_limit).unwrap_or(usize::MAX).max(1),
            bounce_window_ms: o.bounce_window.as_millis().try_into().unwrap_or(u64::MAX),
            table,
        }
    }

    pub fn request_address(&self) -> String {
        format!("{}-request@{}", self.local, self.domain)
    }
    pub fn owner_address(&self) -> String {
        format!("owner-{}@{}", self.local, self.domain)
    }
    /// The VERP envelope sender of the copy for `subscriber`: `owner-LIST+local=domain@DOMAIN`.
    pub fn verp(&self, subscriber: &str) -> String {
        let (l, d) = mailpolicy_stdlib::address::split(subscriber);
        format!("owner-{}+{}={}@{}", self.local, l, d, self.domain)
    }
    /// The List-Id (RFC 2919): `Description <local.domain>`.
    pub fn list_id(&self) -> String {
        format!("{} <{}.{}>", clean(&self.description), self.local, self.domain)
    }
    pub fn unsubscribe_url(&self, token: &str) -> String {
        format!("{}/unsubscribe?list={}&t={}", self.web, self.name, token)
    }
    pub fn confirm_url(&self, token: &str) -> String {
        format!("{}/confirm?list={}&t={}", self.web, self.name, token)
    }
}

/// A header value without control characters (descriptions come from the policy, but the
/// mails also carry addresses from peers).
fn clean(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).collect()
}

/// Every declared list.
pub fn all(prog: &Program, lookups: &Lookups) -> Vec<List> {
    prog.mailing_lists.iter().map(|r| List::from_resource(prog, lookups, r)).collect()
}

/// The list named `name`.
pub fn by_name(prog: &Program, lookups: &Lookups, name: &str) -> Option<List> {
    prog.mailing_lists.iter().find(|r| r.name.eq_ignore_ascii_case(name)).map(|r| List::from_resource(prog, lookups, r))
}

/// What a service address of a list is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Service {
    /// `LIST-request@`: commands by mail.
    Request,
    /// `owner-LIST@`: the owner (or a DSN naming a subscriber).
    Owner,
    /// `owner-LIST+local=domain@`: a bounce of the copy sent to that subscriber.
    Bounce(String),
}

/// The list and service an address belongs to, if it is one of a list's service addresses.
pub fn service(prog: &Program, lookups: &Lookups, address: &str) -> Option<(List, Service)> {
    if prog.mailing_lists.is_empty() {
        return None;
    }
    let a = address.to_ascii_lowercase();
    let (local, domain) = mailpolicy_stdlib::address::split(&a);
    for l in all(prog, lookups) {
        if domain != l.domain {
            continue;
        }
        if local == format!("{}-request", l.local) {
            return Some((l, Service::Request));
        }
        let owner = format!("owner-{}", l.local);
        if local == owner {
            return Some((l, Service::Owner));
        }
        if let Some(v) = local.strip_prefix(&format!("{owner}+")) {
            // local=domain, the last `=` splitting (a local part may hold `=` itself).
            if let Some((sl, sd)) = v.rsplit_once('=') {
                if !sl.is_empty() && !sd.is_empty() {
                    return Some((l, Service::Bounce(format!("{sl}@{sd}"))));
                }
            }
            return Some((l, Service::Owner));
        }
    }
    None
}

/// The subscriber's own envelope sender and header edits for a list copy (R11): VERP,
/// `List-Id`, `List-Unsubscribe` (HTTPS one-click URL and mailto with the token),
/// `List-Unsubscribe-Post` (RFC 8058), `List-Subscribe`. Existing List-* fields of the post
/// are replaced, so a poster cannot put a link of their own there.
pub fn personal(list: &List, subscriber: &str) -> (String, Vec<Edit>) {
    let token = listtoken::unsubscribe(&list.name, subscriber, &list.keys).unwrap_or_default();
    let unsub = format!(
        "<{}>, <mailto:{}?subject=unsubscribe%20{}>",
        list.unsubscribe_url(&token),
        list.request_address(),
        token
    );
    let edits = vec![
        Edit::Replace("List-Id".into(), list.list_id()),
        Edit::Replace("List-Unsubscribe".into(), unsub),
        Edit::Replace("List-Unsubscribe-Post".into(), "List-Unsubscribe=One-Click".into()),
        Edit::Replace("List-Subscribe".into(), format!("<mailto:{}?subject=subscribe>", list.request_address())),
        Edit::Replace("Precedence".into(), "list".into()),
    ];
    (list.verp(subscriber), edits)
}

// ---------------------------------------------------------------- subscribers

/// One writer at a time for the files the daemon owns (subscriber files, bounce records).
static FILES: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn table_path(policy_dir: &Path, t: &Resource) -> Option<PathBuf> {
    t.source.as_ref().map(|s| policy_dir.join(s))
}

fn file_members(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// Write `text` to `path` by a new file renamed over it, both fsynced.
fn replace_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Every subscriber of `list`, lower case, without the list's own addresses (a loop).
pub async fn members(policy_dir: &Path, prog: &Program, lookups: &Lookups, list: &List) -> Result<Vec<String>, String> {
    let t = list.table.as_ref().ok_or("the list has no subscribers table")?;
    let timeout = lookups.lookup_timeout();
    let mut out = if let Some(s) = SqlTable::of(t, timeout, Options::sql) {
        lookups.sql_statement(prog, s, ListStatement::Members).await?
    } else if let Some(l) = LdapTable::of(t, timeout, Options::ldap) {
        lookups.ldap_members(prog, l).await?
    } else {
        let path = table_path(policy_dir, t).ok_or("the subscribers table has no file")?;
        match tokio::fs::read_to_string(&path).await {
            Ok(s) => file_members(&s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    };
    for m in out.iter_mut() {
        *m = m.trim().to_ascii_lowercase();
    }
    out.retain(|m| {
        m.contains('@')
            && crate::smtp::parse_forward_path(&format!("<{m}>"), true).is_ok()
            && service(prog, lookups, m).is_none()
            && *m != list.address
    });
    out.sort();
    out.dedup();
    Ok(out)
}

/// Add a confirmed subscriber; true when the address was not subscribed yet.
pub async fn add(
    policy_dir: &Path,
    prog: &Program,
    lookups: &Lookups,
    list: &List,
    address: &str,
) -> Result<bool, String> {
    change(policy_dir, prog, lookups, list, address, true).await
}

/// Remove a subscriber; true when the address was subscribed.
pub async fn remove(
    policy_dir: &Path,
    prog: &Program,
    lookups: &Lookups,
    list: &List,
    address: &str,
) -> Result<bool, String> {
    change(policy_dir, prog, lookups, list, address, false).await
}

/// Add (`subscribe`) or remove `address` in the list's subscribers table, whatever its
/// kind; true when that changed who is subscribed.
async fn change(
    policy_dir: &Path,
    prog: &Program,
    lookups: &Lookups,
    list: &List,
    address: &str,
    subscribe: bool,
) -> Result<bool, String> {
    let a = address.to_ascii_lowercase();
    let t = list.table.clone().ok_or("the list has no subscribers table")?;
    if let Some(s) = SqlTable::of(&t, lookups.lookup_timeout(), Options::sql) {
        let before = members(policy_dir, prog, lookups, list).await?;
        let statement = if subscribe { ListStatement::Insert(&a) } else { ListStatement::Delete(&a) };
        lookups.sql_statement(prog, s, statement).await?;
        return Ok(before.contains(&a) != subscribe);
    }
    if let Some(l) = LdapTable::of(&t, lookups.lookup_timeout(), Options::ldap) {
        return lookups.ldap_change(prog, l, subscribe, &a).await;
    }
    let path = table_path(policy_dir, &t).ok_or("the subscribers table has no file")?;
    tokio::task::spawn_blocking(move || {
        let _g = FILES.lock().unwrap_or_else(|p| p.into_inner());
        let text = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let edited = if subscribe { file_with(&text, &a) } else { file_without(&text, &a) };
        match edited {
            Some(out) => replace_file(&path, &out).map(|_| true).map_err(|e| format!("{}: {e}", path.display())),
            None => Ok(false),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// A subscribers file with `a` added at its end; None when it is there already.
fn file_with(text: &str, a: &str) -> Option<String> {
    if file_members(text).iter().any(|m| m == a) {
        return None;
    }
    let mut text = text.to_string();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(a);
    text.push('\n');
    Some(text)
}

/// A subscribers file without the lines whose key is `a`; None when there are none.
fn file_without(text: &str, a: &str) -> Option<String> {
    let mut found = false;
    let mut out = String::new();
    for line in text.lines() {
        let key = line.split_whitespace().next().unwrap_or("");
        if !line.trim_start().starts_with('#') && key.eq_ignore_ascii_case(a) {
            found = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    found.then_some(out)
}

// ---------------------------------------------------------------- the list manager

/// What the list manager needs: the daemon (program, lookups, the spool to send mail
/// through, the log), the policy's folder (subscriber files) and the spool's (bounces).
#[derive(Clone)]
pub struct Manager {
    pub shared: Arc<Shared>,
    pub policy_dir: PathBuf,
    pub spool_dir: PathBuf,
}

/// What became of a message to a service address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Consumed; the text is for the recipient's record and the log.
    Done(String),
    /// Deliver to this address instead (mail to owner-LIST).
    Forward(String),
    /// Could not be handled now (the subscribers table failed): try again later.
    Retry(String),
}

fn now_ms() -> u64 {
    crate::now_ms()
}

impl Manager {
    fn prog(&self) -> Arc<Program> {
        self.shared.program()
    }

    /// Queue a mail the list sends (a confirmation, a notice to the owner), from the null
    /// sender (an automatic reply, RFC 3834: nothing answers it) unless `from` is given.
    pub fn send(&self, list: &List, to: &str, subject: &str, body: &str) -> Result<String, String> {
        let now = now_ms();
        let prog = self.prog();
        let hostname = self.shared.hostname.clone();
        let data = format!(
            "From: {} <{}>\r\nTo: <{}>\r\nSubject: {}\r\nDate: {}\r\nMessage-ID: <list.{}.{now}.{}@{}>\r\nAuto-Submitted: auto-replied\r\nList-Id: {}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{}",
            clean(&list.description).replace(['<', '>', '"'], ""),
            list.request_address(),
            clean(to),
            clean(subject),
            crate::date::rfc2822(now),
            list.local,
            rand::random::<u32>(),
            hostname,
            list.list_id(),
            body.replace("\r\n", "\n").replace('\n', "\r\n"),
        );
        let msg = QueuedMessage {
            sender: String::new(),
            recipients: vec![QueuedRcpt {
                address: to.to_string(),
                notify: vec!["NEVER".into()],
                orcpt: String::new(),
                ..Default::default()
            }],
            data: data.into_bytes(),
            client_ip: "127.0.0.1".into(),
            helo: hostname.clone(),
            session: crate::conn::SessionRecord::internal(&prog, &hostname),
            ..Default::default()
        };
        let id = self.shared.store.store(&msg).map_err(|e| format!("{e:?}"))?;
        self.shared.log.event("list-mail", &[("list", &list.name), ("id", &id), ("to", to), ("subject", subject)]);
        self.shared.enqueued(&id);
        Ok(id)
    }

    /// Send the double opt-in confirmation to `address` (R11 item 3).
    pub fn ask_confirmation(&self, list: &List, address: &str) -> Result<String, String> {
        let expires = (now_ms() + list.confirm_ms) / 1000;
        let token = listtoken::confirm(&list.name, address, expires, &list.keys).ok_or("the list has no keys")?;
        let body = format!(
            "Someone, probably you, asked to subscribe <{address}> to {desc} <{list_addr}>.\n\n\
             To confirm, open this link and press the button:\n\n  {url}\n\n\
             or reply to this mail keeping the subject (confirm {token}).\n\n\
             If you did not ask for this, ignore this mail: you will not be subscribed.\n\
             The link stays valid until {until}.\n",
            desc = clean(&list.description),
            list_addr = list.address,
            url = list.confirm_url(&token),
            until = crate::date::rfc2822(expires * 1000),
        );
        self.send(list, address, &format!("confirm {token}"), &body)
    }

    /// A confirmed subscription (token checked by the caller).
    pub async fn subscribe(&self, list: &List, address: &str) -> Result<bool, String> {
        let lookups = self.shared.lookups();
        let added = add(&self.policy_dir, &self.prog(), &lookups, list, address).await?;
        self.shared.log.event(
            "list-subscribe",
            &[("list", &list.name), ("address", address), ("result", if added { "added" } else { "already" })],
        );
        Ok(added)
    }

    /// An unsubscription (token checked by the caller, or the bounce limit reached).
    pub async fn unsubscribe(&self, list: &List, address: &str, why: &str) -> Result<bool, String> {
        let lookups = self.shared.lookups();
        let removed = remove(&self.policy_dir, &self.prog(), &lookups, list, address).await?;
        self.shared.log.event(
            "list-unsubscribe",
            &[
                ("list", &list.name),
                ("address", address),
                ("by", why),
                ("result", if removed { "removed" } else { "not subscribed" }),
            ],
        );
        Ok(removed)
    }

    /// A message to one of `list`'s service addresses.
    pub async fn handle(&self, list: &List, svc: &Service, msg: &QueuedMessage) -> Handled {
        match svc {
            Service::Request => self.request(list, msg).await,
            Service::Bounce(sub) => self.bounce(list, Some(sub), msg).await,
            Service::Owner => {
                if msg.sender.is_empty() && !dsn_recipients(&msg.data).is_empty() {
                    self.bounce(list, None, msg).await
                } else if list.owner.is_empty() {
                    Handled::Done("no owner to forward to".into())
                } else {
                    Handled::Forward(list.owner.clone())
                }
            }
        }
    }

    /// `LIST-request@`: `subscribe`, `unsubscribe [TOKEN]`, `confirm TOKEN`, in the Subject
    /// or the first line of the body.
    async fn request(&self, list: &List, msg: &QueuedMessage) -> Handled {
        let sender = msg.sender.to_ascii_lowercase();
        if sender.is_empty() {
            return Handled::Done("a bounce to the request address: dropped".into());
        }
        let (cmd, token) = command(&msg.data);
        let now_s = now_ms() / 1000;
        let r = match cmd.as_deref() {
            Some("subscribe") => match self.ask_confirmation(list, &sender) {
                Ok(id) => Ok(format!("confirmation sent to {sender} ({id})")),
                Err(e) => Err(e),
            },
            Some("confirm") => match token
                .as_deref()
                .map(|t| listtoken::verify_confirm(&list.name, t, &list.keys, now_s))
            {
                Some(listtoken::Check::Valid(a)) => self.subscribe(list, &a).await.map(|_| format!("{a} subscribed")),
                other => Ok(format!("confirmation refused: {other:?}")),
            },
            Some("unsubscribe") => {
                match token.as_deref().map(|t| listtoken::verify_unsubscribe(&list.name, t, &list.keys)) {
                    Some(listtoken::Check::Valid(a)) => {
                        self.unsubscribe(list, &a, "mail").await.map(|_| format!("{a} unsubscribed"))
                    }
                    _ => {
                        // No valid token: the envelope sender is forgeable, so the sender gets
                        // its own unsubscribe link instead of being removed.
                        let lookups = self.shared.lookups();
                        match members(&self.policy_dir, &self.prog(), &lookups, list).await {
                            Ok(m) if m.contains(&sender) => {
                                let token = listtoken::unsubscribe(&list.name, &sender, &list.keys).unwrap_or_default();
                                let body = format!(
                                    "Someone, probably you, asked to unsubscribe <{sender}> from {} <{}>.\n\n\
                                 To leave the list, open this link and press the button:\n\n  {}\n\n\
                                 or reply to this mail keeping the subject.\n",
                                    clean(&list.description),
                                    list.address,
                                    list.unsubscribe_url(&token)
                                );
                                self.send(list, &sender, &format!("unsubscribe {token}"), &body)
                                    .map(|id| format!("unsubscribe link sent to {sender} ({id})"))
                            }
                            Ok(_) => Ok(format!("{sender} is not subscribed")),
                            Err(e) => Err(e),
                        }
                    }
                }
            }
            _ => Ok("no command (subscribe, unsubscribe, confirm)".into()),
        };
        match r {
            Ok(text) => {
                self.shared.log.event("list-request", &[("list", &list.name), ("from", &sender), ("result", &text)]);
                Handled::Done(text)
            }
            Err(e) => {
                self.shared.log.event("list-request-failed", &[("list", &list.name), ("from", &sender), ("error", &e)]);
                Handled::Retry(format!("451 4.3.0 list {}: {e}", list.name))
            }
        }
    }

    /// A bounce of list mail: hard ones are counted per subscriber; at the limit the
    /// subscriber is removed and the owner told (R11 item 4).
    async fn bounce(&self, list: &List, verp: Option<&String>, msg: &QueuedMessage) -> Handled {
        let dsn = dsn_recipients(&msg.data);
        let mut hard: Vec<String> = Vec::new();
        match verp {
            Some(sub) => {
                let is_hard = if dsn.is_empty() {
                    // Not an RFC 3464 report: a null-sender message is a bounce in another
                    // format; anything else (a vacation reply) is not.
                    msg.sender.is_empty()
                } else {
                    dsn.iter().any(|r| r.hard)
                };
                if is_hard {
                    hard.push(sub.to_ascii_lowercase());
                }
            }
            None => hard.extend(dsn.iter().filter(|r| r.hard).map(|r| r.recipient.clone())),
        }
        if hard.is_empty() {
            return Handled::Done("not a hard bounce".into());
        }
        let lookups = self.shared.lookups();
        let subscribed = match members(&self.policy_dir, &self.prog(), &lookups, list).await {
            Ok(m) => m,
            Err(e) => return Handled::Retry(format!("451 4.3.0 list {}: {e}", list.name)),
        };
        let mut notes = Vec::new();
        for sub in hard {
            if !subscribed.contains(&sub) {
                notes.push(format!("{sub}: not subscribed"));
                continue;
            }
            let n = match self.count_bounce(list, &sub) {
                Ok(n) => n,
                Err(e) => return Handled::Retry(format!("451 4.3.0 bounce record: {e}")),
            };
            self.shared.log.event("list-bounce", &[("list", &list.name), ("address", &sub), ("count", &n.to_string())]);
            if n >= list.bounce_limit {
                match self.unsubscribe(list, &sub, "bounces").await {
                    Ok(_) => {
                        let _ = self.clear_bounces(list, &sub);
                        if !list.owner.is_empty() {
                            let body = format!(
                                "<{sub}> was removed from {} <{}> after {n} hard bounces within {} days.\n",
                                clean(&list.description),
                                list.address,
                                list.bounce_window_ms / 86_400_000
                            );
                            if let Err(e) = self.send(
                                list,
                                &list.owner,
                                &format!("{sub} removed from {} (bounces)", list.name),
                                &body,
                            ) {
                                self.shared.log.event("list-mail-failed", &[("list", &list.name), ("error", &e)]);
                            }
                        }
                        notes.push(format!("{sub}: removed after {n} bounces"));
                    }
                    Err(e) => return Handled::Retry(format!("451 4.3.0 list {}: {e}", list.name)),
                }
            } else {
                notes.push(format!("{sub}: bounce {n} of {}", list.bounce_limit));
            }
        }
        Handled::Done(notes.join("; "))
    }

    fn bounces_path(&self, list: &List) -> PathBuf {
        self.spool_dir.join("lists").join(format!("{}.bounces", list.name))
    }

    /// Record one hard bounce of `sub` now; the number within the window, this one included.
    fn count_bounce(&self, list: &List, sub: &str) -> Result<usize, String> {
        let path = self.bounces_path(list);
        let _g = FILES.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = read_bounces(&path);
        let now = now_ms();
        let v = all.entry(sub.to_string()).or_default();
        v.retain(|t| now.saturating_sub(*t) < list.bounce_window_ms);
        v.push(now);
        let n = v.len();
        // Subscribers whose bounces all fell out of the window are forgotten.
        all.retain(|_, v| v.iter().any(|t| now.saturating_sub(*t) < list.bounce_window_ms));
        let text = serde_json::to_string(&all).map_err(|e| e.to_string())?;
        replace_file(&path, &text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(n)
    }

    fn clear_bounces(&self, list: &List, sub: &str) -> Result<(), String> {
        let path = self.bounces_path(list);
        let _g = FILES.lock().unwrap_or_else(|p| p.into_inner());
        let mut all = read_bounces(&path);
        all.remove(sub);
        let text = serde_json::to_string(&all).map_err(|e| e.to_string())?;
        replace_file(&path, &text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

fn read_bounces(path: &Path) -> HashMap<String, Vec<u64>> {
    std::fs::read(path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

/// The command of a mail to LIST-request: the first of `subscribe`, `unsubscribe` or
/// `confirm` in the Subject (after `Re:` and the like), else in the first non-empty line of
/// the body; the token is the word after it.
pub fn command(data: &[u8]) -> (Option<String>, Option<String>) {
    let parsed = std::panic::catch_unwind(|| {
        let m = mail_parser::MessageParser::default().parse(data)?;
        let subject = m.subject().unwrap_or("").to_string();
        let body = m.body_text(0).map(|b| b.to_string()).unwrap_or_default();
        Some((subject, body))
    });
    let Ok(Some((subject, body))) = parsed else { return (None, None) };
    let first_body = body.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("").to_string();
    for text in [subject, first_body] {
        let words: Vec<String> = text
            .split(|c: char| c.is_whitespace() || c == ':' || c == ',')
            .filter(|w| !w.is_empty())
            .map(str::to_string)
            .collect();
        for (i, w) in words.iter().enumerate() {
            let lw = w.to_ascii_lowercase();
            if ["subscribe", "unsubscribe", "confirm"].contains(&lw.as_str()) {
                let token = words.get(i + 1).filter(|t| t.len() <= listtoken::MAX_TOKEN).cloned();
                return (Some(lw), token);
            }
        }
    }
    (None, None)
}

/// One recipient of an RFC 3464 delivery status notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DsnRecipient {
    /// `Final-Recipient` (or `Original-Recipient`), lower case, without the `rfc822;` type.
    pub recipient: String,
    /// `Action: failed` with a 5.x.x `Status`.
    pub hard: bool,
}

/// The recipients a DSN reports on: the `message/delivery-status` part's per-recipient
/// fields. Empty when the message is no DSN.
pub fn dsn_recipients(data: &[u8]) -> Vec<DsnRecipient> {
    let parsed = std::panic::catch_unwind(|| {
        let m = mail_parser::MessageParser::default().parse(data)?;
        for part in m.parts.iter() {
            let ct = part.content_type();
            let is_status = ct.is_some_and(|c| {
                c.c_type.eq_ignore_ascii_case("message")
                    && c.c_subtype.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("delivery-status"))
            });
            if is_status {
                let raw = data.get(part.offset_body as usize..part.offset_end as usize).unwrap_or(&[]);
                return Some(String::from_utf8_lossy(raw).to_string());
            }
        }
        None
    });
    let Ok(Some(text)) = parsed else { return Vec::new() };
    // Field groups separated by empty lines: the first is per message, the rest per recipient.
    let mut out = Vec::new();
    let text = text.replace("\r\n", "\n");
    for group in text.split("\n\n").skip(1) {
        let mut fields: HashMap<String, String> = HashMap::new();
        let mut last: Option<String> = None;
        for line in group.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some(k) = &last {
                    if let Some(v) = fields.get_mut(k) {
                        v.push(' ');
                        v.push_str(line.trim());
                    }
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                let k = k.trim().to_ascii_lowercase();
                fields.insert(k.clone(), v.trim().to_string());
                last = Some(k);
            }
        }
        let rcpt = fields.get("final-recipient").or_else(|| fields.get("original-recipient"));
        let Some(rcpt) = rcpt else { continue };
        let addr = rcpt.split_once(';').map(|(_, a)| a).unwrap_or(rcpt).trim().trim_matches(['<', '>']);
        let action = fields.get("action").map(|a| a.to_ascii_lowercase()).unwrap_or_default();
        let status = fields.get("status").cloned().unwrap_or_default();
        out.push(DsnRecipient {
            recipient: addr.to_ascii_lowercase(),
            hard: action.starts_with("failed") && status.trim_start().starts_with('5'),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_come_from_the_subject_or_the_first_body_line() {
        let m = b"Subject: Re: confirm 2.123.YWJj.xyz\r\n\r\nthanks\r\n";
        assert_eq!(command(m), (Some("confirm".into()), Some("2.123.YWJj.xyz".into())));
        let m = b"Subject: hello\r\n\r\n\r\n  subscribe\r\nmore\r\n";
        assert_eq!(command(m), (Some("subscribe".into()), None));
        let m = b"Subject: UNSUBSCRIBE 2.abc.def\r\n\r\n";
        assert_eq!(command(m), (Some("unsubscribe".into()), Some("2.abc.def".into())));
        assert_eq!(command(b"Subject: hi\r\n\r\nhow are you\r\n"), (None, None));
        assert_eq!(command(b"\xff\xfe"), (None, None));
    }

    #[test]
    fn dsn_recipients_and_hard_failures() {
        let dsn = "From: MAILER-DAEMON@mx.test\r\nSubject: failure\r\nMIME-Version: 1.0\r\n\
            Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n\
            --B\r\nContent-Type: text/plain\r\n\r\nsorry\r\n\
            --B\r\nContent-Type: message/delivery-status\r\n\r\n\
            Reporting-MTA: dns; mx.test\r\n\r\n\
            Final-Recipient: rfc822; Bob@Example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
            Final-Recipient: rfc822; carol@example.org\r\nAction: delayed\r\nStatus: 4.4.1\r\n\r\n\
            --B--\r\n";
        let r = dsn_recipients(dsn.as_bytes());
        assert_eq!(
            r,
            vec![
                DsnRecipient { recipient: "bob@example.org".into(), hard: true },
                DsnRecipient { recipient: "carol@example.org".into(), hard: false },
            ]
        );
        assert!(dsn_recipients(b"Subject: x\r\n\r\nnot a report\r\n").is_empty());
    }

    #[test]
    fn verp_addresses_name_the_subscriber() {
        let l = List {
            name: "news".into(),
            address: "news@example.com".into(),
            local: "news".into(),
            domain: "example.com".into(),
            owner: "boss@example.com".into(),
            web: "https://lists.example.com".into(),
            description: "News".into(),
            keys: listtoken::parse_keys("1 k"),
            confirm_ms: 1,
            bounce_limit: 3,
            bounce_window_ms: 1,
            table: None,
        };
        assert_eq!(l.verp("a.b+c@example.org"), "owner-news+a.b+c=example.org@example.com");
        let (s, edits) = personal(&l, "a@example.org");
        assert_eq!(s, "owner-news+a=example.org@example.com");
        let unsub = edits.iter().find_map(|e| match e {
            Edit::Replace(n, v) if n == "List-Unsubscribe" => Some(v.clone()),
            _ => None,
        });
        let unsub = unsub.expect("List-Unsubscribe");
        assert!(unsub.starts_with("<https://lists.example.com/unsubscribe?list=news&t=1."), "{unsub}");
        assert!(unsub.contains("<mailto:news-request@example.com?subject=unsubscribe%201."), "{unsub}");
    }
}
