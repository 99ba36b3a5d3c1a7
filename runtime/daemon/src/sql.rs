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
//! row is the value (text, or a number or boolean shown as text); no row is "absent". One
//! connection per table is kept and reopened after an error. A failure or the time-out is
//! an error answer: 4xx unless the table says `on_error continue`.

use std::collections::HashMap;
use std::time::Duration;

use mailpolicy_lang::ir::{OptValue, Program, Resource};
use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use crate::eval::Answer;

/// Open connections, one per table.
#[derive(Default)]
pub struct Pool {
    clients: Mutex<HashMap<String, Client>>,
}

fn opt<'a>(t: &'a Resource, name: &str) -> Option<&'a str> {
    match t.option(name) {
        Some(OptValue::Str(s)) => Some(s.as_str()),
        _ => None,
    }
}

impl Pool {
    pub async fn lookup(
        &self,
        prog: &Program,
        t: &Resource,
        key: &str,
        secrets: &HashMap<String, String>,
        default_timeout: Duration,
    ) -> Answer {
        let timeout = super::lookup::table_timeout(t, default_timeout);
        match tokio::time::timeout(timeout, self.query(prog, t, key, secrets)).await {
            Ok(Ok(v)) => Answer::Value(v),
            Ok(Err(e)) => {
                // Drop the connection: the next lookup reconnects.
                self.clients.lock().await.remove(&t.name);
                Answer::Error(format!("sql table {}: {e}", t.name))
            }
            Err(_) => {
                self.clients.lock().await.remove(&t.name);
                Answer::Timeout
            }
        }
    }

    async fn query(
        &self,
        prog: &Program,
        t: &Resource,
        key: &str,
        secrets: &HashMap<String, String>,
    ) -> Result<Option<String>, String> {
        let query = opt(t, "query").ok_or("no query")?;
        let mut clients = self.clients.lock().await;
        if !clients.contains_key(&t.name) {
            let url = opt(t, "url").ok_or("no url")?;
            let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("url: {e}"))?;
            if let Some(pw) = super::lookup::table_secret(prog, t, "password", secrets) {
                config.password(pw);
            }
            let (client, connection) = config.connect(NoTls).await.map_err(|e| format!("connect: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            clients.insert(t.name.clone(), client);
        }
        let client = clients.get(&t.name).ok_or("no connection")?;
        let rows = client.query(query, &[&key]).await.map_err(|e| format!("query: {e}"))?;
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
