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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailpolicy_lang::ir::{OptValue, Program, Resource};
use tokio::sync::Semaphore;
use tokio_postgres::{Client, NoTls, Statement};

use crate::eval::Answer;

/// Connections per table unless the table says `connections N`.
pub const DEFAULT_CONNECTIONS: usize = 4;

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
}

/// Open connections, a pool per table.
#[derive(Default)]
pub struct Pool {
    tables: Mutex<HashMap<String, Arc<TablePool>>>,
}

fn opt<'a>(t: &'a Resource, name: &str) -> Option<&'a str> {
    match t.option(name) {
        Some(OptValue::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

/// `connections N` of a table (LDAP and SQL), at least 1.
pub fn connections(t: &Resource) -> usize {
    match t.option("connections") {
        Some(OptValue::Num(n)) => (*n as usize).max(1),
        _ => DEFAULT_CONNECTIONS,
    }
}

impl Pool {
    fn table(&self, t: &Resource) -> Arc<TablePool> {
        let size = connections(t);
        let mut m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        match m.get(&t.name) {
            Some(p) if p.size == size => p.clone(),
            _ => {
                let p =
                    Arc::new(TablePool { idle: Mutex::new(Vec::new()), gate: Arc::new(Semaphore::new(size)), size });
                m.insert(t.name.clone(), p.clone());
                p
            }
        }
    }

    /// Idle connections of a table (for tests).
    #[cfg(test)]
    fn idle(&self, name: &str) -> usize {
        let m = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        m.get(name).map(|p| p.idle.lock().map(|v| v.len()).unwrap_or(0)).unwrap_or(0)
    }

    pub async fn lookup(
        &self,
        prog: &Program,
        t: &Resource,
        key: &str,
        secrets: &HashMap<String, String>,
        default_timeout: Duration,
    ) -> Answer {
        let timeout = super::lookup::table_timeout(t, default_timeout);
        let pool = self.table(t);
        // The time-out covers waiting for a connection too; a connection in use when it
        // strikes is dropped with the future, never handed to the next lookup.
        match tokio::time::timeout(timeout, Self::query(&pool, prog, t, key, secrets)).await {
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
        t: &Resource,
        option: &str,
        param: Option<&str>,
        secrets: &HashMap<String, String>,
        default_timeout: Duration,
    ) -> Result<Vec<String>, String> {
        let timeout = super::lookup::table_timeout(t, default_timeout);
        let pool = self.table(t);
        match tokio::time::timeout(timeout, Self::run(&pool, prog, t, option, param, secrets)).await {
            Ok(r) => r.map_err(|e| format!("sql table {}: {e}", t.name)),
            Err(_) => Err(format!("sql table {}: timed out", t.name)),
        }
    }

    async fn run(
        pool: &TablePool,
        prog: &Program,
        t: &Resource,
        option: &str,
        param: Option<&str>,
        secrets: &HashMap<String, String>,
    ) -> Result<Vec<String>, String> {
        let sql = opt(t, option).ok_or_else(|| format!("no `{option}` statement"))?;
        let url = opt(t, "url").ok_or("no url")?;
        let password = super::lookup::table_secret(prog, t, "password", secrets);
        let ident = format!("{url}\0{}", password.as_deref().unwrap_or(""));
        let _permit = pool.gate.acquire().await.map_err(|e| e.to_string())?;
        let reused = {
            let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.retain(|c| c.ident == ident && !c.client.is_closed());
            idle.pop()
        };
        let conn = match reused {
            Some(c) => c,
            None => {
                let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("url: {e}"))?;
                if let Some(pw) = &password {
                    config.password(pw);
                }
                let (client, connection) = config.connect(NoTls).await.map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Conn { client, ident, prepared: None }
            }
        };
        let rows = match param {
            Some(p) => conn.client.query(sql, &[&p]).await,
            None => conn.client.query(sql, &[]).await,
        }
        .map_err(|e| format!("{option}: {e}"))?;
        pool.idle.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
        Ok(rows.iter().filter_map(|r| r.try_get::<_, Option<String>>(0).ok().flatten()).collect())
    }

    async fn query(
        pool: &TablePool,
        prog: &Program,
        t: &Resource,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let query = opt(t, "query").ok_or("no query")?;
        let url = opt(t, "url").ok_or("no url")?;
        let password = super::lookup::table_secret(prog, t, "password", secrets);
        let ident = format!("{url}\0{}", password.as_deref().unwrap_or(""));
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
                let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("url: {e}"))?;
                if let Some(pw) = &password {
                    config.password(pw);
                }
                let (client, connection) = config.connect(NoTls).await.map_err(|e| format!("connect: {e}"))?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                Conn { client, ident, prepared: None }
            }
        };
        let stmt = match &conn.prepared {
            Some((q, s)) if q == query => s.clone(),
            _ => {
                let s = conn.client.prepare(query).await.map_err(|e| format!("query: {e}"))?;
                conn.prepared = Some((query.to_string(), s.clone()));
                s
            }
        };
        // On an error the connection is dropped here (the `?`), and the next lookup opens one.
        let rows = conn.client.query(&stmt, &[&key]).await.map_err(|e| format!("query: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Server {
        dir: std::path::PathBuf,
        pg_ctl: std::path::PathBuf,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = as_postgres(std::process::Command::new(&self.pg_ctl).args([
                "-D",
                &self.dir.join("data").display().to_string(),
                "-m",
                "immediate",
                "stop",
            ]))
            .output();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// PostgreSQL refuses to run as root: run its tools as the `postgres` user when we are root.
    fn as_postgres(cmd: &mut std::process::Command) -> &mut std::process::Command {
        use std::os::unix::process::CommandExt;
        if unsafe_is_root() {
            let (uid, gid) = postgres_ids();
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn unsafe_is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
            .unwrap_or(false)
    }

    fn postgres_ids() -> (u32, u32) {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let line =
            passwd.lines().find(|l| l.starts_with("postgres:")).expect("a postgres user (Debian package postgresql)");
        let f: Vec<&str> = line.split(':').collect();
        (f[2].parse().expect("uid"), f[3].parse().expect("gid"))
    }

    /// A real PostgreSQL (Debian package postgresql, installed by tests/run.sh) started by
    /// the test in a temp dir on a loopback port of its own.
    #[tokio::test]
    async fn real_postgresql_table() {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path().join("bin")).find(|p| p.join("initdb").exists()))
            .expect("PostgreSQL is not installed: run tests/run.sh, which installs it");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("mp-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if unsafe_is_root() {
            let (uid, gid) = postgres_ids();
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let server = Server { dir: dir.clone(), pg_ctl: bin.join("pg_ctl") };
        let data = dir.join("data");
        let init = as_postgres(std::process::Command::new(bin.join("initdb")).args([
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "mail",
        ]))
        .output()
        .expect("run initdb");
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let opts = format!("-p {port} -k {} -c listen_addresses=127.0.0.1", dir.display());
        let start = as_postgres(std::process::Command::new(&server.pg_ctl).args([
            "-D",
            &data.display().to_string(),
            "-o",
            &opts,
            "-l",
            &dir.join("log").display().to_string(),
            "-w",
            "start",
        ]))
        .output()
        .expect("run pg_ctl");
        assert!(
            start.status.success(),
            "pg_ctl: {}{}",
            String::from_utf8_lossy(&start.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );

        let url = format!("postgresql://mail@127.0.0.1:{port}/postgres");
        let (client, conn) = tokio_postgres::connect(&url, NoTls).await.expect("connect");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
            .batch_execute("CREATE TABLE mailboxes (address text PRIMARY KEY, host text, quota bigint); INSERT INTO mailboxes VALUES ('alice@example.com', 'mbox1.internal', 1024), ('bob@example.com', NULL, 0);")
            .await
            .expect("create table");
        let policy = format!(
            "table boxes = sql {{ url \"{url}\"; query \"SELECT host FROM mailboxes WHERE address = lower($1)\"; }};\n\
             table quota = sql {{ url \"{url}\"; query \"SELECT quota FROM mailboxes WHERE address = $1\"; }};\n\
             table broken = sql {{ url \"{url}\"; query \"SELECT nope FROM nowhere WHERE x = $1\"; }};\n\
             table slow = sql {{ url \"{url}\"; query \"SELECT $1::text FROM pg_sleep(0.3)\"; connections 3; }};\n\
             on rcpt {{ if recipient in boxes or recipient in quota or recipient in broken or recipient in slow {{ accept; }} }}\n"
        );
        let c = mailpolicy_lang::compile("p.mailpolicy", &mailpolicy_lang::MemLoader::single("p.mailpolicy", &policy));
        let prog = c.program.expect("policy compiles");
        let pool = Pool::default();
        let none = HashMap::new();
        let t = Duration::from_secs(5);
        assert_eq!(
            pool.lookup(&prog, &prog.tables[0], "Alice@Example.com", &none, t).await,
            Answer::Value(Some("mbox1.internal".into()))
        );
        assert_eq!(
            pool.lookup(&prog, &prog.tables[0], "bob@example.com", &none, t).await,
            Answer::Value(Some(String::new()))
        );
        assert_eq!(pool.lookup(&prog, &prog.tables[0], "nobody@example.com", &none, t).await, Answer::Value(None));
        // The key is a parameter, never SQL.
        assert_eq!(pool.lookup(&prog, &prog.tables[0], "x' OR '1'='1", &none, t).await, Answer::Value(None));
        assert_eq!(
            pool.lookup(&prog, &prog.tables[1], "alice@example.com", &none, t).await,
            Answer::Value(Some("1024".into()))
        );
        assert!(matches!(pool.lookup(&prog, &prog.tables[2], "alice@example.com", &none, t).await, Answer::Error(_)));
        // One connection served every lookup of a table, one after the other; the failed query
        // dropped its connection.
        assert_eq!((pool.idle("boxes"), pool.idle("quota"), pool.idle("broken")), (1, 1, 0));
        // Lookups at once run on connections of their own, up to the table's `connections`
        // (they do not queue behind one connection), and the connections are kept.
        let slow = &prog.tables[3];
        let keys: Vec<String> = (0..7).map(|i| format!("k{i}")).collect();
        let answers = futures_util::future::join_all(keys.iter().map(|k| pool.lookup(&prog, slow, k, &none, t))).await;
        assert_eq!(answers, keys.iter().map(|k| Answer::Value(Some(k.clone()))).collect::<Vec<_>>());
        assert_eq!(pool.idle("slow"), 3);
        drop(server);
        // The server is gone: an error, never "absent".
        assert!(matches!(
            pool.lookup(&prog, &prog.tables[0], "alice@example.com", &none, Duration::from_secs(2)).await,
            Answer::Error(_) | Answer::Timeout
        ));
    }
}
