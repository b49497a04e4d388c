//! One SMTP (or LMTP) connection: the state machine over [`Codec`] and an async stream.
//!
//! Generic over the stream so TCP, Unix sockets and `tokio::io::duplex` in tests share it.
//! Replies to pipelined commands are buffered and flushed whenever the session is about
//! to wait: for input, or for the store.
//!
//! The 250 after DATA (or `BDAT ... LAST`) is written only once [`Sink::ingest`] has
//! returned `Ok`: the message is durable by then (design.md §2.1). LMTP answers once per
//! accepted recipient, all after that one ingest.
//!
//! # Extensions (docs/interfaces.md "Wire extensions", "SMTP/LMTP extensions in detail")
//! - CHUNKING and BINARYMIME everywhere: `BDAT` chunks are read exactly, appended, and
//!   `LAST` delivers. BDAT and DATA do not mix in one transaction; `BODY=BINARYMIME`
//!   needs BDAT.
//! - XCOFFER only where [`SessionConfig::trust_xcoffer`] is set: advertised as
//!   `XCOFFER NODE EPOCH` (from [`Sink::node`] and [`Sink::epoch`]), MAIL lines up to
//!   16 KiB, and the decoded value kept with the arrival. Elsewhere it is refused with 555.
//! - STARTTLS (RFC 3207) where [`SessionConfig::tls`] is set, until the session is in
//!   TLS. After `220 2.0.0 Ready to start TLS` whatever the client pipelined behind the
//!   command is dropped unread (it came in the clear, so it may be an attacker's
//!   injection: CVE-2011-0411), the handshake runs, and a new session starts over the TLS
//!   stream with the same codec rules and limits: no greeting, nothing remembered (EHLO
//!   again). With [`SessionConfig::tls_required`], MAIL before STARTTLS gets
//!   `530 5.7.0 Must issue a STARTTLS command first`. The TLS facts (version, cipher,
//!   client certificate) go with every arrival of the TLS session.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use coffer_proto::{TlsInfo, Xcoffer};

use super::codec::{
    Codec, Command, CommandError, Event, Limits, MailFrom, RcptTo, MAX_LINE, MAX_XCOFFER_MAIL_LINE,
};
use super::Sink;
use crate::config::{ListenerConfig, Protocol};
use crate::envelope::{Envelope, SessionInfo};
use crate::store::{Incoming, IngestError};

/// Bad commands (syntax, sequence, unknown) tolerated in one session before it is closed
/// with 421: a client that far off is broken or probing.
pub const MAX_BAD_COMMANDS: u32 = 20;

/// Read buffer per session, in bytes. Bounds what one read hands to the codec.
const READ_BUF: usize = 64 * 1024;

/// Buffered replies beyond this many bytes are flushed even in the middle of a pipeline,
/// so a client that sends without reading cannot grow our buffer.
const MAX_PENDING_REPLIES: usize = 16 * 1024;

/// What a session needs to know about its listener. Built once per listener (and again
/// on reload); sessions share it.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// The listener's name, recorded with each arrival.
    pub listener: String,
    pub protocol: Protocol,
    /// Our name in the greeting and the EHLO reply.
    pub hostname: String,
    /// Largest message accepted, in bytes (after dot-unstuffing).
    pub max_message_size: u64,
    /// Most recipients accepted in one transaction.
    pub max_recipients: usize,
    /// How long to wait for the client (to send, or to read our replies).
    pub idle_timeout: Duration,
    /// Advertise XCOFFER, accept `XCOFFER=` on MAIL (and MAIL lines up to 16 KiB). Only for
    /// the milter's LMTP socket and HA listeners: an XCOFFER client can set arrival ids
    /// and traces.
    pub trust_xcoffer: bool,
    /// STARTTLS is offered with this server configuration (TCP listeners with `tls`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `tls.required`: no MAIL before STARTTLS.
    pub tls_required: bool,
}

impl SessionConfig {
    /// The session settings of `config`; `tls` is its loaded TLS configuration (ignored on
    /// Unix sockets).
    pub fn from_listener(
        config: &ListenerConfig,
        hostname: &str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let tcp = matches!(config.bind, crate::config::BindAddr::Tcp(_));
        let tls = tls.filter(|_| tcp && config.tls.is_some());
        Self {
            listener: config.name.clone(),
            protocol: config.protocol.clone(),
            hostname: hostname.to_owned(),
            max_message_size: config.max_message_size,
            max_recipients: config.max_recipients,
            idle_timeout: config.idle_timeout,
            trust_xcoffer: config.trust_xcoffer,
            tls_required: tls.is_some() && config.tls.as_ref().is_some_and(|t| t.required),
            tls,
        }
    }

    /// The codec's line caps: MAIL lines may carry XCOFFER where it is trusted.
    fn limits(&self) -> Limits {
        Limits {
            max_line: MAX_LINE,
            max_mail_line: if self.trust_xcoffer {
                MAX_XCOFFER_MAIL_LINE
            } else {
                MAX_LINE
            },
        }
    }
}

/// Serves one connection until the client quits, an error or timeout closes it, or
/// shutdown is signalled.
///
/// `client_addr` is recorded with each arrival: `IP:PORT`, or `unix`.
///
/// # Shutdown
/// When `shutdown` turns true (or its sender is dropped), a session waiting for a
/// command answers `421 4.3.2` and closes; a session receiving DATA finishes the
/// message (the sink answers) first, then closes the same way.
///
/// # STARTTLS
/// Where `config.tls` is set, a client may switch to TLS ([module docs](self)). A failed
/// or timed-out handshake ends the session (logged); nothing more is said in the clear.
///
/// # Errors
/// I/O errors on the stream. Protocol errors are answered on the wire, not returned.
pub async fn serve<S>(
    stream: S,
    config: Arc<SessionConfig>,
    client_addr: String,
    sink: Arc<dyn Sink>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session::new(stream, config.clone(), client_addr.clone(), sink.clone());
    let kind = match config.protocol {
        Protocol::Smtp => "ESMTP",
        Protocol::Lmtp => "LMTP",
    };
    let greeting = format!("220 {} {kind} Coffer", config.hostname);
    session.reply(&greeting);
    if session.run(shutdown.clone()).await? == End::Closed {
        return Ok(());
    }
    let Some(tls) = config.tls.clone() else {
        return Ok(()); // STARTTLS is only accepted where it is offered
    };
    let bad_commands = session.bad_commands;
    let stream = session.io;
    let handshake = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
    let handshake = tokio::time::timeout(config.idle_timeout, handshake);
    let mut stop = shutdown.clone();
    let handshake = tokio::select! {
        done = handshake => done,
        _ = stop.wait_for(|stop| *stop) => return Ok(()), // shutting down: nothing to finish
    };
    let stream = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(listener = %config.listener, client = %client_addr, error = %e,
                "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            tracing::info!(listener = %config.listener, client = %client_addr,
                "TLS handshake timed out");
            return Ok(());
        }
    };
    let info = crate::tls::session_info(stream.get_ref().1);
    tracing::debug!(listener = %config.listener, client = %client_addr,
        version = info.version.as_deref().unwrap_or("-"),
        cipher = info.cipher.as_deref().unwrap_or("-"),
        peer = info.peer_subject.as_deref().unwrap_or("-"), "TLS established");
    let mut session = Session::new(stream, config, client_addr, sink);
    session.tls = Some(info);
    session.bad_commands = bad_commands;
    session.run(shutdown).await?;
    // close_notify, so the client sees a clean end (bounded: it may not read).
    let _ = tokio::time::timeout(Duration::from_secs(5), session.io.shutdown()).await;
    Ok(())
}

/// Whether the session goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
    /// `220 Ready to start TLS` was queued: flush it, drop the rest of the input, hand
    /// the stream over to the handshake.
    StartTls,
}

/// How [`Session::run`] ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Closed,
    StartTls,
}

struct Session<S> {
    io: S,
    codec: Codec,
    config: Arc<SessionConfig>,
    client_addr: String,
    sink: Arc<dyn Sink>,
    /// Replies not yet written.
    out: Vec<u8>,
    /// The raw HELO/EHLO/LHLO argument, once greeted.
    helo: Option<String>,
    /// `SMTP`, `ESMTP` or `LMTP`, as negotiated by the greeting command.
    protocol: Option<&'static str>,
    /// The open transaction, from MAIL to the end of DATA (or BDAT LAST).
    tx: Option<Transaction>,
    /// What to do with the BDAT chunk the codec is reading.
    chunk: Option<ChunkPlan>,
    bad_commands: u32,
    /// Set once the session runs over TLS: what the handshake established.
    tls: Option<TlsInfo>,
}

/// One mail transaction, from MAIL on.
struct Transaction {
    envelope: Envelope,
    /// The decoded `XCOFFER=` value (trusted listeners only).
    xcoffer: Option<Xcoffer>,
    /// `BODY=BINARYMIME` was declared: the content may only come by BDAT.
    binarymime: bool,
    /// The content received by BDAT so far; `None` until the first chunk (and while the
    /// codec holds it to append a chunk).
    chunks: Option<Vec<u8>>,
    /// Whether a BDAT chunk was taken: DATA is then out of sequence.
    chunking: bool,
}

/// What happens to a BDAT chunk once the codec has read it.
#[derive(Debug)]
enum ChunkPlan {
    /// Appended to the transaction (the codec appends it); `last` delivers the message.
    Append { size: u64, last: bool },
    /// Dropped, then refused with this reply (a sequence error).
    Refuse(&'static str),
    /// Dropped: the message would be `total` bytes, over the limit. 552, and the
    /// transaction ends.
    TooBig { total: u64, last: bool },
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn new(io: S, config: Arc<SessionConfig>, client_addr: String, sink: Arc<dyn Sink>) -> Self {
        let mut codec = Codec::new(config.limits());
        if let Some(budget) = sink.budget() {
            codec.set_budget(budget);
        }
        Session {
            io,
            codec,
            config,
            client_addr,
            sink,
            out: Vec::with_capacity(512),
            helo: None,
            protocol: None,
            tx: None,
            chunk: None,
            bad_commands: 0,
            tls: None,
        }
    }

    /// Serves commands until the session closes, or STARTTLS hands the stream over.
    async fn run(&mut self, mut shutdown: watch::Receiver<bool>) -> io::Result<End> {
        let mut stopping = *shutdown.borrow();
        let mut buf = vec![0u8; READ_BUF];
        let (mut pos, mut end) = (0, 0);
        loop {
            // Handle everything already read, in order (PIPELINING).
            loop {
                let (n, event) = self.codec.decode(&buf[pos..end]);
                pos += n;
                let flow = match event {
                    Event::NeedMore => break,
                    Event::Command(cmd) => self.command(cmd),
                    Event::Message(bytes) => self.deliver(bytes).await?,
                    Event::TooBig { size } => self.too_big(size),
                    Event::OverBudget { size } => self.over_budget(size),
                    Event::Chunk(bytes) => self.chunk_read(bytes).await?,
                };
                match flow {
                    Flow::Continue => {}
                    Flow::Close => return self.flush().await.map(|()| End::Closed),
                    Flow::StartTls => {
                        self.flush().await?;
                        if pos < end {
                            // Sent in the clear behind STARTTLS: never taken as commands.
                            tracing::info!(listener = %self.config.listener,
                                client = %self.client_addr, bytes = end - pos,
                                "dropped input pipelined after STARTTLS");
                        }
                        return Ok(End::StartTls);
                    }
                }
                if self.out.len() > MAX_PENDING_REPLIES {
                    self.flush().await?;
                }
            }
            self.flush().await?;
            if stopping && !self.codec.in_data() {
                return self.close_shutting_down().await.map(|()| End::Closed);
            }
            let in_data = self.codec.in_data();
            tokio::select! {
                read = self.io.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        if in_data {
                            tracing::info!(listener = %self.config.listener,
                                client = %self.client_addr,
                                "client closed during message content; nothing stored");
                        }
                        return Ok(End::Closed);
                    }
                    (pos, end) = (0, n);
                }
                changed = shutdown.changed(), if !stopping && !in_data => {
                    stopping = changed.is_err() || *shutdown.borrow();
                }
                () = tokio::time::sleep(self.config.idle_timeout) => {
                    tracing::info!(listener = %self.config.listener,
                        client = %self.client_addr, "idle timeout");
                    let line = format!("421 4.4.2 {} idle timeout", self.config.hostname);
                    self.reply(&line);
                    return self.flush().await.map(|()| End::Closed);
                }
            }
        }
    }

    async fn close_shutting_down(&mut self) -> io::Result<()> {
        let line = format!("421 4.3.2 {} shutting down", self.config.hostname);
        self.reply(&line);
        self.flush().await
    }

    fn reply(&mut self, line: &str) {
        self.out.extend_from_slice(line.as_bytes());
        self.out.extend_from_slice(b"\r\n");
    }

    /// Writes the buffered replies; a client that does not read them within the idle
    /// timeout is dropped.
    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        };
        match tokio::time::timeout(self.config.idle_timeout, write).await {
            Ok(result) => {
                self.out.clear();
                result
            }
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client did not read our replies",
            )),
        }
    }

    /// Answers a refused command and counts it; too many close the session.
    fn bad(&mut self, line: &str) -> Flow {
        self.reply(line);
        self.bad_commands += 1;
        if self.bad_commands >= MAX_BAD_COMMANDS {
            tracing::info!(listener = %self.config.listener, client = %self.client_addr,
                "too many bad commands");
            let line = format!("421 4.7.0 {} too many errors", self.config.hostname);
            self.reply(&line);
            return Flow::Close;
        }
        Flow::Continue
    }

    fn command(&mut self, cmd: Result<Command, CommandError>) -> Flow {
        let cmd = match cmd {
            Ok(cmd) => cmd,
            Err(e) => {
                let line = match e {
                    CommandError::LineTooLong => "500 5.5.6 Line too long".to_owned(),
                    CommandError::Unknown => "500 5.5.1 Unrecognized command".to_owned(),
                    CommandError::Syntax(s) => format!("501 5.5.4 Syntax: {s}"),
                    CommandError::BadSender => "501 5.1.7 Bad sender address syntax".to_owned(),
                    CommandError::BadRecipient => {
                        "501 5.1.3 Bad recipient address syntax".to_owned()
                    }
                    CommandError::InvalidParam(p) => format!("501 5.5.4 Invalid value for {p}"),
                    CommandError::BadBytes(what) => {
                        format!("501 5.5.2 Syntax error: {what} in command line")
                    }
                    CommandError::UnsupportedParam(p) => {
                        format!("555 5.5.4 Unsupported parameter {p}")
                    }
                    CommandError::BadBdat => {
                        // The chunk's length is unknown: whatever follows cannot be told
                        // from commands, so the session ends here.
                        tracing::info!(listener = %self.config.listener,
                            client = %self.client_addr, "BDAT without a readable size");
                        self.end_tx();
                        self.reply("501 5.5.4 Syntax: BDAT chunk-size [LAST]");
                        let line = format!(
                            "421 4.7.0 {} closing: lost track of BDAT",
                            self.config.hostname
                        );
                        self.reply(&line);
                        return Flow::Close;
                    }
                };
                return self.bad(&line);
            }
        };
        let lmtp = self.config.protocol == Protocol::Lmtp;
        match cmd {
            Command::Helo(_) | Command::Ehlo(_) if lmtp => {
                self.bad("500 5.5.1 Unrecognized command (this is LMTP: use LHLO)")
            }
            Command::Lhlo(_) if !lmtp => self.bad("500 5.5.1 Unrecognized command"),
            Command::Helo(name) => {
                self.greeted(name, "SMTP");
                let line = format!("250 {}", self.config.hostname);
                self.reply(&line);
                Flow::Continue
            }
            Command::Ehlo(name) | Command::Lhlo(name) => {
                self.greeted(name, if lmtp { "LMTP" } else { "ESMTP" });
                self.ehlo_reply();
                Flow::Continue
            }
            Command::Mail(mail) => self.mail(mail),
            Command::Rcpt(rcpt) => self.rcpt(rcpt),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.end_tx();
                self.reply("250 2.0.0 Ok");
                Flow::Continue
            }
            Command::Noop => {
                self.reply("250 2.0.0 Ok");
                Flow::Continue
            }
            Command::Quit => {
                self.reply("221 2.0.0 Bye");
                Flow::Close
            }
            Command::Vrfy => {
                self.reply("252 2.5.0 Cannot VRFY user, but will accept message");
                Flow::Continue
            }
            Command::Help => {
                self.reply("214 2.0.0 Coffer archive: see RFC 5321");
                Flow::Continue
            }
            Command::StartTls => self.starttls(),
            Command::NotImplemented(name) => {
                let line = format!("502 5.5.1 {name} not implemented");
                self.bad(&line)
            }
        }
    }

    /// `STARTTLS`: where offered and not yet in TLS, `220` and the switch (the session
    /// state is dropped with the plain-text session).
    fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            return self.bad("503 5.5.1 TLS already active");
        }
        if self.config.tls.is_none() {
            return self.bad("502 5.5.1 STARTTLS not offered");
        }
        self.reply("220 2.0.0 Ready to start TLS");
        Flow::StartTls
    }

    fn greeted(&mut self, name: String, protocol: &'static str) {
        self.helo = Some(name);
        self.protocol = Some(protocol);
        self.end_tx();
    }

    /// The EHLO/LHLO capability list; XCOFFER only where it is trusted.
    fn ehlo_reply(&mut self) {
        let size = format!("SIZE {}", self.config.max_message_size);
        let mut caps = vec![
            "PIPELINING".to_owned(),
            size,
            "8BITMIME".to_owned(),
            "BINARYMIME".to_owned(),
            "CHUNKING".to_owned(),
            "SMTPUTF8".to_owned(),
        ];
        if self.config.tls.is_some() && self.tls.is_none() {
            caps.push("STARTTLS".to_owned());
        }
        caps.push("ENHANCEDSTATUSCODES".to_owned());
        if self.config.trust_xcoffer {
            caps.push(format!(
                "XCOFFER {} {}",
                self.sink.node(),
                self.sink.epoch()
            ));
        }
        let first = format!("250-{}", self.config.hostname);
        self.reply(&first);
        for (i, cap) in caps.iter().enumerate() {
            let sep = if i + 1 == caps.len() { ' ' } else { '-' };
            let line = format!("250{sep}{cap}");
            self.reply(&line);
        }
    }

    fn mail(&mut self, mail: MailFrom) -> Flow {
        if self.helo.is_none() {
            return self.bad("503 5.5.1 Send EHLO first");
        }
        if self.config.tls_required && self.tls.is_none() {
            return self.bad("530 5.7.0 Must issue a STARTTLS command first");
        }
        if self.tx.is_some() {
            return self.bad("503 5.5.1 Nested MAIL command");
        }
        if mail.xcoffer.is_some() && !self.config.trust_xcoffer {
            // Not advertised here: nobody outside may set arrival ids or traces.
            return self.bad("555 5.5.4 XCOFFER not accepted here");
        }
        if self.protocol == Some("SMTP") && (!mail.params.is_empty() || mail.xcoffer.is_some()) {
            return self.bad("555 5.5.4 MAIL parameters need EHLO");
        }
        let xcoffer = match mail.xcoffer.as_deref().map(coffer_proto::decode) {
            None => None,
            Some(Ok(x)) => Some(x),
            Some(Err(e)) => {
                tracing::info!(listener = %self.config.listener, client = %self.client_addr,
                    error = %e, "invalid XCOFFER");
                let line = format!("501 5.5.4 Invalid XCOFFER: {}", reply_text(&e.to_string()));
                return self.bad(&line);
            }
        };
        if mail.size.is_some_and(|s| s > self.config.max_message_size) {
            self.reply("552 5.3.4 Message size exceeds fixed limit");
            return Flow::Continue;
        }
        self.tx = Some(Transaction {
            envelope: Envelope {
                mail_from: mail.address,
                mail_params: mail.params,
                rcpt_to: Vec::new(),
            },
            xcoffer,
            binarymime: mail.body.as_deref() == Some("BINARYMIME"),
            chunks: None,
            chunking: false,
        });
        self.reply("250 2.1.0 Ok");
        Flow::Continue
    }

    fn rcpt(&mut self, rcpt: RcptTo) -> Flow {
        let max = self.config.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return self.bad("503 5.5.1 Need MAIL command");
        };
        if tx.envelope.rcpt_to.len() >= max {
            self.reply("452 4.5.3 Too many recipients");
            return Flow::Continue;
        }
        tx.envelope.rcpt_to.push(rcpt.address);
        self.reply("250 2.1.5 Ok");
        Flow::Continue
    }

    fn data(&mut self) -> Flow {
        match &self.tx {
            None => self.bad("503 5.5.1 Need MAIL command"),
            Some(tx) if tx.envelope.rcpt_to.is_empty() => self.bad("503 5.5.1 Need RCPT command"),
            Some(tx) if tx.chunking => self.bad("503 5.5.1 DATA not allowed after BDAT"),
            Some(tx) if tx.binarymime => self.bad("503 5.5.1 BODY=BINARYMIME needs BDAT, not DATA"),
            Some(_) => {
                self.reply("354 End data with <CR><LF>.<CR><LF>");
                self.codec.start_data(self.config.max_message_size);
                Flow::Continue
            }
        }
    }

    /// One reply for the whole message (SMTP), or one per recipient (LMTP).
    fn reply_per_recipient(&mut self, line: &str, recipients: usize) {
        let n = if self.config.protocol == Protocol::Lmtp {
            recipients
        } else {
            1
        };
        for _ in 0..n {
            self.reply(line);
        }
    }

    /// `BDAT size [LAST]`: decides what becomes of the chunk, then lets the codec read it.
    /// Every declared byte is read, whatever the decision (RFC 3030): the reply comes
    /// once the chunk is in ([`Session::chunk_read`]).
    fn bdat(&mut self, size: u64, last: bool) -> Flow {
        let max = self.config.max_message_size;
        let (plan, into) = match self.tx.as_mut() {
            None => (ChunkPlan::Refuse("503 5.5.1 Need MAIL command"), None),
            Some(tx) if tx.envelope.rcpt_to.is_empty() => {
                (ChunkPlan::Refuse("503 5.5.1 Need RCPT command"), None)
            }
            Some(tx) => {
                tx.chunking = true;
                let so_far = tx.chunks.as_ref().map_or(0, Vec::len) as u64;
                let total = so_far.saturating_add(size);
                if total > max {
                    tx.chunks = None;
                    (ChunkPlan::TooBig { total, last }, None)
                } else {
                    let buf = tx.chunks.take().unwrap_or_default();
                    (ChunkPlan::Append { size, last }, Some(buf))
                }
            }
        };
        self.chunk = Some(plan);
        self.codec.start_chunk(size, into);
        Flow::Continue
    }

    /// A BDAT chunk has been read (`bytes` is the message so far, when it was kept).
    async fn chunk_read(&mut self, bytes: Option<Vec<u8>>) -> io::Result<Flow> {
        let Some(plan) = self.chunk.take() else {
            return Ok(Flow::Continue);
        };
        Ok(match (plan, bytes) {
            (ChunkPlan::Append { last: true, .. }, Some(bytes)) => self.deliver(bytes).await?,
            (ChunkPlan::Append { size, last: false }, Some(bytes)) => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.chunks = Some(bytes);
                }
                let line = format!("250 2.0.0 Ok: {size} octets received");
                self.reply(&line);
                Flow::Continue
            }
            (ChunkPlan::Refuse(line), _) => self.bad(line),
            (ChunkPlan::TooBig { total, last }, _) => {
                let recipients = self.end_tx().map_or(0, |tx| tx.envelope.rcpt_to.len());
                tracing::info!(listener = %self.config.listener, client = %self.client_addr,
                    size = total, max = self.config.max_message_size,
                    "BDAT message over the size limit");
                let line = "552 5.3.4 Message size exceeds fixed limit";
                if last {
                    self.reply_per_recipient(line, recipients);
                } else {
                    self.reply(line);
                }
                Flow::Continue
            }
            (ChunkPlan::Append { size, last }, None) => {
                // The memory budget could not hold the chunk: it was read and dropped.
                let so_far = self
                    .tx
                    .as_ref()
                    .and_then(|tx| tx.chunks.as_ref())
                    .map_or(0, Vec::len) as u64;
                self.refuse_over_budget(so_far + size, last)
            }
        })
    }

    /// Ends the transaction, and gives back the memory budget its content held.
    fn end_tx(&mut self) -> Option<Transaction> {
        self.codec.release_budget();
        self.tx.take()
    }

    /// DATA content the memory budget could not hold (`max_pending`): read, dropped, and
    /// answered 451 like a busy store, so the client retries.
    fn over_budget(&mut self, size: u64) -> Flow {
        self.refuse_over_budget(size, true)
    }

    fn refuse_over_budget(&mut self, size: u64, last: bool) -> Flow {
        let recipients = self.end_tx().map_or(0, |tx| tx.envelope.rcpt_to.len());
        tracing::warn!(listener = %self.config.listener, client = %self.client_addr,
            size, "message not stored: max_pending reached while receiving; client told to retry");
        self.sink.refused(&self.config.listener, &IngestError::Busy);
        let line = "451 4.3.2 Archive busy, try again later";
        if last {
            self.reply_per_recipient(line, recipients);
        } else {
            self.reply(line);
        }
        Flow::Continue
    }

    fn too_big(&mut self, size: u64) -> Flow {
        let recipients = self.end_tx().map_or(0, |tx| tx.envelope.rcpt_to.len());
        tracing::info!(listener = %self.config.listener, client = %self.client_addr,
            size, max = self.config.max_message_size, "message over the size limit");
        self.reply_per_recipient("552 5.3.4 Message size exceeds fixed limit", recipients);
        Flow::Continue
    }

    async fn deliver(&mut self, bytes: Vec<u8>) -> io::Result<Flow> {
        let Some(tx) = self.tx.take() else {
            // DATA and BDAT only deliver with an open transaction.
            return Ok(Flow::Continue);
        };
        let recipients = tx.envelope.rcpt_to.len();
        let incoming = Incoming {
            bytes,
            envelope: tx.envelope,
            session: SessionInfo {
                listener: self.config.listener.clone(),
                protocol: self.protocol.unwrap_or("SMTP").to_owned(),
                client_addr: Some(self.client_addr.clone()),
                helo: self.helo.clone(),
                queue_id: tx.xcoffer.as_ref().and_then(|x| x.queue_id.clone()),
                xcoffer: tx.xcoffer,
                tls: self.tls.clone(),
            },
        };
        // Replies still pending here answer commands the client pipelined with this
        // message (its MAIL and RCPT before a `BDAT LAST`): it reads them with the answer
        // to the message, so they go out together, in one write, once the store answers.
        // (A 354 was written before the content could come; a client that does not
        // pipeline has nothing pending.)
        let result = self.sink.ingest(incoming).await;
        // The content is gone (stored or refused): its memory budget is free again.
        self.codec.release_budget();
        let line = match result {
            Ok(receipt) => {
                tracing::debug!(listener = %self.config.listener, client = %self.client_addr,
                    arrival = %receipt.arrival_id, message = %receipt.message_id,
                    repeat = receipt.repeat, "message stored");
                format!(
                    "250 2.0.0 Ok: {} {}",
                    receipt.arrival_id, receipt.message_id
                )
            }
            Err(IngestError::ShuttingDown) => {
                self.close_shutting_down().await?;
                return Ok(Flow::Close);
            }
            Err(e) => {
                tracing::warn!(listener = %self.config.listener, client = %self.client_addr,
                    error = %e, "message not stored; client told to retry");
                match e {
                    IngestError::Busy => "451 4.3.2 Archive busy, try again later".to_owned(),
                    IngestError::DiskFull => "452 4.3.1 Insufficient archive storage".to_owned(),
                    _ => "451 4.3.0 Archive unavailable, try again later".to_owned(),
                }
            }
        };
        self.reply_per_recipient(&line, recipients);
        Ok(Flow::Continue)
    }
}

/// Client-supplied text made safe for a reply line: printable ASCII only, at most 200
/// characters.
fn reply_text(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect();
    if s.chars().count() > 200 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream, ReadHalf, WriteHalf};
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::ids::{ArrivalId, MessageId};
    use crate::store::Receipt;

    /// Records what it is given; can be told to fail, or to wait for a signal.
    #[derive(Default)]
    pub(crate) struct FakeSink {
        pub got: Mutex<Vec<Incoming>>,
        pub fail: Mutex<Option<fn() -> IngestError>>,
        pub gate: Mutex<Option<oneshot::Receiver<()>>>,
        pub budget: Option<Arc<crate::smtp::Budget>>,
        pub refusals: Mutex<u32>,
    }

    impl Sink for FakeSink {
        fn ingest(
            &self,
            msg: Incoming,
        ) -> std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<crate::store::Receipt, IngestError>>
                    + Send
                    + '_,
            >,
        > {
            Box::pin(async move {
                let gate = self.gate.lock().unwrap().take();
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                if let Some(fail) = *self.fail.lock().unwrap() {
                    return Err(fail());
                }
                let mut got = self.got.lock().unwrap();
                let receipt = Receipt {
                    message_id: MessageId::of(&msg.bytes),
                    arrival_id: ArrivalId {
                        node: "test".into(),
                        epoch: "0badf00d".into(),
                        seq: got.len() as u64 + 1,
                    },
                    repeat: false,
                };
                got.push(msg);
                Ok(receipt)
            })
        }

        fn node(&self) -> &str {
            "archive-a"
        }

        fn budget(&self) -> Option<Arc<crate::smtp::Budget>> {
            self.budget.clone()
        }

        fn refused(&self, _listener: &str, _error: &IngestError) {
            *self.refusals.lock().unwrap() += 1;
        }

        fn epoch(&self) -> &str {
            "0badf00d-1111-4222-8333-444455556666"
        }
    }

    pub(crate) fn config() -> SessionConfig {
        SessionConfig {
            listener: "journal".into(),
            protocol: Protocol::Smtp,
            hostname: "mx.test".into(),
            max_message_size: 100,
            max_recipients: 3,
            idle_timeout: Duration::from_secs(10),
            trust_xcoffer: false,
            tls: None,
            tls_required: false,
        }
    }

    /// The client end of a session over `tokio::io::duplex`.
    pub(crate) struct Client<R> {
        pub reader: BufReader<R>,
        pub writer: Box<dyn AsyncWrite + Unpin + Send>,
    }

    impl<R: AsyncRead + Unpin> Client<R> {
        pub async fn send(&mut self, s: &str) {
            self.send_bytes(s.as_bytes()).await;
        }

        pub async fn send_bytes(&mut self, b: &[u8]) {
            self.writer.write_all(b).await.unwrap();
            self.writer.flush().await.unwrap();
        }

        /// Reads one (possibly multi-line) reply; empty at EOF.
        pub async fn reply(&mut self) -> String {
            let mut all = String::new();
            loop {
                let mut line = String::new();
                let n =
                    tokio::time::timeout(Duration::from_secs(20), self.reader.read_line(&mut line))
                        .await
                        .expect("reply in time")
                        .unwrap();
                all.push_str(&line);
                if n == 0 || line.as_bytes().get(3) != Some(&b'-') {
                    return all;
                }
            }
        }

        /// Reads one reply and checks its start.
        pub async fn expect(&mut self, prefix: &str) -> String {
            let r = self.reply().await;
            assert!(r.starts_with(prefix), "want {prefix:?}, got {r:?}");
            r
        }

        /// Sends `line` and CRLF, then reads one reply and checks its start.
        pub async fn cmd(&mut self, line: &str, prefix: &str) -> String {
            self.send(&format!("{line}\r\n")).await;
            self.expect(prefix).await
        }
    }

    struct Harness {
        client: Client<ReadHalf<DuplexStream>>,
        sink: Arc<FakeSink>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<io::Result<()>>,
    }

    fn start(config: SessionConfig, sink: Arc<FakeSink>) -> Harness {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (tx, rx) = watch::channel(false);
        let dyn_sink: Arc<dyn Sink> = sink.clone();
        let task = tokio::spawn(serve(
            server,
            Arc::new(config),
            "192.0.2.1:40000".into(),
            dyn_sink,
            rx,
        ));
        let (r, w): (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) = tokio::io::split(client);
        Harness {
            client: Client {
                reader: BufReader::new(r),
                writer: Box::new(w),
            },
            sink,
            shutdown: tx,
            task,
        }
    }

    async fn greeted(config: SessionConfig) -> Harness {
        let mut h = start(config, Arc::default());
        h.client.expect("220 mx.test ESMTP Coffer").await;
        h.client.cmd("EHLO client.test", "250-mx.test").await;
        h
    }

    #[tokio::test]
    async fn full_transaction() {
        let mut h = start(config(), Arc::default());
        let c = &mut h.client;
        c.expect("220 mx.test ESMTP Coffer\r\n").await;
        let ehlo = c.cmd("EHLO  client.test", "250-mx.test\r\n").await;
        assert_eq!(
            ehlo,
            "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 100\r\n250-8BITMIME\r\n\
             250-BINARYMIME\r\n250-CHUNKING\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
        );
        c.cmd("MAIL FROM:<a@b.test> BODY=8BITMIME", "250 2.1.0")
            .await;
        c.cmd("RCPT TO:<c@d.test>", "250 2.1.5").await;
        c.cmd("DATA", "354 ").await;
        c.send_bytes(b"Subject: x\r\n\r\n..dot\nbare\r\n.\r\n")
            .await;
        let want_bytes = b"Subject: x\r\n\r\n.dot\nbare\r\n";
        let ok = c.reply().await;
        assert_eq!(
            ok,
            format!(
                "250 2.0.0 Ok: test/0badf00d/1 {}\r\n",
                MessageId::of(want_bytes)
            )
        );
        c.cmd("QUIT", "221 ").await;
        assert_eq!(c.reply().await, "", "closed after QUIT");
        h.task.await.unwrap().unwrap();
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].bytes, want_bytes);
        assert_eq!(
            got[0].envelope,
            Envelope {
                mail_from: "a@b.test".into(),
                mail_params: vec!["BODY=8BITMIME".into()],
                rcpt_to: vec!["c@d.test".into()],
            }
        );
        assert_eq!(
            got[0].session,
            SessionInfo {
                listener: "journal".into(),
                protocol: "ESMTP".into(),
                client_addr: Some("192.0.2.1:40000".into()),
                helo: Some("client.test".into()),
                queue_id: None,
                xcoffer: None,
                tls: None,
            }
        );
    }

    #[tokio::test]
    async fn pipelined_transaction_then_null_sender() {
        let mut h = greeted(config()).await;
        let c = &mut h.client;
        c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nRCPT TO:<z@y.test>\r\nDATA\r\n")
            .await;
        for want in ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 "] {
            c.expect(want).await;
        }
        c.send("hello\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n.\r\nQUIT\r\n")
            .await;
        for want in [
            "250 2.0.0 Ok: test/0badf00d/1 ",
            "250 2.1.0",
            "250 2.1.5",
            "354 ",
        ] {
            c.expect(want).await;
        }
        c.expect("250 2.0.0 Ok: test/0badf00d/2 ").await;
        c.expect("221 ").await;
        h.task.await.unwrap().unwrap();
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got[0].envelope.rcpt_to, ["x@y.test", "z@y.test"]);
        assert_eq!(got[1].envelope.mail_from, "");
        assert_eq!(got[1].bytes, b"");
    }

    #[tokio::test]
    async fn replies_table() {
        let mut h = start(config(), Arc::default());
        h.client.expect("220 ").await;
        let long = format!("NOOP {}", "x".repeat(5000));
        let cases: &[(&str, &str)] = &[
            ("MAIL FROM:<a@b.test>", "503 5.5.1"),
            ("RCPT TO:<a@b.test>", "503 5.5.1"),
            ("DATA", "503 5.5.1"),
            ("LHLO x", "500 5.5.1"),
            ("EHLO client.test", "250-"),
            ("RCPT TO:<a@b.test>", "503 5.5.1"),
            ("DATA", "503 5.5.1"),
            ("MAIL FROM:<a@b.test> FOO=1", "555 5.5.4"),
            ("MAIL FROM:<a@b.test> XCOFFER=abc", "555 5.5.4"),
            ("MAIL FROM:<a@b.test> BODY=BINARYMIME", "250 2.1.0"),
            ("RSET", "250 2.0.0"),
            ("MAIL FROM:<a@b.test> SIZE=x", "501 5.5.4"),
            ("MAIL FROM:<a@b.test> SIZE=101", "552 5.3.4"),
            ("MAIL FROM:a@b.test", "501 5.5.4"),
            ("MAIL FROM:<not valid>", "501 5.1.7"),
            ("MAIL FROM:<a@b.test> SIZE=100", "250 2.1.0"),
            ("DATA", "503 5.5.1"),
            ("MAIL FROM:<a@b.test>", "503 5.5.1"),
            ("RCPT TO:<>", "501 5.1.3"),
            ("RCPT TO:<c@d.test> NOTIFY=NEVER", "555 5.5.4"),
            ("RSET", "250 2.0.0"),
            ("--", "fresh session"),
            ("EHLO client.test", "250-"),
            ("RCPT TO:<a@b.test>", "503 5.5.1"),
            ("NOOP", "250 2.0.0"),
            ("VRFY bob", "252 "),
            ("HELP", "214 "),
            ("STARTTLS", "502 5.5.1"),
            ("EXPN list", "502 5.5.1"),
            // The chunk is read (4 bytes: "xy" and the CRLF cmd() adds), then refused.
            ("BDAT 4 LAST\r\nxy", "503 5.5.1"),
            ("WHAT", "500 5.5.1"),
            (long.as_str(), "500 5.5.6"),
            ("HELO other.test", "250 mx.test"),
            ("MAIL FROM:<a@b.test> SIZE=10", "555 5.5.4"),
            ("MAIL FROM:<a@b.test>", "250 2.1.0"),
            ("QUIT", "221 "),
        ];
        for (line, want) in cases {
            if *line == "--" {
                // Keep under MAX_BAD_COMMANDS.
                h.client.cmd("QUIT", "221 ").await;
                h = start(config(), Arc::default());
                h.client.expect("220 ").await;
                continue;
            }
            h.client.cmd(line, want).await;
        }
        h.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn recipient_limit() {
        let mut h = greeted(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        for i in 0..3 {
            c.cmd(&format!("RCPT TO:<r{i}@b.test>"), "250 2.1.5").await;
        }
        c.cmd("RCPT TO:<r3@b.test>", "452 4.5.3 Too many recipients")
            .await;
        c.cmd("DATA", "354 ").await;
        c.send(".\r\n").await;
        c.expect("250 2.0.0").await;
        assert_eq!(h.sink.got.lock().unwrap()[0].envelope.rcpt_to.len(), 3);
    }

    #[tokio::test]
    async fn message_over_the_limit_gets_552_and_the_session_goes_on() {
        let mut h = greeted(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        let big = format!("{}\r\n.\r\n", "y".repeat(1000));
        c.send(&big).await;
        c.expect("552 5.3.4").await;
        c.cmd("RCPT TO:<c@d.test>", "503 ").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("small\r\n.\r\n").await;
        c.expect("250 2.0.0").await;
        assert_eq!(h.sink.got.lock().unwrap().len(), 1);
    }

    async fn transaction(c: &mut Client<ReadHalf<DuplexStream>>) {
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("hi\r\n.\r\n").await;
    }

    #[tokio::test]
    async fn sink_errors_become_temporary_failures() {
        type MakeError = fn() -> IngestError;
        let cases: &[(MakeError, &str)] = &[
            (|| IngestError::Busy, "451 4.3.2 "),
            (|| IngestError::DiskFull, "452 4.3.1 "),
            (
                || IngestError::Unavailable("disk on fire".into()),
                "451 4.3.0 ",
            ),
        ];
        for (fail, want) in cases {
            let mut h = greeted(config()).await;
            *h.sink.fail.lock().unwrap() = Some(*fail);
            transaction(&mut h.client).await;
            h.client.expect(want).await;
            // The session goes on; the transaction is over.
            h.client.cmd("RCPT TO:<c@d.test>", "503 ").await;
            *h.sink.fail.lock().unwrap() = None;
            transaction(&mut h.client).await;
            h.client.expect("250 2.0.0").await;
        }
        let mut h = greeted(config()).await;
        *h.sink.fail.lock().unwrap() = Some(|| IngestError::ShuttingDown);
        transaction(&mut h.client).await;
        h.client.expect("421 4.3.2 ").await;
        assert_eq!(h.client.reply().await, "", "closed after 421");
        h.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn no_250_before_the_sink_returns() {
        let mut h = greeted(config()).await;
        let (release, gate) = oneshot::channel();
        *h.sink.gate.lock().unwrap() = Some(gate);
        transaction(&mut h.client).await;
        let early =
            tokio::time::timeout(Duration::from_millis(200), h.client.reader.fill_buf()).await;
        assert!(early.is_err(), "a reply came before the sink returned");
        release.send(()).unwrap();
        h.client.expect("250 2.0.0 Ok: ").await;
    }

    #[tokio::test]
    async fn idle_timeout() {
        let mut cfg = config();
        cfg.idle_timeout = Duration::from_millis(100);
        let mut h = greeted(cfg).await;
        h.client.expect("421 4.4.2 mx.test idle timeout").await;
        assert_eq!(h.client.reply().await, "");
        h.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn too_many_bad_commands() {
        let mut h = greeted(config()).await;
        for _ in 0..MAX_BAD_COMMANDS - 1 {
            h.client.cmd("BOGUS", "500 ").await;
        }
        h.client.send("BOGUS\r\n").await;
        h.client.expect("500 ").await;
        h.client.expect("421 4.7.0").await;
        assert_eq!(h.client.reply().await, "");
    }

    #[tokio::test]
    async fn shutdown_while_waiting_for_a_command() {
        let mut h = greeted(config()).await;
        h.shutdown.send(true).unwrap();
        h.client.expect("421 4.3.2 mx.test shutting down").await;
        assert_eq!(h.client.reply().await, "");
        h.task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_during_data_finishes_the_message() {
        let mut h = greeted(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("part one\r\n").await;
        h.shutdown.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.send("part two\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: ").await;
        c.expect("421 4.3.2 ").await;
        h.task.await.unwrap().unwrap();
        assert_eq!(
            h.sink.got.lock().unwrap()[0].bytes,
            b"part one\r\npart two\r\n"
        );
    }

    #[tokio::test]
    async fn lmtp_answers_per_recipient() {
        let mut cfg = config();
        cfg.protocol = Protocol::Lmtp;
        let mut h = start(cfg, Arc::default());
        let c = &mut h.client;
        c.expect("220 mx.test LMTP Coffer").await;
        c.cmd("EHLO x", "500 ").await;
        c.cmd("LHLO x", "250-mx.test").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("RCPT TO:<e@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("hi\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: test/0badf00d/1").await;
        c.expect("250 2.0.0 Ok: test/0badf00d/1").await;
        assert_eq!(h.sink.got.lock().unwrap()[0].session.protocol, "LMTP");
    }

    fn trusted() -> SessionConfig {
        SessionConfig {
            trust_xcoffer: true,
            ..config()
        }
    }

    fn lmtp(max_recipients: usize) -> SessionConfig {
        SessionConfig {
            protocol: Protocol::Lmtp,
            max_recipients,
            ..config()
        }
    }

    /// Started and greeted with EHLO (SMTP) or LHLO (LMTP); returns the EHLO/LHLO reply.
    async fn hello(config: SessionConfig) -> (Harness, String) {
        let lmtp = config.protocol == Protocol::Lmtp;
        let mut h = start(config, Arc::default());
        h.client.expect("220 mx.test ").await;
        let verb = if lmtp { "LHLO" } else { "EHLO" };
        let caps = h
            .client
            .cmd(&format!("{verb} client.test"), "250-mx.test")
            .await;
        (h, caps)
    }

    fn sample_xcoffer() -> Xcoffer {
        Xcoffer {
            origin_arrival: Some("archive-b/12345678/99".into()),
            origin_time: Some("2024-05-01T12:00:00Z".into()),
            mail_params: vec!["SIZE=5".into(), "BODY=8BITMIME".into()],
            client_addr: Some("203.0.113.9".into()),
            client_name: Some("mail.example.org".into()),
            helo: Some("evil\r\nhelo".into()),
            auth_user: Some("alice".into()),
            queue_id: Some("4VQ3xY1z2Bz".into()),
            trace: vec!["archive-b".into()],
            hops: 1,
            ..Xcoffer::default()
        }
    }

    #[tokio::test]
    async fn xcoffer_on_a_trusted_listener() {
        let (mut h, caps) = hello(trusted()).await;
        assert!(
            caps.ends_with(
                "250-ENHANCEDSTATUSCODES\r\n\
                 250 XCOFFER archive-a 0badf00d-1111-4222-8333-444455556666\r\n"
            ),
            "{caps}"
        );
        let x = sample_xcoffer();
        let c = &mut h.client;
        let mail = format!(
            "MAIL FROM:<a@b.test> BODY=8BITMIME XCOFFER={} SIZE=5",
            coffer_proto::encode(&x)
        );
        c.cmd(&mail, "250 2.1.0").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("hi\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: ").await;
        let got = h.sink.got.lock().unwrap();
        let s = &got[0].session;
        assert_eq!(s.xcoffer.as_ref(), Some(&x));
        assert_eq!(s.queue_id.as_deref(), Some("4VQ3xY1z2Bz"));
        // What this session saw stays as it saw it.
        assert_eq!(s.client_addr.as_deref(), Some("192.0.2.1:40000"));
        assert_eq!(s.helo.as_deref(), Some("client.test"));
        assert_eq!(got[0].envelope.mail_params, ["BODY=8BITMIME", "SIZE=5"]);
    }

    #[tokio::test]
    async fn xcoffer_refused_where_not_trusted() {
        let (mut h, caps) = hello(config()).await;
        assert!(!caps.contains("XCOFFER"), "{caps}");
        let c = &mut h.client;
        let mail = format!(
            "MAIL FROM:<a@b.test> XCOFFER={}",
            coffer_proto::encode(&sample_xcoffer())
        );
        c.cmd(&mail, "555 5.5.4 XCOFFER not accepted here").await;
        // No transaction was opened, and long MAIL lines stay refused.
        c.cmd("RCPT TO:<c@d.test>", "503 5.5.1").await;
        let long = format!("MAIL FROM:<a@b.test> XCOFFER={}", "A".repeat(5000));
        c.cmd(&long, "500 5.5.6 Line too long").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 2.1.0").await;
        // Not after HELO on a trusted listener either.
        let mut h = start(trusted(), Arc::default());
        h.client.expect("220 ").await;
        h.client.cmd("HELO client.test", "250 mx.test").await;
        h.client.cmd(&mail, "555 5.5.4").await;
    }

    #[tokio::test]
    async fn xcoffer_mail_line_cap_is_16_kib() {
        let (mut h, _) = hello(trusted()).await;
        let x = Xcoffer {
            helo: Some("h".repeat(12_000)),
            ..Xcoffer::default()
        };
        let value = coffer_proto::encode(&x);
        let line_with = |total: usize| {
            let bare = format!("MAIL FROM:<a@b.test> XCOFFER={value}\r\n");
            let pad = " ".repeat(total - bare.len());
            format!("MAIL FROM:<a@b.test> {pad}XCOFFER={value}\r\n")
        };
        let exact = line_with(16 * 1024);
        assert_eq!(exact.len(), 16 * 1024);
        let c = &mut h.client;
        c.send(&line_with(16 * 1024 + 1)).await;
        c.expect("500 5.5.6 Line too long").await;
        c.send(&exact).await;
        c.expect("250 2.1.0").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send("BDAT 2 LAST\r\nok").await;
        c.expect("250 2.0.0 Ok: ").await;
        assert_eq!(h.sink.got.lock().unwrap()[0].session.xcoffer, Some(x));
    }

    #[tokio::test]
    async fn malformed_xcoffer_gets_501() {
        use base64::Engine as _;
        let b64 = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let (mut h, _) = hello(trusted()).await;
        let bad = [
            "e30=".to_owned(),
            "not+base64".to_owned(),
            b64("[]"),
            b64("{\"hops\":\"1\"}"),
            b64("{\"origin_arrival\":\"no-slashes\"}"),
            b64("{\"trace\":[\"a b\"]}"),
            b64("{\"helo\":\"\\u0000\"}{"),
        ];
        for value in &bad {
            let line = format!("MAIL FROM:<a@b.test> XCOFFER={value}");
            let r = h.client.cmd(&line, "501 5.5.4 Invalid XCOFFER: ").await;
            assert!(r
                .bytes()
                .all(|b| b == b'\r' || b == b'\n' || b == b' ' || b.is_ascii_graphic()));
            h.client.cmd("RCPT TO:<c@d.test>", "503 5.5.1").await;
        }
        h.client
            .cmd("MAIL FROM:<a@b.test> XCOFFER=", "501 5.5.4")
            .await;
        h.client
            .cmd(
                &format!("MAIL FROM:<a@b.test> XCOFFER={}", b64("{}")),
                "250 2.1.0",
            )
            .await;
    }

    #[tokio::test]
    async fn bdat_transaction() {
        let (mut h, _) = hello(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME", "250 2.1.0")
            .await;
        c.cmd("RCPT TO:<c@d.test>", "250 2.1.5").await;
        c.send_bytes(b"BDAT 7\r\n\0\r\n.\r\n\xff").await;
        c.expect("250 2.0.0 Ok: 7 octets received").await;
        c.cmd("DATA", "503 5.5.1 DATA not allowed after BDAT").await;
        c.cmd("BDAT 0", "250 2.0.0 Ok: 0 octets received").await;
        c.send_bytes(b"BDAT 5 LAST\r\nQUIT\n").await;
        let ok = c.reply().await;
        let want = b"\0\r\n.\r\n\xffQUIT\n";
        assert_eq!(
            ok,
            format!("250 2.0.0 Ok: test/0badf00d/1 {}\r\n", MessageId::of(want))
        );
        // Pipelined, in one write, with a reply per chunk.
        c.send_bytes(
            b"MAIL FROM:<e@f.test>\r\nRCPT TO:<g@h.test>\r\nBDAT 3\r\nabcBDAT 2 LAST\r\nde",
        )
        .await;
        for want in [
            "250 2.1.0",
            "250 2.1.5",
            "250 2.0.0 Ok: 3 octets",
            "250 2.0.0 Ok: test/0badf00d/2 ",
        ] {
            c.expect(want).await;
        }
        c.cmd("QUIT", "221 ").await;
        h.task.await.unwrap().unwrap();
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got[0].bytes, want);
        assert_eq!(got[0].envelope.mail_params, ["BODY=BINARYMIME"]);
        assert_eq!(got[1].bytes, b"abcde");
    }

    #[tokio::test]
    async fn binarymime_needs_bdat() {
        let (mut h, _) = hello(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test> BODY=BINARYMIME", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "503 5.5.1 BODY=BINARYMIME needs BDAT").await;
        // The transaction is still open for BDAT.
        c.send("BDAT 1 LAST\r\nx").await;
        c.expect("250 2.0.0 Ok: ").await;
        // 8BITMIME and 7BIT may use either, and undeclared binary in DATA is kept.
        for body in ["8BITMIME", "7BIT"] {
            c.cmd(&format!("MAIL FROM:<a@b.test> BODY={body}"), "250 ")
                .await;
            c.cmd("RCPT TO:<c@d.test>", "250 ").await;
            c.cmd("DATA", "354 ").await;
            c.send_bytes(b"\0\xff\rbin\n\r\n.\r\n").await;
            c.expect("250 2.0.0 Ok: ").await;
        }
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got[1].bytes, b"\0\xff\rbin\n\r\n");
        assert_eq!(got[2].envelope.mail_params, ["BODY=7BIT"]);
    }

    #[tokio::test]
    async fn bdat_sequence_errors_still_read_the_chunk() {
        let (mut h, _) = hello(config()).await;
        let c = &mut h.client;
        // No MAIL: the 6 bytes (which look like a command) are read and dropped.
        c.send("BDAT 6\r\nRSET\r\n").await;
        c.expect("503 5.5.1 Need MAIL command").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.send("BDAT 6 LAST\r\nQUIT\r\n").await;
        c.expect("503 5.5.1 Need RCPT command").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send("BDAT 2 LAST\r\nok").await;
        c.expect("250 2.0.0 Ok: test/0badf00d/1").await;
        assert_eq!(h.sink.got.lock().unwrap()[0].bytes, b"ok");
    }

    #[tokio::test]
    async fn bdat_over_the_limit() {
        let (mut h, _) = hello(config()).await;
        let c = &mut h.client;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send(&format!("BDAT 60\r\n{}", "a".repeat(60))).await;
        c.expect("250 2.0.0 Ok: 60 octets").await;
        // 120 > 100: the chunk is read whole, then 552, and the transaction is over.
        c.send(&format!("BDAT 60\r\n{}", "b".repeat(60))).await;
        c.expect("552 5.3.4").await;
        c.send(&format!("BDAT 10 LAST\r\n{}", "c".repeat(10))).await;
        c.expect("503 5.5.1 Need MAIL").await;
        // One chunk over the limit at once, and exactly at the limit.
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send(&format!("BDAT 101 LAST\r\n{}", "d".repeat(101)))
            .await;
        c.expect("552 5.3.4").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send(&format!("BDAT 100 LAST\r\n{}", "e".repeat(100)))
            .await;
        c.expect("250 2.0.0 Ok: test/0badf00d/1").await;
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].bytes, "e".repeat(100).as_bytes());
    }

    #[tokio::test]
    async fn bdat_lies_store_nothing() {
        // The client closes in the middle of a chunk.
        let (mut h, _) = hello(config()).await;
        h.client.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        h.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
        h.client.send("BDAT 50 LAST\r\nonly a few bytes").await;
        h.client.writer.shutdown().await.unwrap();
        assert_eq!(h.client.reply().await, "");
        h.task.await.unwrap().unwrap();
        assert!(h.sink.got.lock().unwrap().is_empty());
        // A size that is not a number: 501, and the session ends.
        let (mut h, _) = hello(config()).await;
        h.client.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        h.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
        h.client.send("BDAT 1 \r\nx").await;
        h.client.expect("250 2.0.0 Ok: 1 octets").await;
        h.client.cmd("BDAT ten LAST", "501 5.5.4").await;
        h.client.expect("421 4.7.0").await;
        assert_eq!(h.client.reply().await, "");
        h.task.await.unwrap().unwrap();
        assert!(h.sink.got.lock().unwrap().is_empty());
    }

    /// Sends MAIL and `n` RCPTs in one write; expects `accepted` 250s then 452s.
    async fn many_recipients(c: &mut Client<ReadHalf<DuplexStream>>, n: usize, accepted: usize) {
        let mut wire = String::from("MAIL FROM:<a@b.test>\r\n");
        for i in 0..n {
            wire.push_str(&format!("RCPT TO:<r{i}@d.test>\r\n"));
        }
        c.send(&wire).await;
        c.expect("250 2.1.0").await;
        for i in 0..n {
            let want = if i < accepted {
                "250 2.1.5"
            } else {
                "452 4.5.3"
            };
            c.expect(want).await;
        }
    }

    #[tokio::test]
    async fn lmtp_a_thousand_recipients() {
        let (mut h, caps) = hello(lmtp(1000)).await;
        assert!(caps.contains("250-CHUNKING\r\n"), "{caps}");
        many_recipients(&mut h.client, 1001, 1000).await;
        let (release, gate) = oneshot::channel();
        *h.sink.gate.lock().unwrap() = Some(gate);
        h.client.cmd("DATA", "354 ").await;
        h.client.send("hi\r\n.\r\n").await;
        let early =
            tokio::time::timeout(Duration::from_millis(200), h.client.reader.fill_buf()).await;
        assert!(early.is_err(), "a reply came before the sink returned");
        release.send(()).unwrap();
        let want = format!(
            "250 2.0.0 Ok: test/0badf00d/1 {}\r\n",
            MessageId::of(b"hi\r\n")
        );
        for i in 0..1000 {
            assert_eq!(h.client.reply().await, want, "reply {i}");
        }
        // The same by BDAT, and nothing more than one reply per recipient.
        many_recipients(&mut h.client, 1000, 1000).await;
        h.client.send("BDAT 3\r\nabc").await;
        h.client.expect("250 2.0.0 Ok: 3 octets").await;
        h.client.send("BDAT 0 LAST\r\nNOOP\r\n").await;
        for _ in 0..1000 {
            h.client.expect("250 2.0.0 Ok: test/0badf00d/2 ").await;
        }
        h.client.expect("250 2.0.0 Ok\r\n").await;
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].envelope.rcpt_to.len(), 1000);
        assert_eq!(got[1].bytes, b"abc");
    }

    #[tokio::test]
    async fn over_the_memory_budget_gets_451_and_gives_it_back() {
        let budget = crate::smtp::Budget::new(1000);
        let sink = Arc::new(FakeSink {
            budget: Some(budget.clone()),
            ..FakeSink::default()
        });
        let cfg = SessionConfig {
            max_message_size: 1 << 20,
            ..config()
        };
        let open = |sink: &Arc<FakeSink>| {
            let mut h = start(cfg.clone(), sink.clone());
            async move {
                h.client.expect("220 ").await;
                h.client.cmd("EHLO x", "250-").await;
                h.client.cmd("MAIL FROM:<a@b.test>", "250 ").await;
                h.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
                h
            }
        };
        // A holds more than the whole budget (granted: nothing else was held).
        let mut a = open(&sink).await;
        a.client.cmd("DATA", "354 ").await;
        a.client.send(&"a".repeat(5000)).await;
        for _ in 0..1000 {
            if budget.held() >= 5000 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let held = budget.held();
        assert!(held >= 5000, "{held}");
        // B cannot get any: its DATA is read to the end, dropped, and answered 451.
        let mut b = open(&sink).await;
        b.client.cmd("DATA", "354 ").await;
        b.client
            .send(&format!("{}\r\n.\r\n", "b".repeat(3000)))
            .await;
        b.client.expect("451 4.3.2 ").await;
        // Nor for a BDAT chunk; the transaction is over, the session goes on.
        b.client.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        b.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
        b.client
            .send(&format!("BDAT 2000\r\n{}", "c".repeat(2000)))
            .await;
        b.client.expect("451 4.3.2 ").await;
        b.client.cmd("RCPT TO:<c@d.test>", "503 ").await;
        assert_eq!(budget.held(), held, "B holds nothing");
        // A ends: stored, and its claim is given back.
        a.client.send("\r\n.\r\n").await;
        a.client.expect("250 2.0.0 Ok: ").await;
        assert_eq!(budget.held(), 0);
        // Now B's retry fits.
        b.client.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        b.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
        b.client.cmd("DATA", "354 ").await;
        b.client.send("retry\r\n.\r\n").await;
        b.client.expect("250 2.0.0 Ok: ").await;
        assert_eq!(budget.held(), 0);
        assert_eq!(*sink.refusals.lock().unwrap(), 2);
        let got = sink.got.lock().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].bytes, b"retry\r\n");
    }

    #[tokio::test]
    async fn lmtp_store_failure_answers_every_recipient() {
        let (mut h, _) = hello(lmtp(1000)).await;
        *h.sink.fail.lock().unwrap() = Some(|| IngestError::Busy);
        many_recipients(&mut h.client, 1000, 1000).await;
        h.client.send("BDAT 2 LAST\r\nhi").await;
        h.client.expect("451 4.3.2 ").await;
        for _ in 1..1000 {
            h.client.expect("451 4.3.2 ").await;
        }
        h.client.cmd("NOOP", "250 2.0.0 Ok\r\n").await;
        assert!(h.sink.got.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn lmtp_trusted_advertises_xcoffer_in_lhlo() {
        let (mut h, caps) = hello(SessionConfig {
            trust_xcoffer: true,
            ..lmtp(1000)
        })
        .await;
        assert!(caps.contains("250 XCOFFER archive-a "), "{caps}");
        assert!(caps.contains("250-CHUNKING\r\n250-SMTPUTF8"), "{caps}");
        let x = sample_xcoffer();
        let mail = format!("MAIL FROM:<a@b.test> XCOFFER={}", coffer_proto::encode(&x));
        h.client.cmd(&mail, "250 ").await;
        h.client.cmd("RCPT TO:<c@d.test>", "250 ").await;
        h.client.cmd("RCPT TO:<e@d.test>", "250 ").await;
        h.client.send("BDAT 2 LAST\r\nhi").await;
        h.client.expect("250 2.0.0 Ok: ").await;
        h.client.expect("250 2.0.0 Ok: ").await;
        let got = h.sink.got.lock().unwrap();
        assert_eq!(got[0].session.xcoffer.as_ref(), Some(&x));
        assert_eq!(got[0].session.protocol, "LMTP");
    }

    /// Reads one reply a byte at a time, so nothing past it is consumed (before TLS).
    pub(crate) async fn raw_reply<S: AsyncRead + Unpin>(s: &mut S) -> String {
        let mut all = Vec::new();
        let mut line_start = 0;
        loop {
            let mut b = [0u8; 1];
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b))
                .await
                .expect("reply in time")
                .unwrap();
            if n == 0 {
                break;
            }
            all.push(b[0]);
            if b[0] == b'\n' {
                if all.get(line_start + 3) != Some(&b'-') {
                    break;
                }
                line_start = all.len();
            }
        }
        String::from_utf8(all).unwrap()
    }

    fn tls_config(
        ca: &crate::tls::testing::TestCa,
        clients: Option<&crate::tls::testing::TestCa>,
        required: bool,
    ) -> SessionConfig {
        SessionConfig {
            tls: Some(ca.server("mx.test", clients, clients.is_some())),
            tls_required: required,
            ..config()
        }
    }

    /// A session over a duplex pipe, its client end whole (for TLS).
    fn start_raw(
        config: SessionConfig,
    ) -> (DuplexStream, Arc<FakeSink>, JoinHandle<io::Result<()>>) {
        let (client, server) = tokio::io::duplex(256 * 1024);
        let (_tx, rx) = watch::channel(false);
        let sink = Arc::new(FakeSink::default());
        let dyn_sink: Arc<dyn Sink> = sink.clone();
        let task = tokio::spawn(async move {
            let _keep = _tx;
            serve(
                server,
                Arc::new(config),
                "192.0.2.1:40000".into(),
                dyn_sink,
                rx,
            )
            .await
        });
        (client, sink, task)
    }

    async fn handshake(
        stream: DuplexStream,
        client: Arc<rustls::ClientConfig>,
    ) -> io::Result<Client<ReadHalf<tokio_rustls::client::TlsStream<DuplexStream>>>> {
        let name = rustls::pki_types::ServerName::try_from("mx.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, stream)
            .await?;
        let (r, w) = tokio::io::split(tls);
        Ok(Client {
            reader: BufReader::new(r),
            writer: Box::new(w),
        })
    }

    #[tokio::test]
    async fn starttls_is_offered_required_and_resets_the_session() {
        let ca = crate::tls::testing::TestCa::new("Test CA");
        let (mut raw, sink, task) = start_raw(tls_config(&ca, None, true));
        assert!(raw_reply(&mut raw).await.starts_with("220 mx.test ESMTP"));
        raw.write_all(b"EHLO client.test\r\n").await.unwrap();
        let caps = raw_reply(&mut raw).await;
        assert!(caps.contains("250-STARTTLS\r\n"), "{caps}");
        raw.write_all(b"MAIL FROM:<a@b.test>\r\n").await.unwrap();
        assert_eq!(
            raw_reply(&mut raw).await,
            "530 5.7.0 Must issue a STARTTLS command first\r\n"
        );
        raw.write_all(b"STARTTLS\r\n").await.unwrap();
        assert_eq!(
            raw_reply(&mut raw).await,
            "220 2.0.0 Ready to start TLS\r\n"
        );
        let mut c = handshake(raw, ca.client(None)).await.unwrap();
        // A new session: EHLO first, no STARTTLS offered again.
        c.cmd("MAIL FROM:<a@b.test>", "503 5.5.1 Send EHLO first")
            .await;
        let caps = c.cmd("EHLO client.test", "250-mx.test").await;
        assert!(!caps.contains("STARTTLS"), "{caps}");
        c.cmd("STARTTLS", "503 5.5.1 TLS already active").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 2.1.0").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.cmd("DATA", "354 ").await;
        c.send("over tls\r\n.\r\n").await;
        c.expect("250 2.0.0 Ok: ").await;
        c.cmd("QUIT", "221 ").await;
        task.await.unwrap().unwrap();
        let got = sink.got.lock().unwrap();
        let tls = got[0].session.tls.as_ref().expect("TLS recorded");
        assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
        assert!(
            tls.cipher.as_deref().unwrap().starts_with("TLS13_"),
            "{tls:?}"
        );
        assert!(tls.bits.is_some());
        assert_eq!(tls.peer_subject, None);
        assert_eq!(tls.peer_verified, None);
        assert_eq!(got[0].session.helo.as_deref(), Some("client.test"));
    }

    #[tokio::test]
    async fn commands_pipelined_after_starttls_are_dropped() {
        let ca = crate::tls::testing::TestCa::new("Test CA");
        let (mut raw, sink, task) = start_raw(tls_config(&ca, None, false));
        raw_reply(&mut raw).await;
        raw.write_all(b"EHLO client.test\r\n").await.unwrap();
        raw_reply(&mut raw).await;
        // An attacker in the path appends commands to the client's STARTTLS.
        raw.write_all(
            b"STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@x.test>\r\nNOOP\r\n",
        )
        .await
        .unwrap();
        assert_eq!(
            raw_reply(&mut raw).await,
            "220 2.0.0 Ready to start TLS\r\n"
        );
        // Nothing else came in the clear: the handshake reads only TLS records.
        let mut c = handshake(raw, ca.client(None)).await.unwrap();
        c.cmd("EHLO client.test", "250-mx.test").await;
        // The injected MAIL opened no transaction.
        c.cmd("RCPT TO:<victim@x.test>", "503 5.5.1 Need MAIL command")
            .await;
        c.cmd("NOOP", "250 2.0.0 Ok").await;
        c.cmd("QUIT", "221 ").await;
        task.await.unwrap().unwrap();
        assert!(sink.got.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn client_certificates_are_verified_and_recorded() {
        let ca = crate::tls::testing::TestCa::new("Server CA");
        let peers = crate::tls::testing::TestCa::new("Peers CA");
        let other = crate::tls::testing::TestCa::new("Other CA");
        let session = |client: Arc<rustls::ClientConfig>| {
            let (mut raw, sink, task) = start_raw(tls_config(&ca, Some(&peers), true));
            async move {
                raw_reply(&mut raw).await;
                raw.write_all(b"EHLO a\r\nSTARTTLS\r\n").await.unwrap();
                raw_reply(&mut raw).await;
                assert!(raw_reply(&mut raw).await.starts_with("220 2.0.0"));
                (handshake(raw, client).await, sink, task)
            }
        };
        // A certificate from the peers' CA.
        let (c, sink, task) = session(ca.client(Some((&peers, "archive-a")))).await;
        let mut c = c.unwrap();
        c.cmd("EHLO archive-a", "250-").await;
        c.cmd("MAIL FROM:<a@b.test>", "250 ").await;
        c.cmd("RCPT TO:<c@d.test>", "250 ").await;
        c.send("BDAT 2 LAST\r\nok").await;
        c.expect("250 2.0.0 Ok: ").await;
        c.cmd("QUIT", "221 ").await;
        task.await.unwrap().unwrap();
        let tls = sink.got.lock().unwrap()[0].session.tls.clone().unwrap();
        assert_eq!(
            tls.peer_subject.as_deref(),
            Some("O=Coffer\\, tests,CN=archive-a")
        );
        assert_eq!(tls.peer_issuer.as_deref(), Some("CN=Peers CA"));
        assert_eq!(tls.peer_verified, Some(true));

        // No certificate, or one from another CA: no session over TLS.
        for client in [ca.client(None), ca.client(Some((&other, "archive-a")))] {
            let (c, sink, task) = session(client).await;
            if let Ok(mut c) = c {
                // TLS 1.3: the server's refusal may come with the first read.
                c.send("EHLO x\r\n").await;
                let mut line = String::new();
                let read = c.reader.read_line(&mut line).await;
                assert!(read.is_err() || line.is_empty(), "{line}");
            }
            task.await.unwrap().unwrap();
            assert!(sink.got.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn tls_is_ignored_on_unix_sockets() {
        let ca = crate::tls::testing::TestCa::new("Test CA");
        let dir = tempfile::tempdir().unwrap();
        let (_, cert, key) = ca.write(dir.path(), "s", "mx.test");
        let mut l = crate::config::ListenerConfig {
            name: "l".into(),
            protocol: Protocol::Lmtp,
            bind: crate::config::BindAddr::Unix("/x.sock".into()),
            allow: vec![],
            proxy_protocol: false,
            trusted_proxies: vec![],
            max_message_size: 1,
            max_recipients: 1,
            max_connections: 1,
            idle_timeout: Duration::from_secs(1),
            trust_xcoffer: true,
            socket_mode: None,
            socket_group: None,
            tls: Some(crate::config::ListenerTls {
                cert,
                key,
                required: true,
                require_client_cert: false,
                client_ca: None,
            }),
        };
        let server = Some(ca.server("mx.test", None, false));
        let unix = SessionConfig::from_listener(&l, "h", server.clone());
        assert!(unix.tls.is_none() && !unix.tls_required);
        l.bind = crate::config::BindAddr::Tcp("127.0.0.1:0".parse().unwrap());
        let tcp = SessionConfig::from_listener(&l, "h", server);
        assert!(tcp.tls.is_some() && tcp.tls_required);
    }
}
