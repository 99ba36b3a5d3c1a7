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
        let now = crate::date::rfc3339(crate::now_ms());
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
                    s.push(' ');
                    s.push_str(k);
                    s.push('=');
                    if v.contains([' ', '"', '=']) || v.chars().any(char::is_control) {
                        s.push_str(&serde_json::Value::from(*v).to_string());
                    } else {
                        s.push_str(v);
                    }
                }
                s
            }
        };
        // One write per line (stderr is unbuffered: `writeln!` would make two system calls,
        // and lines of concurrent sessions could interleave between them).
        let mut line = line;
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}
