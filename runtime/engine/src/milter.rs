//! The Sendmail milter protocol, version 6, as Postfix speaks it to a mail filter
//! (`smtpd_milters`): the packet codec and the client state machine of one milter
//! connection. No I/O: the host connects, writes [`Client::poll_transmit`], feeds what it
//! reads to [`Client::handle_input`] and takes the stage's answer from
//! [`Client::poll_outcome`]; time-outs and the default action are the host's and
//! [`crate::conn::Conn`]'s.
//!
//! A packet is a 4-byte big-endian length (of what follows), a command byte and its
//! data. The MTA opens with `O` (version, actions it allows, protocol steps it can skip);
//! the milter answers `O` with what it wants, and may add macro lists (`SETSYMLIST`).
//! Then per stage: macros (`D`), the command (`C` connect, `H` helo, `M` mail, `R` rcpt,
//! `T` data, `L` header, `N` end of headers, `B` body chunk, `E` end of message), each
//! answered by one reply (`c` continue, `a` accept, `r` reject, `t` tempfail, `d`
//! discard, `y` reply code) unless the milter negotiated `SMFIP_NR_*` for it or asked not
//! to get it (`SMFIP_NO*`). At end of message the milter may send modifications (`h`
//! add header, `m` change header, `i` insert header, `e` change sender, `+`/`2` add
//! recipient, `-` delete recipient, `b` replace body, `q` quarantine) before its reply.
//! `A` aborts a transaction, `Q` ends the connection.
//!
//! Peer input never panics: lengths are checked before every read, a packet is at most
//! [`MAX_PACKET`] bytes, and anything the protocol does not allow where it arrives is a
//! [`Error`] (the host then applies the milter's default action).

use std::collections::VecDeque;

/// The protocol version this client speaks.
pub const VERSION: u32 = 6;
/// Largest packet accepted from a milter (a replaced body arrives in chunks).
pub const MAX_PACKET: usize = 1 << 20;
/// Largest body chunk sent (libmilter's `MILTER_CHUNK_SIZE`).
pub const CHUNK: usize = 65535;
/// Largest replaced body kept (the same bound as a message on the wire).
pub const MAX_BODY: usize = 64 << 20;

// Actions (SMFIF_*).
pub const SMFIF_ADDHDRS: u32 = 0x01;
pub const SMFIF_CHGBODY: u32 = 0x02;
pub const SMFIF_ADDRCPT: u32 = 0x04;
pub const SMFIF_DELRCPT: u32 = 0x08;
pub const SMFIF_CHGHDRS: u32 = 0x10;
pub const SMFIF_QUARANTINE: u32 = 0x20;
pub const SMFIF_CHGFROM: u32 = 0x40;
pub const SMFIF_ADDRCPT_PAR: u32 = 0x80;
pub const SMFIF_SETSYMLIST: u32 = 0x100;
/// Every action this client applies.
pub const ACTIONS: u32 = 0x1ff;

// Protocol steps (SMFIP_*).
pub const SMFIP_NOCONNECT: u32 = 0x1;
pub const SMFIP_NOHELO: u32 = 0x2;
pub const SMFIP_NOMAIL: u32 = 0x4;
pub const SMFIP_NORCPT: u32 = 0x8;
pub const SMFIP_NOBODY: u32 = 0x10;
pub const SMFIP_NOHDRS: u32 = 0x20;
pub const SMFIP_NOEOH: u32 = 0x40;
pub const SMFIP_NR_HDR: u32 = 0x80;
pub const SMFIP_NOUNKNOWN: u32 = 0x100;
pub const SMFIP_NODATA: u32 = 0x200;
pub const SMFIP_SKIP: u32 = 0x400;
pub const SMFIP_RCPT_REJ: u32 = 0x800;
pub const SMFIP_NR_CONN: u32 = 0x1000;
pub const SMFIP_NR_HELO: u32 = 0x2000;
pub const SMFIP_NR_MAIL: u32 = 0x4000;
pub const SMFIP_NR_RCPT: u32 = 0x8000;
pub const SMFIP_NR_DATA: u32 = 0x10000;
pub const SMFIP_NR_UNKN: u32 = 0x20000;
pub const SMFIP_NR_EOH: u32 = 0x40000;
pub const SMFIP_NR_BODY: u32 = 0x80000;
pub const SMFIP_HDR_LEADSPC: u32 = 0x100000;
/// Every protocol step this client can leave out or send without waiting for a reply.
/// Not offered: `SMFIP_RCPT_REJ` (rejected recipients are never shown to a milter) and
/// `SMFIP_NOUNKNOWN`/`SMFIP_NR_UNKN` (unknown commands are never sent).
pub const PROTOCOL: u32 = SMFIP_NOCONNECT
    | SMFIP_NOHELO
    | SMFIP_NOMAIL
    | SMFIP_NORCPT
    | SMFIP_NOBODY
    | SMFIP_NOHDRS
    | SMFIP_NOEOH
    | SMFIP_NR_HDR
    | SMFIP_NOUNKNOWN
    | SMFIP_NODATA
    | SMFIP_SKIP
    | SMFIP_NR_CONN
    | SMFIP_NR_HELO
    | SMFIP_NR_MAIL
    | SMFIP_NR_RCPT
    | SMFIP_NR_DATA
    | SMFIP_NR_UNKN
    | SMFIP_NR_EOH
    | SMFIP_NR_BODY
    | SMFIP_HDR_LEADSPC;

/// The macro stages of `SETSYMLIST` (SMFIM_*), and the command byte macros precede.
const MACRO_STAGES: [(u32, u8); 7] = [(0, b'C'), (1, b'H'), (2, b'M'), (3, b'R'), (4, b'T'), (5, b'E'), (6, b'N')];

/// A protocol violation or a reply that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(s: impl Into<String>) -> Result<T, Error> {
    Err(Error(s.into()))
}

/// One packet: a command or reply byte and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub cmd: u8,
    pub data: Vec<u8>,
}

impl Packet {
    pub fn new(cmd: u8, data: Vec<u8>) -> Packet {
        Packet { cmd, data }
    }

    /// The packet on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data.len() + 5);
        out.extend_from_slice(&((self.data.len() + 1) as u32).to_be_bytes());
        out.push(self.cmd);
        out.extend_from_slice(&self.data);
        out
    }

    /// One packet from the front of `buf`: `Ok(None)` while incomplete, with the number
    /// of bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(Packet, usize)>, Error> {
        let Some(len) = buf.get(..4) else { return Ok(None) };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 {
            return err("milter sent an empty packet");
        }
        if len > MAX_PACKET {
            return err(format!("milter sent a packet of {len} bytes"));
        }
        let Some(body) = buf.get(4..4 + len) else { return Ok(None) };
        let (cmd, data) = body.split_first().map(|(c, d)| (*c, d.to_vec())).unwrap_or((0, Vec::new()));
        Ok(Some((Packet { cmd, data }, 4 + len)))
    }
}

/// NUL-terminated strings, each written with its NUL.
fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        // A NUL inside a value would cut it short at the milter: drop it.
        out.extend(p.bytes().filter(|b| *b != 0));
        out.push(0);
    }
    out
}

/// Split packet data into its NUL-terminated strings (a missing final NUL is an error).
fn split_cstrs(data: &[u8]) -> Result<Vec<String>, Error> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    if data.last() != Some(&0) {
        return err("milter string without its NUL");
    }
    let body = data.get(..data.len() - 1).unwrap_or_default();
    Ok(body.split(|b| *b == 0).map(|s| String::from_utf8_lossy(s).into_owned()).collect())
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    let b = data.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// How the client's address is described in the connect packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Family {
    Inet(std::net::IpAddr, u16),
    /// A local submission (no socket): SMFIA_UNKNOWN.
    Unknown,
}

/// What one stage tells the milter. Each carries the macros sent before its command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Connect {
        hostname: String,
        family: Family,
    },
    Helo(String),
    /// The sender (`<a@b>`) then its ESMTP parameters.
    Mail(Vec<String>),
    Rcpt(Vec<String>),
    /// The message: data, its header fields (name, value as on the wire after the colon,
    /// continuation lines joined by `\n`), end of headers, the body in chunks, end of
    /// message. `eom_macros` go before the end of message.
    Message {
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        eom_macros: Vec<(String, String)>,
    },
}

impl Step {
    fn macro_cmd(&self) -> u8 {
        match self {
            Step::Connect { .. } => b'C',
            Step::Helo(_) => b'H',
            Step::Mail(_) => b'M',
            Step::Rcpt(_) => b'R',
            Step::Message { .. } => b'T',
        }
    }
}

/// What a milter answered a stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum MilterVerdict {
    /// Go on (also: the milter does not take part in this stage).
    #[default]
    Continue,
    /// Accept without further milter inspection (of the transaction; at connect or
    /// helo, of the session).
    Accept,
    Reject,
    Tempfail,
    /// Accept and throw the message away (at rcpt: that recipient).
    Discard,
    /// A reply of the milter's own: its code (4xx or 5xx), enhanced code and text.
    Reply {
        code: u16,
        enhanced: Option<(u8, u16, u16)>,
        text: String,
    },
}

impl MilterVerdict {
    /// The word `milter.NAME.verdict` reads.
    pub fn word(&self) -> &'static str {
        match self {
            MilterVerdict::Continue => "continue",
            MilterVerdict::Accept => "accept",
            MilterVerdict::Reject => "reject",
            MilterVerdict::Tempfail => "tempfail",
            MilterVerdict::Discard => "discard",
            MilterVerdict::Reply { code, .. } if *code >= 500 => "reject",
            MilterVerdict::Reply { .. } => "tempfail",
        }
    }
}

/// A modification requested at end of message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Modification {
    AddHeader {
        name: String,
        value: String,
    },
    /// Insert at position `index` (0: first) of the header section.
    InsertHeader {
        index: u32,
        name: String,
        value: String,
    },
    /// The `index`-th (1-based) field `name`; an empty value deletes it.
    ChangeHeader {
        index: u32,
        name: String,
        value: String,
    },
    ChangeFrom {
        address: String,
        args: String,
    },
    AddRcpt {
        address: String,
        args: String,
    },
    DelRcpt(String),
    /// The new body (chunks joined).
    ReplaceBody(Vec<u8>),
    Quarantine(String),
}

/// The answer of one stage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MilterReply {
    pub verdict: MilterVerdict,
    pub modifications: Vec<Modification>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Nothing outstanding.
    Idle,
    /// The negotiation reply.
    Negotiate,
    /// A reply to the packet just sent; `final` when it ends the step.
    Reply { last: bool, body: bool },
    /// The connection is unusable.
    Broken,
}

/// One milter connection, from negotiation to quit.
#[derive(Debug)]
pub struct Client {
    out: Vec<u8>,
    inbuf: Vec<u8>,
    /// Packets of the current step not yet sent, each with whether it wants a reply.
    queue: VecDeque<(Packet, bool, bool)>,
    wait: Wait,
    /// Negotiated: actions and protocol flags, and the milter's macro lists per command byte.
    actions: u32,
    protocol: u32,
    version: u32,
    symlists: Vec<(u8, Vec<String>)>,
    outcome: Option<MilterReply>,
    mods: Vec<Modification>,
    body_len: usize,
    /// The milter accepted: skip it until the transaction (or, from connect/helo, the
    /// session) ends.
    skip_tx: bool,
    skip_session: bool,
    in_tx: bool,
    /// The step being answered.
    stage: u8,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// A new connection: the negotiation packet is ready to send.
    pub fn new() -> Client {
        let mut c = Client {
            out: Vec::new(),
            inbuf: Vec::new(),
            queue: VecDeque::new(),
            wait: Wait::Negotiate,
            actions: 0,
            protocol: 0,
            version: 0,
            symlists: Vec::new(),
            outcome: None,
            mods: Vec::new(),
            body_len: 0,
            skip_tx: false,
            skip_session: false,
            in_tx: false,
            stage: b'O',
        };
        let mut d = Vec::with_capacity(12);
        d.extend_from_slice(&VERSION.to_be_bytes());
        d.extend_from_slice(&ACTIONS.to_be_bytes());
        d.extend_from_slice(&PROTOCOL.to_be_bytes());
        c.out.extend(Packet::new(b'O', d).encode());
        c
    }

    /// Negotiation is done and nothing is outstanding: a step may begin.
    pub fn ready(&self) -> bool {
        self.wait == Wait::Idle
    }

    /// The negotiated (version, actions, protocol), once negotiation is done.
    pub fn negotiated(&self) -> Option<(u32, u32, u32)> {
        (self.version != 0).then_some((self.version, self.actions, self.protocol))
    }

    /// Bytes to write to the milter.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        (!self.out.is_empty()).then(|| std::mem::take(&mut self.out))
    }

    /// The answer of the step begun last, once complete.
    pub fn poll_outcome(&mut self) -> Option<MilterReply> {
        self.outcome.take()
    }

    /// Begin a stage. Returns the outcome at once when the milter takes no part in it
    /// (it accepted earlier, or negotiated the step away, or wants no reply to it).
    pub fn begin(&mut self, step: Step, macros: &[(String, String)]) -> Result<(), Error> {
        if self.wait != Wait::Idle {
            return err("milter step begun while another is outstanding");
        }
        self.outcome = None;
        self.mods.clear();
        self.body_len = 0;
        let p = self.protocol;
        // A new transaction (or a new HELO) ends an unfinished one with ABORT.
        let new_tx = matches!(step, Step::Mail(_) | Step::Helo(_));
        if new_tx && self.in_tx {
            self.out.extend(Packet::new(b'A', Vec::new()).encode());
            self.in_tx = false;
        }
        if new_tx {
            self.skip_tx = false;
        }
        if matches!(step, Step::Mail(_)) {
            self.in_tx = true;
        }
        if self.skip_session || (self.skip_tx && !matches!(step, Step::Connect { .. } | Step::Helo(_))) {
            self.outcome = Some(MilterReply::default());
            return Ok(());
        }
        self.stage = step.macro_cmd();
        let macro_pkt = |c: &Client, cmd: u8, m: &[(String, String)]| -> Option<Packet> {
            let wanted = c.symlists.iter().find(|(k, _)| *k == cmd).map(|(_, l)| l);
            let mut d = vec![cmd];
            let mut any = false;
            for (n, v) in m {
                if let Some(w) = wanted {
                    let bare = n.trim_start_matches('{').trim_end_matches('}');
                    if !w.iter().any(|x| x.trim_start_matches('{').trim_end_matches('}') == bare) {
                        continue;
                    }
                }
                d.extend(cstrs(&[n, v]));
                any = true;
            }
            any.then(|| Packet::new(b'D', d))
        };
        let mut q: VecDeque<(Packet, bool, bool)> = VecDeque::new();
        let push_macros = |c: &Client, q: &mut VecDeque<(Packet, bool, bool)>, cmd: u8, m: &[(String, String)]| {
            if let Some(pk) = macro_pkt(c, cmd, m) {
                q.push_back((pk, false, false));
            }
        };
        match step {
            Step::Connect { hostname, family } => {
                if p & SMFIP_NOCONNECT == 0 {
                    push_macros(self, &mut q, b'C', macros);
                    let mut d = cstrs(&[&hostname]);
                    match family {
                        Family::Inet(ip, port) => {
                            d.push(if ip.is_ipv4() { b'4' } else { b'6' });
                            d.extend_from_slice(&port.to_be_bytes());
                            d.extend(cstrs(&[&ip.to_string()]));
                        }
                        Family::Unknown => d.push(b'U'),
                    }
                    q.push_back((Packet::new(b'C', d), p & SMFIP_NR_CONN == 0, false));
                }
            }
            Step::Helo(name) => {
                if p & SMFIP_NOHELO == 0 {
                    push_macros(self, &mut q, b'H', macros);
                    q.push_back((Packet::new(b'H', cstrs(&[&name])), p & SMFIP_NR_HELO == 0, false));
                }
            }
            Step::Mail(args) => {
                if p & SMFIP_NOMAIL == 0 {
                    push_macros(self, &mut q, b'M', macros);
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    q.push_back((Packet::new(b'M', cstrs(&a)), p & SMFIP_NR_MAIL == 0, false));
                }
            }
            Step::Rcpt(args) => {
                if p & SMFIP_NORCPT == 0 {
                    push_macros(self, &mut q, b'R', macros);
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    q.push_back((Packet::new(b'R', cstrs(&a)), p & SMFIP_NR_RCPT == 0, false));
                }
            }
            Step::Message { headers, body, eom_macros } => {
                if p & SMFIP_NODATA == 0 {
                    push_macros(self, &mut q, b'T', macros);
                    q.push_back((Packet::new(b'T', Vec::new()), p & SMFIP_NR_DATA == 0, false));
                }
                if p & SMFIP_NOHDRS == 0 {
                    for (n, v) in &headers {
                        let v = if p & SMFIP_HDR_LEADSPC != 0 { v.as_str() } else { v.trim_start_matches([' ', '\t']) };
                        q.push_back((Packet::new(b'L', cstrs(&[n, v])), p & SMFIP_NR_HDR == 0, false));
                    }
                }
                if p & SMFIP_NOEOH == 0 {
                    push_macros(self, &mut q, b'N', macros);
                    q.push_back((Packet::new(b'N', Vec::new()), p & SMFIP_NR_EOH == 0, false));
                }
                if p & SMFIP_NOBODY == 0 {
                    for chunk in body.chunks(CHUNK) {
                        q.push_back((Packet::new(b'B', chunk.to_vec()), p & SMFIP_NR_BODY == 0, true));
                    }
                }
                push_macros(self, &mut q, b'E', &eom_macros);
                q.push_back((Packet::new(b'E', Vec::new()), true, false));
                self.in_tx = false;
            }
        }
        self.queue = q;
        self.advance();
        Ok(())
    }

    /// Send queued packets up to the next one that wants a reply.
    fn advance(&mut self) {
        while let Some((pk, reply, body)) = self.queue.pop_front() {
            self.out.extend(pk.encode());
            if reply {
                self.wait = Wait::Reply { last: self.queue.is_empty(), body };
                return;
            }
        }
        // Every packet sent and none wanted a reply: the step continues.
        self.wait = Wait::Idle;
        self.finish(MilterVerdict::Continue);
    }

    fn finish(&mut self, verdict: MilterVerdict) {
        self.queue.clear();
        self.wait = Wait::Idle;
        if verdict == MilterVerdict::Accept {
            if matches!(self.stage, b'C' | b'H') {
                self.skip_session = true;
            } else {
                self.skip_tx = true;
            }
        }
        if matches!(
            verdict,
            MilterVerdict::Reject | MilterVerdict::Tempfail | MilterVerdict::Discard | MilterVerdict::Reply { .. }
        ) && self.stage == b'C'
        {
            // Refused at connect: the session is refused; nothing more goes to the milter.
            self.skip_session = true;
        }
        let modifications = std::mem::take(&mut self.mods);
        self.outcome = Some(MilterReply { verdict, modifications });
    }

    /// The session ends: tell the milter to quit.
    pub fn quit(&mut self) {
        if self.wait != Wait::Broken {
            self.out.extend(Packet::new(b'Q', Vec::new()).encode());
        }
        self.wait = Wait::Broken;
    }

    /// Bytes read from the milter. An error leaves the connection unusable.
    pub fn handle_input(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if self.wait == Wait::Broken {
            return err("milter connection is closed");
        }
        self.inbuf.extend_from_slice(bytes);
        loop {
            let (pk, used) = match Packet::decode(&self.inbuf) {
                Ok(Some(x)) => x,
                Ok(None) => return Ok(()),
                Err(e) => return Err(self.broken(e)),
            };
            self.inbuf.drain(..used);
            if let Err(e) = self.packet(pk) {
                return Err(self.broken(e));
            }
        }
    }

    /// A protocol error: the connection is unusable, and no answer of it counts.
    fn broken(&mut self, e: Error) -> Error {
        self.wait = Wait::Broken;
        self.outcome = None;
        self.queue.clear();
        self.inbuf.clear();
        e
    }

    fn packet(&mut self, pk: Packet) -> Result<(), Error> {
        match self.wait {
            Wait::Negotiate => self.negotiate(pk),
            Wait::Reply { last, body } => self.reply(pk, last, body),
            Wait::Idle => err(format!("milter sent {:?} when nothing was asked", pk.cmd as char)),
            Wait::Broken => err("milter connection is closed"),
        }
    }

    fn negotiate(&mut self, pk: Packet) -> Result<(), Error> {
        if pk.cmd != b'O' {
            return err(format!("milter answered negotiation with {:?}", pk.cmd as char));
        }
        let (Some(version), Some(actions), Some(protocol)) =
            (u32_at(&pk.data, 0), u32_at(&pk.data, 4), u32_at(&pk.data, 8))
        else {
            return err("milter negotiation reply too short");
        };
        if !(2..=VERSION).contains(&version) {
            return err(format!("milter protocol version {version} is not supported"));
        }
        if actions & !ACTIONS != 0 {
            return err(format!("milter wants actions {:#x} that are not offered", actions & !ACTIONS));
        }
        if protocol & !PROTOCOL != 0 {
            return err(format!("milter wants protocol steps {:#x} that are not offered", protocol & !PROTOCOL));
        }
        // Macro lists (SETSYMLIST): u32 stage, then a NUL-terminated list of names.
        let mut rest = pk.data.get(12..).unwrap_or_default();
        while !rest.is_empty() {
            let Some(stage) = u32_at(rest, 0) else { return err("milter macro list cut short") };
            let after = rest.get(4..).unwrap_or_default();
            let Some(end) = after.iter().position(|b| *b == 0) else { return err("milter macro list without NUL") };
            let names = String::from_utf8_lossy(after.get(..end).unwrap_or_default()).into_owned();
            let Some((_, cmd)) = MACRO_STAGES.iter().find(|(s, _)| *s == stage) else {
                return err(format!("milter macro list for unknown stage {stage}"));
            };
            self.symlists.retain(|(c, _)| c != cmd);
            self.symlists.push((*cmd, names.split_whitespace().map(str::to_string).collect()));
            rest = after.get(end + 1..).unwrap_or_default();
        }
        self.version = version;
        self.actions = actions;
        self.protocol = protocol;
        self.wait = Wait::Idle;
        Ok(())
    }

    fn allow(&self, flag: u32, what: &str) -> Result<(), Error> {
        if self.actions & flag == 0 {
            return err(format!("milter asked to {what} without negotiating it"));
        }
        if self.stage != b'T' {
            return err(format!("milter asked to {what} before end of message"));
        }
        Ok(())
    }

    fn reply(&mut self, pk: Packet, last: bool, body: bool) -> Result<(), Error> {
        let strs = || split_cstrs(&pk.data);
        match pk.cmd {
            b'c' => {
                if last {
                    self.finish(MilterVerdict::Continue);
                } else {
                    self.advance();
                }
            }
            b'k' => {
                // SKIP: no more body chunks (only while body chunks are being sent).
                if !body || self.protocol & SMFIP_SKIP == 0 {
                    return err("milter sent SKIP outside the body");
                }
                self.queue.retain(|(p, ..)| p.cmd != b'B');
                self.advance();
            }
            b'a' => self.finish(MilterVerdict::Accept),
            b'r' => self.finish(MilterVerdict::Reject),
            b't' => self.finish(MilterVerdict::Tempfail),
            b'd' => self.finish(MilterVerdict::Discard),
            b'y' => {
                let text = strs()?.into_iter().next().unwrap_or_default();
                self.finish(parse_reply(&text)?);
            }
            b'p' => {} // progress: still working
            // The milter stops being usable for this session: a temporary failure.
            b's' | b'f' => {
                self.finish(MilterVerdict::Tempfail);
                self.skip_session = true;
            }
            b'h' | b'm' | b'i' | b'e' | b'+' | b'2' | b'-' | b'b' | b'q' if last => {
                self.modification(pk)?;
            }
            b'h' | b'm' | b'i' | b'e' | b'+' | b'2' | b'-' | b'b' | b'q' => {
                return err(format!("milter sent modification {:?} before end of message", pk.cmd as char))
            }
            other => return err(format!("milter sent unknown reply {:?}", other as char)),
        }
        Ok(())
    }

    fn modification(&mut self, pk: Packet) -> Result<(), Error> {
        let two = |v: Vec<String>| -> Result<(String, String), Error> {
            let mut it = v.into_iter();
            match (it.next(), it.next()) {
                (Some(a), Some(b)) => Ok((a, b)),
                (Some(a), None) => Ok((a, String::new())),
                _ => err("milter modification without its arguments"),
            }
        };
        let header_name = |n: &str| -> Result<(), Error> {
            if n.is_empty() || n.bytes().any(|b| b <= b' ' || b == b':' || b >= 0x7f) {
                return err(format!("milter header name {n:?} is not a field name"));
            }
            Ok(())
        };
        let m = match pk.cmd {
            b'h' => {
                self.allow(SMFIF_ADDHDRS, "add a header")?;
                let (name, value) = two(split_cstrs(&pk.data)?)?;
                header_name(&name)?;
                Modification::AddHeader { name, value }
            }
            b'm' | b'i' => {
                let flag = if pk.cmd == b'm' { SMFIF_CHGHDRS } else { SMFIF_ADDHDRS };
                self.allow(flag, if pk.cmd == b'm' { "change a header" } else { "insert a header" })?;
                let Some(index) = u32_at(&pk.data, 0) else { return err("milter header change without index") };
                let (name, value) = two(split_cstrs(pk.data.get(4..).unwrap_or_default())?)?;
                header_name(&name)?;
                if pk.cmd == b'm' {
                    Modification::ChangeHeader { index, name, value }
                } else {
                    Modification::InsertHeader { index, name, value }
                }
            }
            b'e' => {
                self.allow(SMFIF_CHGFROM, "change the sender")?;
                let (address, args) = two(split_cstrs(&pk.data)?)?;
                Modification::ChangeFrom { address, args }
            }
            b'+' | b'2' => {
                self.allow(if pk.cmd == b'+' { SMFIF_ADDRCPT } else { SMFIF_ADDRCPT_PAR }, "add a recipient")?;
                let (address, args) = two(split_cstrs(&pk.data)?)?;
                Modification::AddRcpt { address, args }
            }
            b'-' => {
                self.allow(SMFIF_DELRCPT, "delete a recipient")?;
                let (address, _) = two(split_cstrs(&pk.data)?)?;
                Modification::DelRcpt(address)
            }
            b'b' => {
                self.allow(SMFIF_CHGBODY, "replace the body")?;
                self.body_len += pk.data.len();
                if self.body_len > MAX_BODY {
                    return err("milter's replaced body is too large");
                }
                if let Some(Modification::ReplaceBody(b)) = self.mods.last_mut() {
                    b.extend_from_slice(&pk.data);
                    return Ok(());
                }
                Modification::ReplaceBody(pk.data)
            }
            _ => {
                self.allow(SMFIF_QUARANTINE, "quarantine")?;
                let reason = split_cstrs(&pk.data)?.into_iter().next().unwrap_or_default();
                Modification::Quarantine(reason)
            }
        };
        if self.mods.len() >= 10_000 {
            return err("milter sent too many modifications");
        }
        self.mods.push(m);
        Ok(())
    }
}

/// A milter's own reply (`SMFIR_REPLYCODE`): `550 5.7.1 text`, possibly multi-line
/// (`550-5.7.1 first\r\n550 5.7.1 last`); only 4xx and 5xx are allowed. The first
/// line's text is kept, made printable.
pub fn parse_reply(text: &str) -> Result<MilterVerdict, Error> {
    let line = text.lines().next().unwrap_or("");
    let code: u16 = match line.get(..3).and_then(|c| c.parse().ok()) {
        Some(c) if (400..600).contains(&c) => c,
        _ => return err(format!("milter reply {line:?} is not a 4xx or 5xx reply")),
    };
    let rest = line.get(3..).unwrap_or("").trim_start_matches([' ', '-']);
    let (enhanced, text) = match rest.split_once(' ').map(|(e, t)| (parse_enhanced(e), t)) {
        Some((Some(e), t)) if e.0 as u16 == code / 100 => (Some(e), t),
        _ => match parse_enhanced(rest) {
            Some(e) if e.0 as u16 == code / 100 => (Some(e), ""),
            _ => (None, rest),
        },
    };
    let text: String = text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    let text = text.replace("%%", "%");
    Ok(MilterVerdict::Reply { code, enhanced, text: text.trim().to_string() })
}

fn parse_enhanced(s: &str) -> Option<(u8, u16, u16)> {
    let mut it = s.split('.');
    let (a, b, c) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() {
        return None;
    }
    let a: u8 = a.parse().ok()?;
    ((a == 4 || a == 5) && !b.is_empty() && !c.is_empty()).then_some(())?;
    Some((a, b.parse().ok()?, c.parse().ok()?))
}

/// A message's header fields as a milter gets them, and where its body starts: names
/// as written, values after the colon with continuation lines joined by `\n` (line
/// ends without CR, as Postfix sends them).
pub fn split_message(data: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let end = crate::headers::header_end(data);
    let head = data.get(..end).unwrap_or_default();
    let body = data.get(end..).unwrap_or_default();
    // The empty line ending the header section is not part of the body.
    let body = body.strip_prefix(b"\r\n").or_else(|| body.strip_prefix(b"\n")).unwrap_or(body);
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some((_, v)) = fields.last_mut() {
                v.push('\n');
                v.push_str(&text);
            }
            continue;
        }
        match text.split_once(':') {
            Some((n, v)) => fields.push((n.trim_end().to_string(), v.to_string())),
            None => fields.push((text.into_owned(), String::new())),
        }
    }
    (fields, body)
}

/// The fuzz target: any bytes from a milter, cut anywhere, at any stage, never panic
/// the client; after a protocol error the connection stays unusable (every later input
/// is an error and no outcome appears); the client never sends more than one packet
/// without a reply outstanding beyond what the negotiated no-reply steps allow.
pub fn fuzz_replies(input: &[u8]) {
    let (cuts, stage, data) = match input {
        [a, b, rest @ ..] => (*a as usize, *b, rest),
        _ => return,
    };
    let step = match stage % 5 {
        0 => Step::Connect { hostname: "h".into(), family: Family::Inet([192, 0, 2, 1].into(), 25) },
        1 => Step::Helo("h".into()),
        2 => Step::Mail(vec!["<a@b>".into()]),
        3 => Step::Rcpt(vec!["<c@d>".into()]),
        _ => Step::Message {
            headers: vec![("Subject".into(), " x".into())],
            body: vec![b'x'; 70000],
            eom_macros: Vec::new(),
        },
    };
    let mut c = Client::new();
    let _ = c.poll_transmit();
    let mut broken = false;
    let size = cuts.max(1);
    for chunk in data.chunks(size) {
        let r = c.handle_input(chunk);
        if broken {
            assert!(r.is_err(), "input accepted after a protocol error");
            assert!(c.poll_outcome().is_none());
            continue;
        }
        if r.is_err() {
            broken = true;
            continue;
        }
        if c.ready() {
            // Each answered step starts the next one, as a session does.
            if c.poll_outcome().is_some() || c.negotiated().is_some() {
                let _ = c.begin(step.clone(), &[("j".into(), "mx".into())]);
            }
        }
        while let Some(b) = c.poll_transmit() {
            assert!(b.len() >= 5);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(cmd: u8, data: &[u8]) -> Vec<u8> {
        Packet::new(cmd, data.to_vec()).encode()
    }

    fn negotiate(actions: u32, protocol: u32, extra: &[u8]) -> Client {
        let mut c = Client::new();
        let first = c.poll_transmit().unwrap();
        let (pk, n) = Packet::decode(&first).unwrap().unwrap();
        assert_eq!((pk.cmd, n), (b'O', first.len()));
        assert_eq!(u32_at(&pk.data, 0), Some(6));
        let mut d = Vec::new();
        d.extend_from_slice(&6u32.to_be_bytes());
        d.extend_from_slice(&actions.to_be_bytes());
        d.extend_from_slice(&protocol.to_be_bytes());
        d.extend_from_slice(extra);
        c.handle_input(&reply(b'O', &d)).unwrap();
        assert!(c.ready());
        c
    }

    fn sent(c: &mut Client) -> Vec<Packet> {
        let bytes = c.poll_transmit().unwrap_or_default();
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((p, n)) = Packet::decode(&bytes[at..]).unwrap() {
            out.push(p);
            at += n;
        }
        out
    }

    #[test]
    fn connect_with_macros_and_reject() {
        let mut c = negotiate(0, 0, &[]);
        let step =
            Step::Connect { hostname: "client.example".into(), family: Family::Inet([192, 0, 2, 9].into(), 4000) };
        c.begin(step, &[("j".into(), "mx.example".into()), ("{client_addr}".into(), "192.0.2.9".into())]).unwrap();
        let p = sent(&mut c);
        assert_eq!(p[0].cmd, b'D');
        assert_eq!(p[0].data, b"Cj\0mx.example\0{client_addr}\0192.0.2.9\0");
        assert_eq!(p[1].cmd, b'C');
        assert_eq!(p[1].data, b"client.example\x004\x0f\xa0192.0.2.9\0");
        assert_eq!(c.poll_outcome(), None);
        c.handle_input(&reply(b'r', b"")).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Reject);
    }

    #[test]
    fn no_reply_steps_and_skipped_steps() {
        let mut c = negotiate(0, SMFIP_NR_CONN | SMFIP_NOHELO, &[]);
        c.begin(Step::Connect { hostname: "h".into(), family: Family::Unknown }, &[]).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Continue);
        assert_eq!(sent(&mut c)[0].data, b"h\0U");
        c.begin(Step::Helo("x".into()), &[]).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Continue);
        assert!(c.poll_transmit().is_none());
    }

    #[test]
    fn symlist_limits_macros() {
        let mut extra = 2u32.to_be_bytes().to_vec();
        extra.extend_from_slice(b"{auth_authen} i\0");
        let mut c = negotiate(SMFIF_SETSYMLIST, 0, &extra);
        let m = [
            ("i".to_string(), "Q1".to_string()),
            ("{mail_addr}".into(), "a@b".into()),
            ("{auth_authen}".into(), "u".into()),
        ];
        c.begin(Step::Mail(vec!["<a@b>".into(), "SIZE=10".into()]), &m).unwrap();
        let p = sent(&mut c);
        assert_eq!(p[0].data, b"Mi\0Q1\0{auth_authen}\0u\0");
        assert_eq!(p[1].data, b"<a@b>\0SIZE=10\0");
        c.handle_input(&reply(b'y', b"451 4.7.1 Try later\0")).unwrap();
        let v = c.poll_outcome().unwrap().verdict;
        assert_eq!(v, MilterVerdict::Reply { code: 451, enhanced: Some((4, 7, 1)), text: "Try later".into() });
        assert_eq!(v.word(), "tempfail");
    }

    #[test]
    fn message_with_modifications() {
        let mut c =
            negotiate(SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT, SMFIP_NR_HDR, &[]);
        c.begin(Step::Mail(vec!["<a@b>".into()]), &[]).unwrap();
        let _ = sent(&mut c);
        c.handle_input(&reply(b'c', b"")).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Continue);
        let (headers, body) = split_message(b"Subject: hi\r\n there\r\nFrom: a@b\r\n\r\nbody\r\n");
        assert_eq!(headers, vec![("Subject".to_string(), " hi\n there".to_string()), ("From".into(), " a@b".into())]);
        assert_eq!(body, b"body\r\n");
        c.begin(Step::Message { headers, body: body.to_vec(), eom_macros: vec![("i".into(), "Q1".into())] }, &[])
            .unwrap();
        let p = sent(&mut c);
        assert_eq!(p.iter().map(|p| p.cmd).collect::<Vec<_>>(), vec![b'T']);
        c.handle_input(&reply(b'c', b"")).unwrap();
        let p = sent(&mut c);
        // Headers need no reply: both, then end of headers.
        assert_eq!(p.iter().map(|p| p.cmd).collect::<Vec<_>>(), vec![b'L', b'L', b'N']);
        assert_eq!(p[0].data, b"Subject\0hi\n there\0");
        c.handle_input(&reply(b'c', b"")).unwrap();
        assert_eq!(sent(&mut c)[0].cmd, b'B');
        c.handle_input(&reply(b'c', b"")).unwrap();
        let p = sent(&mut c);
        assert_eq!((p[0].cmd, p[0].data.as_slice(), p[1].cmd), (b'D', b"Ei\0Q1\0".as_slice(), b'E'));
        let mut m = reply(b'h', b"X-Scanned\0yes\0");
        m.extend(reply(b'm', b"\0\0\0\x01Subject\0\0"));
        m.extend(reply(b'+', b"<new@b>\0"));
        m.extend(reply(b'-', b"<a@b>\0"));
        m.extend(reply(b'b', b"new "));
        m.extend(reply(b'b', b"body\r\n"));
        m.extend(reply(b'a', b""));
        // Split the bytes anywhere: the same outcome.
        let (x, y) = m.split_at(7);
        c.handle_input(x).unwrap();
        c.handle_input(y).unwrap();
        let o = c.poll_outcome().unwrap();
        assert_eq!(o.verdict, MilterVerdict::Accept);
        assert_eq!(
            o.modifications,
            vec![
                Modification::AddHeader { name: "X-Scanned".into(), value: "yes".into() },
                Modification::ChangeHeader { index: 1, name: "Subject".into(), value: String::new() },
                Modification::AddRcpt { address: "<new@b>".into(), args: String::new() },
                Modification::DelRcpt("<a@b>".into()),
                Modification::ReplaceBody(b"new body\r\n".to_vec()),
            ]
        );
    }

    #[test]
    fn accept_skips_the_rest_of_the_transaction_and_abort_precedes_a_new_one() {
        let mut c = negotiate(0, 0, &[]);
        c.begin(Step::Mail(vec!["<a@b>".into()]), &[]).unwrap();
        let _ = sent(&mut c);
        c.handle_input(&reply(b'a', b"")).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Accept);
        c.begin(Step::Rcpt(vec!["<c@d>".into()]), &[]).unwrap();
        assert_eq!(c.poll_outcome().unwrap().verdict, MilterVerdict::Continue);
        assert!(c.poll_transmit().is_none());
        c.begin(Step::Mail(vec!["<e@f>".into()]), &[]).unwrap();
        let p = sent(&mut c);
        assert_eq!(p.iter().map(|p| p.cmd).collect::<Vec<_>>(), vec![b'A', b'M']);
    }

    #[test]
    fn violations_are_errors() {
        // A modification not negotiated.
        let mut c = negotiate(0, 0, &[]);
        c.begin(Step::Message { headers: vec![], body: vec![], eom_macros: vec![] }, &[]).unwrap();
        let _ = sent(&mut c);
        c.handle_input(&reply(b'c', b"")).unwrap(); // data
        c.handle_input(&reply(b'c', b"")).unwrap(); // eoh
        c.handle_input(&reply(b'c', b"")).unwrap(); // (no body) -> eom sent
        assert!(c.handle_input(&reply(b'h', b"X\0y\0")).is_err());
        // Version, actions and garbage.
        let mut c = Client::new();
        let mut d = 7u32.to_be_bytes().to_vec();
        d.extend([0; 8]);
        assert!(c.handle_input(&reply(b'O', &d)).is_err());
        let mut c = Client::new();
        assert!(c.handle_input(&[0xff, 0xff, 0xff, 0xff, b'O']).is_err());
        let mut c = Client::new();
        assert!(c.handle_input(&reply(b'O', b"\0\0\0\x06")).is_err());
        assert!(parse_reply("250 ok").is_err());
        assert!(parse_reply("5").is_err());
        assert_eq!(
            parse_reply("554 5.7.1 Blocked\r\n").unwrap(),
            MilterVerdict::Reply { code: 554, enhanced: Some((5, 7, 1)), text: "Blocked".into() }
        );
        assert_eq!(
            parse_reply("550 nope").unwrap(),
            MilterVerdict::Reply { code: 550, enhanced: None, text: "nope".into() }
        );
    }

    /// The fuzz target's stable twin: 50,000 generated inputs.
    #[test]
    fn fuzz_replies_50k() {
        let mut s: u64 = 0x5eed_0016_0000_0001;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let pieces: [&[u8]; 12] = [
            b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\0\0\0",
            b"\0\0\0\x01c",
            b"\0\0\0\x01a",
            b"\0\0\0\x01k",
            b"\0\0\0\x0ey554 5.7.1 no\0",
            b"\0\0\0\x05hX\0y\0",
            b"\0\0\0\x0bm\0\0\0\x01Sub\0\0",
            b"\0\0\0\x04bxyz",
            b"\0\0\0\x05+<a>\0",
            b"\0\0\0\x01p",
            b"\0\0\0\x03q\0",
            b"\xff\xff\xff\xff",
        ];
        for _ in 0..50_000 {
            let mut v = vec![next() as u8, next() as u8];
            for _ in 0..(next() % 8) {
                if next() % 5 == 0 {
                    v.push(next() as u8);
                } else {
                    v.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                }
            }
            fuzz_replies(&v);
        }
    }
}
