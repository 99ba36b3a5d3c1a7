//! Reading message files and state files from disk; their encoding (versioned) is the
//! engine's [`crate::record`] (see the module docs of
//! [`crate::spool`] for the layout and the durability argument).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::conn::QueuedMessage;
pub(crate) use crate::record::{encode_header, Meta, StateFile, MAGIC, MAX_META, TRAILER};

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
    let meta = crate::record::decode_meta(&line).map_err(invalid)?;
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
    crate::record::decode_state(&bytes, rcpts).map(Some).map_err(invalid)
}
