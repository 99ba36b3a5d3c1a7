//! Sans-IO ESMTP server session engine.
//!
//! The engine never touches a socket or a clock (quinn-proto / rustls
//! style). The host (the tokio daemon, or `mailc test` replaying a
//! transcript) feeds it bytes and the current [`Time`], and takes out bytes
//! to send, events to decide and a timer deadline. Both hosts drive the same
//! code, so a transcript exercises the real protocol, line endings and
//! pipelining included.
//!
//! # Driving a session
//!
//! ```
//! use mailpolicy_engine::smtp::{Config, Decision, Event, PeerInfo, Session, Time};
//!
//! let mut s = Session::new(Config::default(), PeerInfo::default(), Time(0));
//! let mut wire = Vec::new();
//! let mut input: &[u8] = b"EHLO client.example\r\nQUIT\r\n";
//! loop {
//!     // 1. answer every event that needs it
//!     while let Some(ev) = s.poll_event() {
//!         if ev.needs_answer() {
//!             s.decide(Decision::accept(), Time(0)).unwrap();
//!         }
//!     }
//!     // 2. write what the engine produced
//!     while let Some(bytes) = s.poll_transmit() {
//!         wire.extend_from_slice(&bytes);
//!     }
//!     if s.is_closed() || input.is_empty() {
//!         break;
//!     }
//!     // 3. feed what the client sent (here: everything at once, pipelined)
//!     s.handle_input(input, Time(0));
//!     input = &[];
//! }
//! assert!(wire.starts_with(b"220 localhost ESMTP mailpolicy\r\n250-localhost Hello client.example\r\n"));
//! assert!(wire.ends_with(b"221 2.0.0 localhost closing connection\r\n"));
//! ```
//!
//! A real host loops: feed input ([`Session::handle_input`], reading at
//! most [`Session::input_room`] bytes), answer events, flush
//! [`Session::poll_transmit`], arm a timer at [`Session::poll_timeout`] and
//! call [`Session::handle_timeout`] when it fires, and close the socket when
//! [`Session::is_closed`] is true and the output is flushed. Client EOF is
//! [`Session::handle_eof`]; idle timeouts and shutdown are
//! [`Session::shutdown`] (421). Every host call that can produce a reply
//! takes `now`.
//!
//! # Events and decisions
//!
//! At each policy stage the engine emits an [`Event`] and **stops**: it
//! sends no reply and processes no further (pipelined) input, which stays
//! buffered, until the host answers. Answers:
//!
//! | event | answer | accept gives |
//! |---|---|---|
//! | [`Event::Connect`] | [`Session::decide`] | `220 <hostname> <greeting>` |
//! | [`Event::Helo`] | `decide` | `250 ...` (EHLO: extension list) |
//! | [`Event::Mail`] | `decide` | `250 2.1.0 Sender OK`, transaction opened |
//! | [`Event::Rcpt`] | `decide` | `250 2.1.5 Recipient OK`, recipient counted |
//! | [`Event::Data`] | `decide` | DATA: `354`; first BDAT: its chunk is read |
//! | [`Event::Message`] | `decide` | `250 2.0.0 Queued as <queue_id>` |
//! | [`Event::Vrfy`] / [`Event::Expn`] | `decide` | host reply (only if enabled) |
//! | [`Event::AuthStep`] | [`Session::auth_continue`] / [`Session::auth_done`] | `334 <b64>` / then [`Event::Auth`] |
//! | [`Event::Auth`] | `decide` | `235 2.7.0`, session authenticated |
//! | [`Event::StartTls`] | [`Session::tls_established`] (or close) | session reset under TLS |
//!
//! [`Event::Reset`], [`Event::AuthCancelled`], [`Event::Quit`] and
//! [`Event::Closed`] are informational ([`Event::needs_answer`] is false).
//!
//! A [`Decision`] says: accept or not (a recipient counts as accepted only
//! when accepted), an optional custom [`Reply`] (multi-line capable; host
//! text is sanitised: CR/LF/control characters cannot split or inject reply
//! lines, and every line is cut to 512 octets), close after the reply, and a
//! delay (tarpit: the reply and all further processing are held until
//! `now + delay`; see [`Session::poll_timeout`]). Rejecting without a reply
//! uses a standard 5xx. The engine knows nothing else about policy.
//! `Connect` rejected without `close` leaves the session answering `503` to
//! everything but QUIT (RFC 5321 3.1).
//!
//! For a rejected first BDAT, the chunk is still read and discarded, the
//! reply comes after it, and the transaction ends ([`Event::Reset`]). The
//! reply/delay of an *accepted* first BDAT are unused (the chunk's reply is
//! `250 2.0.0 <n> octets received`, or the `Message` decision for LAST).
//!
//! # Protocol rules the engine enforces itself
//!
//! * Command lines end in CRLF and are at most `max_command_line` (512)
//!   octets, CRLF included; `AUTH` lines and SASL responses may be 12288.
//!   Longer: `500 5.5.6`. Bare LF: `500 5.5.2`. Unknown verb: `500 5.5.2`;
//!   TURN/ETRN/...: `502 5.5.1`; HTTP verbs: `521 5.5.1` and close.
//! * Sequencing (`503 5.5.1`): MAIL before HELO/EHLO, nested MAIL, RCPT
//!   before MAIL, DATA/BDAT before MAIL, DATA after BDAT, AUTH twice, AUTH
//!   or STARTTLS inside a transaction. DATA/BDAT with no accepted
//!   recipient: `554 5.5.1 No valid recipients` (in order, with pipelining).
//!   RSET, HELO and EHLO end the transaction.
//! * Paths (RFC 5321 4.1.2): `<>` only on MAIL, `<postmaster>` only on RCPT,
//!   quoted local parts, source routes (checked, ignored). `%` and `!` are
//!   never routing: [`Mailbox::local`] keeps them. Bad path: `501 5.1.7`
//!   (MAIL) / `501 5.1.3` (RCPT); non-ASCII without SMTPUTF8: `553 5.6.7`.
//!   `MAIL FROM: <a@b>` (one space after the colon) is accepted.
//! * Parameters: SIZE (above the limit `552 5.3.4`), BODY, SMTPUTF8, RET,
//!   ENVID, AUTH on MAIL; NOTIFY, ORCPT on RCPT; xtext decoded. Malformed:
//!   `501 5.5.4`; unknown or not offered (any parameter after HELO):
//!   `555 5.5.4`. More than `max_recipients`: `452 4.5.3`.
//! * DATA: only `CRLF.CRLF` ends the data. Bare CR or LF never frames, so
//!   no SMTP smuggling sequence can split a message; a message containing
//!   any bare CR or LF is rejected after the end of data with `550 5.5.2`
//!   (the session goes on). Dot-unstuffing is exact. After the end of data:
//!   too large `552 5.3.4` (content was discarded as it came), header section
//!   over `max_header_size` `552 5.3.4`, a text line over 1000 octets
//!   `500 5.5.6`. BDAT content follows the same checks unless
//!   `BODY=BINARYMIME`. Input may be split at any byte.
//! * BDAT (RFC 3030): exact octet counts, `BDAT 0 LAST`, a chunk is always
//!   consumed even when the reply is an error; a malformed BDAT command gets
//!   `501 5.5.4` and a close (its chunk length is unknown).
//! * STARTTLS: `220 2.0.0`, then every byte already received is discarded
//!   (CVE-2011-0411); after [`Session::tls_established`] the session is as
//!   just connected, under TLS. Again under TLS: `503 5.5.1`; with
//!   arguments: `501 5.5.4`.
//! * AUTH (RFC 4954): SASL framing only; `*` cancels (`501 5.7.0`), bad
//!   base64 `501 5.5.2`, unknown mechanism `504 5.5.4`, before TLS when
//!   [`Config::auth_requires_tls`] `530 5.7.0`.
//! * Errors: every 4xx/5xx reply counts. From `soft_error_limit` on, each
//!   error reply is delayed by `error_sleep`; at `hard_error_limit` the
//!   engine adds `421 4.7.0 ... too many errors` and closes. An accepted
//!   message resets the count (Postfix: "errors without delivering mail").
//! * Greet pause: the banner is held until `connect + greet_pause` (or the
//!   Connect decision's delay, whichever is later). Any input before the
//!   banner is sent: `554 5.5.1` and close.
//! * Reply text never carries CR/LF from the host, and no line exceeds 512
//!   octets. Enhanced status codes are removed when ENHANCEDSTATUSCODES is
//!   not offered; `220` banners, EHLO/HELO and `354` replies carry none.
//!
//! Nothing here panics on peer input: parsing uses no indexing or unwrap
//! on client data, and the fuzz targets in `runtime/fuzz` check it.

mod address;
mod data;
mod params;
mod reply;
mod session;
mod time;

#[cfg(test)]
mod tests;

pub use address::{parse_forward_path, parse_reverse_path, ForwardPath, Mailbox, PathError, ReversePath};
pub use params::{decode_xtext, BodyType, MailParams, Notify, Orcpt, RcptParams, Ret};
pub use reply::{Reply, MAX_REPLY_LINE};
pub use session::{
    AuthOutcome, Config, Decision, Envelope, Event, Extensions, PeerInfo, Recipient, Session, TlsInfo, UsageError,
};
pub use time::Time;

#[doc(hidden)]
pub mod fuzzing;
