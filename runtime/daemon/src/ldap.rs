//! LDAP tables (R3d, R28, R45): a search per lookup against the directory, e.g. the seed's
//! `mailLocalAddress` / `mailHost` schema:
//!
//! ```text
//! table directory = ldap {
//!   url "ldap://127.0.0.1:389"; base "dc=example,dc=com";
//!   filter "(mailLocalAddress=%s)"; attribute "mailHost";
//! };
//! ```
//!
//! `%s` is the key, `%u` its local part, `%d` its domain, each escaped (RFC 4515). With an
//! `attribute` the value is that attribute of the first entry (several values joined with
//! `,`); without, a hit is the empty value (presence). No entry is "absent". A failed bind
//! or search, or the time-out, is an error answer: 4xx unless the table says `on_error
//! continue`.
//!
//! Connections are kept, a pool per table of at most `connections` (default 4): a lookup
//! takes an idle connection, already bound as `bind_dn`, or opens and binds a new one; a
//! connection that failed or timed out is dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ldap3::{ldap_escape, Ldap, LdapConnAsync, Mod, Scope, SearchEntry};
use mailpolicy_lang::ir::Program;
use mailpolicy_lang::resources::{LdapOptions, LdapScope};
use tokio::sync::Semaphore;

use crate::eval::Answer;

/// An `ldap` table as the pool uses it (`LdapTable::of(t, default, Options::ldap)`).
pub type LdapTable<'a> = crate::lookup::NetTable<'a, LdapOptions>;

/// Fill `%s`, `%u`, `%d` in a filter, escaping the values.
pub fn expand_filter(filter: &str, key: &str) -> String {
    let (local, domain) = match key.rsplit_once('@') {
        Some((l, d)) => (l, d),
        None => (key, ""),
    };
    let mut out = String::with_capacity(filter.len() + key.len());
    let mut chars = filter.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('s') => out.push_str(&ldap_escape(key)),
            Some('u') => out.push_str(&ldap_escape(local)),
            Some('d') => out.push_str(&ldap_escape(domain)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// One bound connection, with what it was opened and bound with (url, bind DN, password).
struct Conn {
    ldap: Ldap,
    ident: String,
}

struct TablePool {
    idle: Mutex<Vec<Conn>>,
    gate: Semaphore,
    size: usize,
}

/// Bound connections, a pool per table.
#[derive(Default)]
pub struct Pool {
    tables: Mutex<HashMap<String, Arc<TablePool>>>,
    /// Connections opened and bound so far (every table; for the log and the tests).
    opened: std::sync::atomic::AtomicU64,
}

impl Pool {
    fn table(&self, t: LdapTable) -> Arc<TablePool> {
        let size = super::sql::connections(t.opts.connections);
        let mut m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(t.name) {
            Some(p) if p.size == size => p.clone(),
            _ => {
                let p = Arc::new(TablePool { idle: Mutex::new(Vec::new()), gate: Semaphore::new(size), size });
                m.insert(t.name.to_string(), p.clone());
                p
            }
        }
    }

    /// Connections opened (and bound) so far.
    pub fn opened(&self) -> u64 {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub async fn lookup(
        &self,
        prog: &Program,
        t: LdapTable<'_>,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Answer {
        let pool = self.table(t);
        match tokio::time::timeout(t.timeout, self.search(&pool, prog, t.opts, key, secrets)).await {
            Ok(Ok(v)) => Answer::Value(v),
            Ok(Err(e)) => Answer::Error(format!("ldap table {}: {e}", t.name)),
            Err(_) => Answer::Timeout,
        }
    }

    async fn search(
        &self,
        pool: &TablePool,
        prog: &Program,
        t: &LdapOptions,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
        let mut conn = self.connect(pool, prog, t, secrets).await?;
        // On an error the connection is dropped (the `?`): the next lookup opens a new one.
        let v = search_on(&mut conn.ldap, t, key).await?;
        pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok(v)
    }

    /// An idle connection of the table's current configuration, or a new one opened and
    /// bound; the caller holds one of the pool's permits and puts the connection back.
    async fn connect(
        &self,
        pool: &TablePool,
        prog: &Program,
        t: &LdapOptions,
        secrets: &HashMap<String, String>,
    ) -> Result<Conn, String> {
        let url = t.url.as_str();
        let bind = t.bind_dn.as_deref().map(|dn| (dn, super::sql::secret(prog, t.password, secrets)));
        let ident = match &bind {
            Some((dn, pw)) => format!("{url}\0{dn}\0{}", pw.as_deref().unwrap_or("")),
            None => format!("{url}\0"),
        };
        let reused = {
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain_mut(|c| c.ident == ident && !c.ldap.is_closed());
            idle.pop()
        };
        Ok(match reused {
            Some(c) => c,
            None => {
                let (conn, mut ldap) = LdapConnAsync::new(url).await.map_err(|e| e.to_string())?;
                ldap3::drive!(conn);
                if let Some((dn, pw)) = &bind {
                    let pw = pw.as_deref().unwrap_or_default();
                    ldap.simple_bind(dn, pw).await.and_then(|r| r.success()).map_err(|e| format!("bind: {e}"))?;
                }
                self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Conn { ldap, ident }
            }
        })
    }

    /// A mailing list's subscribers in the directory (spec/language.md 4.9): every value of
    /// the table's `attribute` on the group entry that is its `base`, read with a base-scope
    /// search. A group entry that does not exist, or a failed bind or search, is an error.
    pub async fn members(
        &self,
        prog: &Program,
        t: LdapTable<'_>,
        secrets: &HashMap<String, String>,
    ) -> Result<Vec<String>, String> {
        let pool = self.table(t);
        let work = async {
            let (base, attribute) = group(t.opts)?;
            let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
            let mut conn = self.connect(&pool, prog, t.opts, secrets).await?;
            let (entries, _) = conn
                .ldap
                .search(base, Scope::Base, "(objectClass=*)", vec![attribute])
                .await
                .and_then(|r| r.success())
                .map_err(|e| format!("members of {base}: {e}"))?;
            pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            let values: Vec<String> = entries
                .into_iter()
                .map(SearchEntry::construct)
                .flat_map(|e| {
                    e.attrs.into_iter().filter(|(k, _)| k.eq_ignore_ascii_case(attribute)).flat_map(|(_, v)| v)
                })
                .collect();
            Ok(values)
        };
        within(t, work).await
    }

    /// Add (`add`) or remove a mailing list's subscriber: one value of the table's
    /// `attribute` on its `base` entry, by an LDAP modify as `bind_dn`. True when the
    /// directory changed; false when the address was already there (add) or not there
    /// (remove), which the directory says with attributeOrValueExists (20) and
    /// noSuchAttribute (16) under the attribute's own equality rule (case-insensitive for
    /// `rfc822MailMember` and `mail`). Any other refusal (no write access: 50) is an error.
    pub async fn change(
        &self,
        prog: &Program,
        t: LdapTable<'_>,
        add: bool,
        address: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<bool, String> {
        let pool = self.table(t);
        let work = async {
            let (base, attribute) = group(t.opts)?;
            let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
            let mut conn = self.connect(&pool, prog, t.opts, secrets).await?;
            let values = std::collections::HashSet::from([address]);
            let m = if add { Mod::Add(attribute, values) } else { Mod::Delete(attribute, values) };
            // A transport failure drops the connection (the `?`); a result code keeps it.
            let r = conn.ldap.modify(base, vec![m]).await.map_err(|e| format!("modify {base}: {e}"))?;
            pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            match (r.rc, add) {
                (0, _) => Ok(true),
                (20, true) | (16, false) => Ok(false),
                _ => Err(format!("modify {base}: {}", ldap3::LdapError::from(r))),
            }
        };
        within(t, work).await
    }
}

/// A mailing list's group entry (the table's `base`) and its member attribute.
fn group(t: &LdapOptions) -> Result<(&str, &str), String> {
    let attribute =
        t.attribute.as_deref().ok_or("no attribute: the group entry's attribute that lists the subscribers")?;
    Ok((t.base.as_str(), attribute))
}

/// `work` within the table's time-out; its error named after the table.
async fn within<T>(t: LdapTable<'_>, work: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    match tokio::time::timeout(t.timeout, work).await {
        Ok(r) => r.map_err(|e| format!("ldap table {}: {e}", t.name)),
        Err(_) => Err(format!("ldap table {}: timed out", t.name)),
    }
}

/// One search on a bound connection.
async fn search_on(ldap: &mut Ldap, t: &LdapOptions, key: &str) -> Result<Option<String>, String> {
    let base = t.base.as_str();
    let filter = expand_filter(&t.filter, key);
    let scope = match t.scope {
        LdapScope::One => Scope::OneLevel,
        LdapScope::Base => Scope::Base,
        LdapScope::Sub => Scope::Subtree,
    };
    let attribute = t.attribute.as_deref();
    let attrs: Vec<&str> = match attribute {
        Some(a) => vec![a],
        None => vec!["1.1"],
    };
    let (entries, _) =
        ldap.search(base, scope, &filter, attrs).await.and_then(|r| r.success()).map_err(|e| format!("search: {e}"))?;
    let Some(first) = entries.into_iter().next() else { return Ok(None) };
    let entry = SearchEntry::construct(first);
    Ok(Some(match attribute {
        Some(a) => {
            entry.attrs.iter().find(|(k, _)| k.eq_ignore_ascii_case(a)).map(|(_, v)| v.join(",")).unwrap_or_default()
        }
        None => String::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_are_escaped() {
        assert_eq!(expand_filter("(mailLocalAddress=%s)", "a@b.example"), "(mailLocalAddress=a@b.example)");
        assert_eq!(expand_filter("(&(uid=%u)(dc=%d))", "joe@example.com"), "(&(uid=joe)(dc=example.com))");
        assert_eq!(expand_filter("(mail=%s)", "x*)(uid=*"), "(mail=x\\2a\\29\\28uid=\\2a)");
        assert_eq!(expand_filter("100%%", "k"), "100%");
    }
}
