//! The records the queue is made of, shared by the spool that writes them and the
//! scheduler and tools that read them: queue ids, queues, classes, per-recipient state,
//! and a message as listed.

use serde::{Deserialize, Serialize};

/// A queue id: alphanumeric ASCII, 1 to 64 characters (so it is always a safe file name).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

impl QueueId {
    /// Check a queue id given by a user or read from disk.
    pub fn parse(s: &str) -> Option<QueueId> {
        (!s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())).then(|| QueueId(s.to_string()))
    }

    /// A new id: 12 hex digits of the arrival time in ms, a 24-bit counter and the
    /// process's 16 random bits, so ids sort by arrival.
    pub fn generate(now_ms: u64, counter: u32, node: u16) -> QueueId {
        QueueId(format!("{:012X}{:06X}{:04X}", now_ms & 0xFFFF_FFFF_FFFF, counter & 0xFF_FFFF, node))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for QueueId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        QueueId::parse(&s).ok_or_else(|| format!("invalid queue id {s:?}"))
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The queues of R31, each a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueName {
    Incoming,
    Active,
    Deferred,
    Hold,
    Corrupt,
}

impl QueueName {
    pub const ALL: [QueueName; 5] =
        [QueueName::Incoming, QueueName::Active, QueueName::Deferred, QueueName::Hold, QueueName::Corrupt];

    pub fn as_str(self) -> &'static str {
        match self {
            QueueName::Incoming => "incoming",
            QueueName::Active => "active",
            QueueName::Deferred => "deferred",
            QueueName::Hold => "hold",
            QueueName::Corrupt => "corrupt",
        }
    }
}

impl std::fmt::Display for QueueName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The queue class (R30): bounces are scheduled in their own lane.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    #[default]
    Normal,
    Bounce,
}

/// Where one recipient stands. Times are ms since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered {
        at: u64,
        reply: String,
    },
    Failed {
        at: u64,
        reply: String,
    },
    Deferred {
        attempts: u32,
        next_at: u64,
        last_reply: String,
    },
}

impl RcptState {
    /// Delivered or failed: nothing more to do for this recipient.
    pub fn is_final(&self) -> bool {
        matches!(self, RcptState::Delivered { .. } | RcptState::Failed { .. })
    }

    /// The last reply seen for this recipient, if any.
    pub fn reply(&self) -> Option<&str> {
        match self {
            RcptState::Pending => None,
            RcptState::Delivered { reply, .. } | RcptState::Failed { reply, .. } => Some(reply),
            RcptState::Deferred { last_reply, .. } => Some(last_reply),
        }
    }
}

/// One recipient in a [`Summary`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptSummary {
    pub address: String,
    pub state: RcptState,
}

/// A message as listed (no data read).
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub id: QueueId,
    pub queue: QueueName,
    pub class: Class,
    pub arrived_ms: u64,
    /// Size of the message data in bytes.
    pub size: u64,
    pub sender: String,
    /// The policy's quarantine reason, for messages stored on `hold`.
    pub hold_reason: Option<String>,
    pub rcpts: Vec<RcptSummary>,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub delay_warned: bool,
}

impl Summary {
    /// The most informative reply: the last one of a recipient that is not done.
    pub fn last_reply(&self) -> Option<&str> {
        self.rcpts
            .iter()
            .filter(|r| !r.state.is_final())
            .find_map(|r| r.state.reply())
            .or_else(|| self.rcpts.iter().find_map(|r| r.state.reply()))
    }
}
