//! SQL tables (R45): a PostgreSQL query per lookup.
//!
//! ```text
//! table mailboxes = sql {
//!   url "postgresql://mail@127.0.0.1:5432/mail";
//!   query "SELECT host FROM mailboxes WHERE address = $1";
//!   password db_password;
//! };
//! ```
//!
//! The key is the query's one parameter (`$1`, as text); the first column of the first
//! row is the value (text, or a number or boolean shown as text); no row is "absent".
//!
//! Each table has a pool of connections (`connections`, default 4): a lookup takes an idle
//! connection or opens one, so up to that many queries run at once and none waits for
//! another's round trip; the query is prepared once per connection. A connection that
//! failed, timed out or was closed by the server is dropped, and the next lookup opens a
//! new one. A failure or the time-out is an error answer: 4xx unless the table says
//! `on_error continue`.
//!
//! TLS is the `url`'s `sslmode`, as libpq reads it ([`tls`]): `disable`; `prefer` (the
//! default) and `allow`, TLS when the server offers it, unverified; `require`, TLS or no
//! connection, unverified unless `sslrootcert` names a CA file; `verify-ca`, the server's
//! certificate chained to `sslrootcert` (else the system's trust store); `verify-full`,
//! that and the host name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mailpolicy_lang::ir::{Program, SecretId};
use mailpolicy_lang::resources::SqlOptions;
use tokio::sync::Semaphore;
use tokio_postgres::{Client, Statement};

mod tls;
pub use tls::connect;

use crate::eval::Answer;

/// An `sql` table as the pool uses it (`SqlTable::of(t, default, Options::sql)`).
pub type SqlTable<'a> = crate::lookup::NetTable<'a, SqlOptions>;

/// A mailing list's statement on its subscribers table (spec/language.md 4.9).
#[derive(Clone, Copy)]
pub enum ListStatement<'a> {
    /// `members`: every subscriber.
    Members,
    /// `insert` of the address.
    Insert(&'a str),
    /// `delete` of the address.
    Delete(&'a str),
}

impl<'a> ListStatement<'a> {
    /// The statement's option name (for errors), its text, its parameter.
    fn of(self, o: &'a SqlOptions) -> (&'static str, Option<&'a str>, Option<&'a str>) {
        match self {
            ListStatement::Members => ("members", o.members.as_deref(), None),
            ListStatement::Insert(a) => ("insert", o.insert.as_deref(), Some(a)),
            ListStatement::Delete(a) => ("delete", o.delete.as_deref(), Some(a)),
        }
    }
}

/// One open connection, with the query prepared on it.
struct Conn {
    client: Client,
    /// What the connection was opened with (url and password): a reload that changes them
    /// retires it.
    ident: String,
    prepared: Option<(String, Statement)>,
}

/// The connections of one table.
struct TablePool {
    idle: Mutex<Vec<Conn>>,
    /// One permit per connection the table may have open.
    gate: Arc<Semaphore>,
    size: usize,
    /// Where a relative `sslrootcert` is found (the policy's directory).
    dir: Option<PathBuf>,
}

/// Open connections, a pool per table.
#[derive(Default)]
pub struct Pool {
    tables: Mutex<HashMap<String, Arc<TablePool>>>,
    /// The policy's directory: a relative `sslrootcert` is read from there.
    dir: Option<PathBuf>,
}

/// `connections N` of a table (LDAP and SQL), at least 1.
pub fn connections(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX).max(1)
}

/// The value of the secret a table's `password` names.
pub fn secret(prog: &Program, id: Option<SecretId>, secrets: &HashMap<String, String>) -> Option<String> {
    id.and_then(|id| prog.secrets.get(id.index())).and_then(|s| secrets.get(&s.name)).cloned()
}

impl Pool {
    /// A pool whose tables read a relative `sslrootcert` from `policy_dir`.
    pub fn new(policy_dir: &Path) -> Pool {
        Pool { tables: Mutex::default(), dir: Some(policy_dir.to_path_buf()) }
    }

    fn table(&self, t: SqlTable) -> Arc<TablePool> {
        let size = connections(t.opts.connections);
        let mut m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(t.name) {
            Some(p) if p.size == size => p.clone(),
            _ => {
                let p = Arc::new(TablePool {
                    idle: Mutex::new(Vec::new()),
                    gate: Arc::new(Semaphore::new(size)),
                    size,
                    dir: self.dir.clone(),
                });
                m.insert(t.name.to_string(), p.clone());
                p
            }
        }
    }

    /// Idle connections kept for the table `name` (the pool's tests read it).
    pub fn idle(&self, name: &str) -> usize {
        let m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(|p| p.idle.lock().map(|v| v.len()).unwrap_or(0)).unwrap_or(0)
    }

    pub async fn lookup(
        &self,
        prog: &Program,
        t: SqlTable<'_>,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Answer {
        let pool = self.table(t);
        // The time-out covers waiting for a connection too; a connection in use when it
        // strikes is dropped with the future, never handed to the next lookup.
        match tokio::time::timeout(t.timeout, Self::query(&pool, prog, t.opts, key, secrets)).await {
            Ok(Ok(v)) => Answer::Value(v),
            Ok(Err(e)) => Answer::Error(format!("sql table {}: {e}", t.name)),
            Err(_) => Answer::Timeout,
        }
    }

    /// A mailing list's statement on its subscribers table (`members`, `insert`, `delete`,
    /// spec/language.md 4.9): with no parameter or one (`$1`, the address); the first column
    /// of every row it returns. On the table's pool, within its time-out.
    pub async fn statement(
        &self,
        prog: &Program,
        t: SqlTable<'_>,
        statement: ListStatement<'_>,
        secrets: &HashMap<String, String>,
    ) -> Result<Vec<String>, String> {
        let pool = self.table(t);
        match tokio::time::timeout(t.timeout, Self::run(&pool, prog, t.opts, statement, secrets)).await {
            Ok(r) => r.map_err(|e| format!("sql table {}: {e}", t.name)),
            Err(_) => Err(format!("sql table {}: timed out", t.name)),
        }
    }

    async fn run(
        pool: &TablePool,
        prog: &Program,
        o: &SqlOptions,
        statement: ListStatement<'_>,
        secrets: &HashMap<String, String>,
    ) -> Result<Vec<String>, String> {
        let (option, sql, param) = statement.of(o);
        let sql = sql.ok_or_else(|| format!("no `{option}` statement"))?;
        let password = secret(prog, o.password, secrets);
        let ident = format!("{}\0{}", o.url, password.as_deref().unwrap_or(""));
        let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
        let reused = {
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| c.ident == ident && !c.client.is_closed());
            idle.pop()
        };
        let conn = match reused {
            Some(c) => c,
            None => {
                Conn { client: connect(&o.dsn, password.as_deref(), pool.dir.as_deref()).await?, ident, prepared: None }
            }
        };
        let rows = match param {
            Some(p) => conn.client.query(sql, &[&p]).await,
            None => conn.client.query(sql, &[]).await,
        }
        .map_err(|e| format!("{option}: {}", tls::chain(&e)))?;
        pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        // A column that is not text (a `citext` or `int` the driver cannot read as a string)
        // is an error, never a silently shorter list of subscribers.
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter().filter(|r| !r.is_empty()) {
            match r.try_get::<_, Option<String>>(0) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => {}
                Err(e) => return Err(format!("{option}: the first column is not text ({e}); cast it with ::text")),
            }
        }
        Ok(out)
    }

    async fn query(
        pool: &TablePool,
        prog: &Program,
        o: &SqlOptions,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let query = o.query.as_str();
        let password = secret(prog, o.password, secrets);
        let ident = format!("{}\0{}", o.url, password.as_deref().unwrap_or(""));
        let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
        let reused = {
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            // Connections of an older configuration, or closed by the server, are dropped.
            idle.retain(|c| c.ident == ident && !c.client.is_closed());
            idle.pop()
        };
        let mut conn = match reused {
            Some(c) => c,
            None => {
                Conn { client: connect(&o.dsn, password.as_deref(), pool.dir.as_deref()).await?, ident, prepared: None }
            }
        };
        let stmt = match &conn.prepared {
            Some((q, s)) if q == query => s.clone(),
            _ => {
                let s = conn.client.prepare(query).await.map_err(|e| format!("query: {}", tls::chain(&e)))?;
                conn.prepared = Some((query.to_string(), s.clone()));
                s
            }
        };
        // On an error the connection is dropped here (the `?`), and the next lookup opens one.
        let rows = conn.client.query(&stmt, &[&key]).await.map_err(|e| format!("query: {}", tls::chain(&e)))?;
        pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        let Some(row) = rows.first() else { return Ok(None) };
        if row.is_empty() {
            return Ok(Some(String::new()));
        }
        let text = row
            .try_get::<_, Option<String>>(0)
            .map(|v| v.unwrap_or_default())
            .or_else(|_| row.try_get::<_, i64>(0).map(|v| v.to_string()))
            .or_else(|_| row.try_get::<_, i32>(0).map(|v| v.to_string()))
            .or_else(|_| row.try_get::<_, bool>(0).map(|v| v.to_string()))
            .map_err(|e| format!("the first column is not text, a number or a boolean: {e}"))?;
        Ok(Some(text))
    }
}
