//! The on-disk encoding of message files and state files (see the module docs of
//! [`crate::spool`] for the layout and the durability argument).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Class, QueueId, RcptState};
use crate::conn::QueuedMessage;

/// First line of every message file.
pub(crate) const MAGIC: &[u8] = b"MAILPOLICY-SPOOL 1\n";
/// Last bytes of every message file: a file without them was cut short.
pub(crate) const TRAILER: &[u8] = b"\nEND\n";
/// Largest envelope line accepted when reading (a guard against reading junk into memory).
const MAX_META: u64 = 64 << 20;

/// The envelope line of a message file.
#[derive(Serialize, Deserialize)]
pub(crate) struct Meta {
    pub id: QueueId,
    pub class: Class,
    pub arrived_ms: u64,
    pub data_len: u64,
    /// The queued message with `data` empty (the bytes follow the line).
    pub envelope: QueuedMessage,
}

/// The mutable part of a message: one small file in `state/`, rewritten atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub v: u32,
    pub attempts: u32,
    pub next_attempt_ms: u64,
    pub delay_warned: bool,
    pub rcpts: Vec<RcptState>,
}

impl StateFile {
    /// The state of a message nobody has tried yet (no state file).
    pub fn initial(rcpts: usize, arrived_ms: u64) -> StateFile {
        StateFile {
            v: 1,
            attempts: 0,
            next_attempt_ms: arrived_ms,
            delay_warned: false,
            rcpts: vec![RcptState::Pending; rcpts],
        }
    }
}

/// The header (magic and envelope line) of a message file.
pub(crate) fn encode_header(id: &QueueId, class: Class, arrived_ms: u64, msg: &QueuedMessage) -> io::Result<Vec<u8>> {
    // Everything but the data (which may be large): no copy of it for the header.
    let envelope = QueuedMessage {
        sender: msg.sender.clone(),
        recipients: msg.recipients.clone(),
        ret: msg.ret.clone(),
        envid: msg.envid.clone(),
        data: Vec::new(),
        hold: msg.hold.clone(),
        archive: msg.archive.clone(),
        filter: msg.filter.clone(),
        batv_sign: msg.batv_sign,
        client_ip: msg.client_ip.clone(),
        helo: msg.helo.clone(),
        auth_user: msg.auth_user.clone(),
        added_headers: msg.added_headers.clone(),
        session: msg.session.clone(),
        copy: msg.copy,
        tail: msg.tail,
    };
    let data_len = (msg.data.len() as u64).saturating_add(msg.tail);
    let meta = Meta { id: id.clone(), class, arrived_ms, data_len, envelope };
    let mut out = MAGIC.to_vec();
    serde_json::to_writer(&mut out, &meta).map_err(io::Error::other)?;
    out.push(b'\n');
    Ok(out)
}

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// Read the header of a message file and check that the file is complete (length and
/// trailer), without reading the data. Returns the envelope and the offset of the data.
pub(crate) fn read_meta(path: &Path) -> io::Result<(Meta, u64)> {
    let file = File::open(path)?;
    let total = file.metadata()?.len();
    let mut r = BufReader::new(file);
    let mut magic = vec![0u8; MAGIC.len()];
    r.read_exact(&mut magic).map_err(|_| invalid("file shorter than the spool header"))?;
    if magic != MAGIC {
        return Err(invalid("not a mailpolicy spool file (bad magic)"));
    }
    let mut line = Vec::new();
    (&mut r).take(MAX_META).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return Err(invalid("envelope line is cut short"));
    }
    let meta: Meta = serde_json::from_slice(&line).map_err(|e| invalid(format!("envelope: {e}")))?;
    let offset = (MAGIC.len() + line.len()) as u64;
    let expect = offset
        .checked_add(meta.data_len)
        .and_then(|n| n.checked_add(TRAILER.len() as u64))
        .ok_or_else(|| invalid("data length out of range"))?;
    if total != expect {
        return Err(invalid(format!("file is {total} bytes, its header says {expect}")));
    }
    let mut file = r.into_inner();
    file.seek(SeekFrom::Start(offset + meta.data_len))?;
    let mut trailer = vec![0u8; TRAILER.len()];
    file.read_exact(&mut trailer)?;
    if trailer != TRAILER {
        return Err(invalid("missing end marker"));
    }
    Ok((meta, offset))
}

/// Read a whole message file: the envelope with its data restored.
pub(crate) fn read_message(path: &Path) -> io::Result<(Meta, QueuedMessage)> {
    let (meta, offset) = read_meta(path)?;
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let len = usize::try_from(meta.data_len).map_err(|_| invalid("data too large"))?;
    let mut data = vec![0u8; len];
    file.read_exact(&mut data)?;
    let mut msg = meta.envelope.clone();
    msg.data = data;
    Ok((meta, msg))
}

/// Read a state file; `Ok(None)` when there is none (the message was never tried).
pub(crate) fn read_state(path: &Path, rcpts: usize) -> io::Result<Option<StateFile>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let st: StateFile = serde_json::from_slice(&bytes).map_err(|e| invalid(format!("state file: {e}")))?;
    if st.v != 1 {
        return Err(invalid(format!("state file version {}", st.v)));
    }
    if st.rcpts.len() != rcpts {
        return Err(invalid(format!("state file has {} recipients, the envelope {rcpts}", st.rcpts.len())));
    }
    Ok(Some(st))
}
