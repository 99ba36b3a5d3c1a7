//! One log line per event, readable by default (`key=value`), JSON on request
//! (`server { log_format json; }`). Lines go to standard error.

use std::io::Write;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug)]
pub struct Logger {
    pub format: Format,
}

impl Logger {
    pub fn event(&self, event: &str, fields: &[(&str, &str)]) {
        let now = crate::conn::rfc3339(crate::daemon::now_ms());
        let line = match self.format {
            Format::Json => {
                let mut m = serde_json::Map::new();
                m.insert("time".into(), now.into());
                m.insert("event".into(), event.into());
                for (k, v) in fields {
                    m.insert((*k).into(), (*v).into());
                }
                serde_json::Value::Object(m).to_string()
            }
            Format::Text => {
                let mut s = format!("{now} {event}");
                for (k, v) in fields {
                    if v.is_empty() {
                        continue;
                    }
                    if v.contains([' ', '"', '=']) || v.chars().any(char::is_control) {
                        s.push_str(&format!(" {k}={}", serde_json::Value::from(*v)));
                    } else {
                        s.push_str(&format!(" {k}={v}"));
                    }
                }
                s
            }
        };
        let stderr = std::io::stderr();
        let mut lock = stderr.lock();
        let _ = writeln!(lock, "{line}");
    }
}
