//! The milter callbacks: capture one message exactly and hand it to cofferd.
//!
//! # What happens when
//! - negotiate: LEADING_SPACE (header values keep their leading whitespace), NOREPLY for
//!   every stage before end-of-message the MTA allows (we never decide before then),
//!   ADD_HEADER only with `add_header = true`, and the complete macro list of each
//!   stage (a requested list replaces the MTA's own).
//! - connect, helo: connection facts and macros, kept for every message of the
//!   connection.
//! - mail: a new message (any previous one is dropped); the sender and its ESMTP
//!   parameters. rcpt: each recipient, its parameters and its `{rcpt_*}` macros.
//! - header, eoh, body: the bytes are rebuilt ([`crate::message`]) into a buffer. Once
//!   it holds [`MAX_CHUNK`] bytes the LMTP transaction is opened (not at MAIL: the queue
//!   id `{i}` exists from DATA on) and the buffer goes out as a `BDAT` chunk, so a big
//!   message is never held whole. A small message is sent at end-of-message in one
//!   chunk, which keeps an LMTP connection busy only for that round trip.
//! - eom: the rest goes out as `BDAT n LAST`; one 250 per recipient lets the message
//!   continue (and adds `X-Coffer-Archived` when configured). Anything else — a refusal,
//!   a broken or unreachable cofferd, the timeout — answers `451 4.3.0 <reason>`, unless
//!   `on_failure = "accept"`.
//! - abort, close: an open transaction is reset (RSET) and its connection reused.
//!
//! Every decision is taken at end-of-message, never earlier: for locally submitted mail
//! (`non_smtpd_milters`) Postfix allows a milter to tempfail only there.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use coffer_proto::{TlsInfo, Xcoffer};
use indymilter::{
    Actions, Callbacks, Context, ContextActions, EomContext, MacroStage, Macros, NegotiateContext,
    ProtoOpts, SetErrorReply, SocketInfo, Status,
};

use crate::config::{self, MilterConfig, OnFailure, Reload};
use crate::latency::Histogram;
use crate::lmtp::{HandoffError, LmtpConn, Pool};
use crate::message;

/// Largest `BDAT` chunk sent to cofferd (1 MiB): the most one message holds in memory
/// here, plus one MTA body chunk (64 KiB).
pub const MAX_CHUNK: usize = 1 << 20;

/// The name of the header added with `add_header = true`.
pub const ARCHIVED_HEADER: &str = "X-Coffer-Archived";

/// Macros requested per stage: the complete lists (design §5: a requested list replaces
/// Postfix's own for that stage).
pub const CONNECT_MACROS: &str = "j _ {daemon_name} {client_addr} {client_name} {client_port}";
pub const HELO_MACROS: &str = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}";
pub const MAIL_MACROS: &str =
    "{auth_type} {auth_authen} {auth_author} {mail_mailer} {mail_host} {mail_addr}";
pub const RCPT_MACROS: &str = "{rcpt_mailer} {rcpt_host} {rcpt_addr}";
pub const DATA_MACROS: &str = "i";
pub const EOH_MACROS: &str = "i";

/// Longest `MAIL FROM:` line cofferd takes on a trusted listener (16 KiB).
const MAX_MAIL_LINE: usize = 16 * 1024;

/// What all sessions share.
#[derive(Debug)]
pub struct Shared {
    /// The configuration in force; replaced as a whole on reload.
    config: RwLock<Arc<MilterConfig>>,
    pub pool: Pool,
    /// How long each end-of-message took ([`crate::latency`]).
    pub eom_latency: Histogram,
}

impl Shared {
    pub fn new(config: MilterConfig) -> Arc<Self> {
        let pool = Pool::new(config.target.clone(), config.timeout);
        Arc::new(Self {
            config: RwLock::new(Arc::new(config)),
            pool,
            eom_latency: Histogram::default(),
        })
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<MilterConfig> {
        self.config.read().expect("config lock").clone()
    }

    /// Applies a newly read configuration as [`config::reload`] decides: `on_failure`,
    /// `timeout` and `add_header` for messages from now on, `target` for new LMTP
    /// connections. Returns the decision, for the log.
    pub fn reload(&self, new: &MilterConfig) -> Reload {
        let mut current = self.config.write().expect("config lock");
        let plan = config::reload(current.as_ref(), new);
        self.pool
            .reconfigure(plan.config.target.clone(), plan.config.timeout);
        *current = Arc::new(plan.config.clone());
        plan
    }
}

/// One MTA connection.
#[derive(Debug, Default)]
pub struct Conn {
    /// LEADING_SPACE was negotiated: header values come with their leading whitespace.
    leading_space: bool,
    /// The NOREPLY options negotiated.
    noreply: ProtoOpts,
    /// ADD_HEADER was negotiated.
    add_header: bool,
    /// Macros of the connect and helo stages.
    macros: BTreeMap<String, String>,
    client_name: Option<String>,
    client_addr: Option<String>,
    helo: Option<String>,
    msg: Option<Msg>,
}

/// The message being captured.
#[derive(Debug)]
struct Msg {
    /// The reverse path without angle brackets (empty for `<>`).
    sender: String,
    mail_params: Vec<String>,
    rcpts: Vec<String>,
    rcpt_params: Vec<Vec<String>>,
    /// Macros from the mail stage on (`{rcpt_*}` suffixed `#N` per recipient).
    macros: BTreeMap<String, String>,
    /// Bytes rebuilt but not yet sent.
    buf: Vec<u8>,
    headers_ended: bool,
    /// Bytes sent so far plus buffered.
    size: u64,
    /// The open LMTP transaction.
    tx: Option<LmtpConn>,
    /// Why the handoff failed; nothing more is sent once set.
    failed: Option<String>,
    started: Instant,
}

impl Msg {
    fn new(sender: String, mail_params: Vec<String>) -> Self {
        Self {
            sender,
            mail_params,
            rcpts: Vec::new(),
            rcpt_params: Vec::new(),
            macros: BTreeMap::new(),
            buf: Vec::new(),
            headers_ended: false,
            size: 0,
            tx: None,
            failed: None,
            started: Instant::now(),
        }
    }

    fn queue_id(&self) -> &str {
        self.macros.get("i").map_or("-", String::as_str)
    }
}

/// The callbacks for [`indymilter::run`].
pub fn callbacks(shared: Arc<Shared>) -> Callbacks<Conn> {
    let s1 = shared.clone();
    let s2 = shared.clone();
    let s3 = shared.clone();
    let s4 = shared.clone();
    let s5 = shared.clone();
    let s6 = shared.clone();
    let s7 = shared;
    Callbacks::new()
        .on_negotiate(move |cx, actions, opts| {
            let s = s1.clone();
            Box::pin(async move { negotiate(&s, cx, actions, opts) })
        })
        .on_connect(|cx, hostname, socket| Box::pin(async move { connect(cx, &hostname, socket) }))
        .on_helo(|cx, hostname| Box::pin(async move { helo(cx, &hostname) }))
        .on_mail(move |cx, args| {
            let s = s2.clone();
            Box::pin(async move { mail(&s, cx, args).await })
        })
        .on_rcpt(|cx, args| Box::pin(async move { rcpt(cx, args) }))
        .on_data(|cx| Box::pin(async move { data(cx) }))
        .on_header(move |cx, name, value| {
            let s = s3.clone();
            Box::pin(async move { header(&s, cx, &name, &value).await })
        })
        .on_eoh(move |cx| {
            let s = s4.clone();
            Box::pin(async move { eoh(&s, cx).await })
        })
        .on_body(move |cx, chunk| {
            let s = s5.clone();
            Box::pin(async move { body(&s, cx, &chunk).await })
        })
        .on_eom(move |cx| {
            let s = s6.clone();
            Box::pin(async move { eom(&s, cx).await })
        })
        .on_abort(move |cx| {
            let s = s7.clone();
            Box::pin(async move {
                if let Some(conn) = cx.data.as_mut() {
                    drop_message(&s, conn.msg.take()).await;
                }
                Status::Continue
            })
        })
        .on_close(|cx| {
            // Dropping the message drops (rather than resets) an open transaction: the
            // abort that normally comes first has already reset it.
            cx.data = None;
            Box::pin(async { Status::Continue })
        })
}

/// The NOREPLY options we take when offered: every stage before end-of-message.
pub const NOREPLY: [ProtoOpts; 8] = [
    ProtoOpts::NOREPLY_CONNECT,
    ProtoOpts::NOREPLY_HELO,
    ProtoOpts::NOREPLY_MAIL,
    ProtoOpts::NOREPLY_RCPT,
    ProtoOpts::NOREPLY_DATA,
    ProtoOpts::NOREPLY_HEADER,
    ProtoOpts::NOREPLY_EOH,
    ProtoOpts::NOREPLY_BODY,
];

fn negotiate(
    shared: &Shared,
    cx: &mut NegotiateContext<Conn>,
    mta_actions: Actions,
    mta_opts: ProtoOpts,
) -> Status {
    let mut conn = Conn::default();
    let mut opts = cx.requested_opts;
    if mta_opts.contains(ProtoOpts::LEADING_SPACE) {
        opts |= ProtoOpts::LEADING_SPACE;
        conn.leading_space = true;
    } else {
        tracing::warn!(
            "the MTA does not offer LEADING_SPACE: header values are rebuilt with one space \
             after the colon, which may differ from what the client sent"
        );
    }
    for flag in NOREPLY {
        if mta_opts.contains(flag) {
            opts |= flag;
            conn.noreply |= flag;
        }
    }
    cx.requested_opts = opts;
    let mut actions = Actions::empty();
    if shared.config().add_header {
        if mta_actions.contains(Actions::ADD_HEADER) {
            actions |= Actions::ADD_HEADER;
            conn.add_header = true;
        } else {
            tracing::warn!("add_header = true, but the MTA does not offer ADD_HEADER");
        }
    }
    cx.requested_actions = actions;
    for (stage, list) in [
        (MacroStage::Connect, CONNECT_MACROS),
        (MacroStage::Helo, HELO_MACROS),
        (MacroStage::Mail, MAIL_MACROS),
        (MacroStage::Rcpt, RCPT_MACROS),
        (MacroStage::Data, DATA_MACROS),
        (MacroStage::Eoh, EOH_MACROS),
    ] {
        cx.requested_macros
            .insert(stage, CString::new(list).expect("no NUL in macro lists"));
    }
    cx.data = Some(conn);
    Status::Continue
}

/// The status for a stage before end-of-message: Noreply where negotiated.
fn go_on(conn: Option<&Conn>, flag: ProtoOpts) -> Status {
    if conn.is_some_and(|c| c.noreply.contains(flag)) {
        Status::Noreply
    } else {
        Status::Continue
    }
}

fn text(s: &CStr) -> String {
    String::from_utf8_lossy(s.to_bytes()).into_owned()
}

/// Copies every macro now defined into `into`, except the per-recipient ones (taken
/// one by one at RCPT).
///
/// A stage's macros stay defined until the MTA starts an earlier stage again (a new
/// MAIL or RCPT), so at end-of-message every macro of the message is there: they are
/// taken once, then (or when the first chunk of a big message goes out), not at each
/// stage.
fn take_macros(macros: &Macros, into: &mut BTreeMap<String, String>) {
    let rcpt: Vec<&str> = RCPT_MACROS.split(' ').collect();
    for (k, v) in macros.to_hash_map() {
        let k = text(&k);
        if !rcpt.contains(&k.as_str()) {
            into.insert(k, text(&v));
        }
    }
}

fn connect(cx: &mut Context<Conn>, hostname: &CStr, socket: SocketInfo) -> Status {
    let Some(conn) = cx.data.as_mut() else {
        return Status::Continue;
    };
    conn.macros.clear();
    take_macros(&cx.macros, &mut conn.macros);
    conn.client_name = Some(text(hostname));
    conn.client_addr = match socket {
        SocketInfo::Inet(addr) => Some(addr.to_string()),
        SocketInfo::Unix(path) => Some(format!("unix:{}", text(&path))),
        SocketInfo::Unknown => conn.macros.get("{client_addr}").cloned(),
    };
    conn.helo = None;
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_CONNECT)
}

fn helo(cx: &mut Context<Conn>, hostname: &CStr) -> Status {
    if let Some(conn) = cx.data.as_mut() {
        take_macros(&cx.macros, &mut conn.macros);
        conn.helo = Some(text(hostname));
    }
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_HELO)
}

/// `<addr>` → `addr`; anything else as given.
fn unbracket(arg: &str) -> &str {
    arg.strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(arg)
}

async fn mail(shared: &Shared, cx: &mut Context<Conn>, args: Vec<CString>) -> Status {
    let Some(conn) = cx.data.as_mut() else {
        return Status::Continue;
    };
    // A new MAIL without an abort first: the previous message is over.
    drop_message(shared, conn.msg.take()).await;
    let mut args = args.iter().map(|a| text(a));
    let sender = args.next().unwrap_or_default();
    conn.msg = Some(Msg::new(unbracket(&sender).to_owned(), args.collect()));
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_MAIL)
}

fn rcpt(cx: &mut Context<Conn>, args: Vec<CString>) -> Status {
    if let Some(msg) = cx.data.as_mut().and_then(|c| c.msg.as_mut()) {
        let mut args = args.iter().map(|a| text(a));
        let rcpt = args.next().unwrap_or_default();
        msg.rcpts.push(unbracket(&rcpt).to_owned());
        msg.rcpt_params.push(args.collect());
        let n = msg.rcpts.len();
        for name in RCPT_MACROS.split(' ') {
            let cname = CString::new(name).expect("no NUL");
            if let Some(v) = cx.macros.get(&cname) {
                msg.macros.insert(format!("{name}#{n}"), text(v));
            }
        }
    }
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_RCPT)
}

fn data(cx: &mut Context<Conn>) -> Status {
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_DATA)
}

async fn header(shared: &Shared, cx: &mut Context<Conn>, name: &CStr, value: &CStr) -> Status {
    if let Some(conn) = cx.data.as_mut() {
        let leading_space = conn.leading_space;
        if let Some(msg) = conn.msg.as_mut().filter(|m| m.failed.is_none()) {
            let before = msg.buf.len();
            message::push_header(
                &mut msg.buf,
                name.to_bytes(),
                value.to_bytes(),
                leading_space,
            );
            msg.size += (msg.buf.len() - before) as u64;
            send_full_chunks(shared, conn, &cx.macros).await;
        }
    }
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_HEADER)
}

async fn eoh(shared: &Shared, cx: &mut Context<Conn>) -> Status {
    if let Some(conn) = cx.data.as_mut() {
        if let Some(msg) = conn.msg.as_mut() {
            end_headers(msg);
            send_full_chunks(shared, conn, &cx.macros).await;
        }
    }
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_EOH)
}

fn end_headers(msg: &mut Msg) {
    if !msg.headers_ended {
        msg.headers_ended = true;
        if msg.failed.is_none() {
            message::push_end_of_headers(&mut msg.buf);
            msg.size += 2;
        }
    }
}

async fn body(shared: &Shared, cx: &mut Context<Conn>, chunk: &[u8]) -> Status {
    if let Some(conn) = cx.data.as_mut() {
        if let Some(msg) = conn.msg.as_mut() {
            end_headers(msg);
            if msg.failed.is_none() {
                msg.buf.extend_from_slice(chunk);
                msg.size += chunk.len() as u64;
                send_full_chunks(shared, conn, &cx.macros).await;
            }
        }
    }
    go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_BODY)
}

/// Sends [`MAX_CHUNK`]-sized chunks while the buffer holds that much, opening the
/// transaction first if needed. A failure is recorded in the message, not returned:
/// it is answered at end-of-message.
async fn send_full_chunks(shared: &Shared, conn: &mut Conn, macros: &Macros) {
    let Conn {
        macros: conn_macros,
        client_name,
        client_addr,
        helo,
        msg,
        ..
    } = conn;
    let Some(msg) = msg.as_mut() else {
        return;
    };
    if msg.failed.is_some() || msg.buf.len() < MAX_CHUNK {
        return;
    }
    take_macros(macros, &mut msg.macros);
    let facts = ConnFacts {
        macros: conn_macros,
        client_name: client_name.as_deref(),
        client_addr: client_addr.as_deref(),
        helo: helo.as_deref(),
    };
    // Bounded: each round removes MAX_CHUNK bytes from the buffer, or fails the message.
    while msg.failed.is_none() && msg.buf.len() >= MAX_CHUNK {
        let rest = msg.buf.split_off(MAX_CHUNK);
        let chunk = std::mem::replace(&mut msg.buf, rest);
        if let Err(e) = send(shared, &facts, msg, &chunk, false).await {
            fail(shared, msg, e).await;
        }
    }
}

/// The connection facts a transaction needs, borrowed from [`Conn`].
struct ConnFacts<'a> {
    macros: &'a BTreeMap<String, String>,
    client_name: Option<&'a str>,
    client_addr: Option<&'a str>,
    helo: Option<&'a str>,
}

impl<'a> ConnFacts<'a> {
    fn of(conn: &'a Conn) -> Self {
        Self {
            macros: &conn.macros,
            client_name: conn.client_name.as_deref(),
            client_addr: conn.client_addr.as_deref(),
            helo: conn.helo.as_deref(),
        }
    }
}

/// Sends one chunk, opening the transaction first when none is open.
async fn send(
    shared: &Shared,
    facts: &ConnFacts<'_>,
    msg: &mut Msg,
    chunk: &[u8],
    last: bool,
) -> Result<Option<String>, HandoffError> {
    let rcpts = msg.rcpts.len();
    let (tx, result) = match msg.tx.take() {
        Some(mut tx) => {
            let result = tx.chunk(chunk, last, rcpts).await;
            (tx, result)
        }
        None => {
            let line = mail_line(facts, msg);
            let mut tx = shared.pool.get().await?;
            let mut result = first_chunk(&mut tx, &line, &msg.rcpts, chunk, last).await;
            if let Err(e) = &result {
                if tx.retryable(e) {
                    // cofferd closed the pooled connection while it sat idle. Whatever
                    // it may have stored of this message, sending it again adds no
                    // arrival (a repeat).
                    tracing::debug!(queue_id = %msg.queue_id(), error = %e,
                        "pooled LMTP connection broke before answering; sending on a new one");
                    tx = shared.pool.connect().await?;
                    result = first_chunk(&mut tx, &line, &msg.rcpts, chunk, last).await;
                }
            }
            (tx, result)
        }
    };
    match result {
        Ok(reply) => {
            if last {
                shared.pool.put(tx);
            } else {
                msg.tx = Some(tx);
            }
            Ok(reply.map(|r| r.text().to_owned()))
        }
        Err(e) => {
            release(shared, tx, &e).await;
            Err(e)
        }
    }
}

/// Opens the transaction and sends its first chunk (pipelined where the connection
/// allows, see [`crate::lmtp`]).
async fn first_chunk(
    tx: &mut LmtpConn,
    mail_line: &str,
    rcpts: &[String],
    chunk: &[u8],
    last: bool,
) -> Result<Option<crate::lmtp::Reply>, HandoffError> {
    tx.begin(mail_line, rcpts).await?;
    tx.chunk(chunk, last, rcpts.len()).await
}

/// After a failure: a connection that still answers is reset and pooled; a broken one
/// is dropped.
async fn release(shared: &Shared, mut tx: LmtpConn, e: &HandoffError) {
    if e.connection_usable() && tx.rset().await.is_ok() {
        shared.pool.put(tx);
    }
}

async fn fail(shared: &Shared, msg: &mut Msg, e: HandoffError) {
    tracing::warn!(queue_id = %msg.queue_id(), error = %e, "handoff to cofferd failed");
    msg.failed = Some(e.to_string());
    msg.buf = Vec::new();
    if let Some(tx) = msg.tx.take() {
        release(shared, tx, &e).await;
    }
}

/// The `MAIL FROM:` line: the sender, the original `BODY=`/`SMTPUTF8` (what cofferd
/// takes; every original parameter also travels in XCOFFER), and `XCOFFER=`. When the
/// line would be too long, the per-recipient macros, then the recipient parameters are
/// left out of XCOFFER.
fn mail_line(facts: &ConnFacts<'_>, msg: &Msg) -> String {
    let mut line = format!("MAIL FROM:<{}>", msg.sender);
    for p in &msg.mail_params {
        let key = p.split('=').next().unwrap_or("");
        if key.eq_ignore_ascii_case("BODY") || key.eq_ignore_ascii_case("SMTPUTF8") {
            line.push(' ');
            line.push_str(p);
        }
    }
    let mut x = xcoffer(facts, msg);
    let fits = |encoded: &str| line.len() + " XCOFFER=".len() + encoded.len() + 2 <= MAX_MAIL_LINE;
    let mut encoded = coffer_proto::encode(&x);
    if !fits(&encoded) {
        x.macros.retain(|k, _| !k.contains('#'));
        tracing::info!(queue_id = %msg.queue_id(), "XCOFFER too long: per-recipient macros left out");
        encoded = coffer_proto::encode(&x);
    }
    if !fits(&encoded) {
        x.rcpt_params.clear();
        tracing::info!(queue_id = %msg.queue_id(), "XCOFFER too long: recipient parameters left out");
        encoded = coffer_proto::encode(&x);
    }
    line.push_str(" XCOFFER=");
    line.push_str(&encoded);
    line
}

/// What standard LMTP cannot carry faithfully (docs/milter.md "Metadata").
fn xcoffer(facts: &ConnFacts<'_>, msg: &Msg) -> Xcoffer {
    let mut macros = facts.macros.clone();
    macros.extend(msg.macros.iter().map(|(k, v)| (k.clone(), v.clone())));
    macros.retain(|k, _| !k.is_empty());
    let get = |k: &str| macros.get(k).filter(|v| !v.is_empty()).cloned();
    let tls = if get("{tls_version}").is_some() || get("{cipher}").is_some() {
        Some(TlsInfo {
            version: get("{tls_version}"),
            cipher: get("{cipher}"),
            bits: get("{cipher_bits}").and_then(|b| b.parse().ok()),
            peer_subject: get("{cert_subject}"),
            peer_issuer: get("{cert_issuer}"),
            peer_verified: None,
        })
    } else {
        None
    };
    let client_addr = facts
        .client_addr
        .map(str::to_owned)
        .or_else(|| get("{client_addr}"));
    let client_name = facts
        .client_name
        .map(str::to_owned)
        .or_else(|| get("{client_name}"));
    let (auth_user, queue_id) = (get("{auth_authen}"), get("i"));
    Xcoffer {
        mail_params: msg.mail_params.clone(),
        rcpt_params: if msg.rcpt_params.iter().any(|p| !p.is_empty()) {
            msg.rcpt_params.clone()
        } else {
            Vec::new()
        },
        client_addr,
        client_name,
        helo: facts.helo.map(str::to_owned),
        auth_user,
        tls,
        queue_id,
        macros,
        ..Xcoffer::default()
    }
}

/// Ends a message that will not reach end-of-message: resets its transaction.
async fn drop_message(shared: &Shared, msg: Option<Msg>) {
    let Some(mut msg) = msg else {
        return;
    };
    if let Some(mut tx) = msg.tx.take() {
        tracing::debug!(queue_id = %msg.queue_id(), "message aborted; resetting its transaction");
        if tx.rset().await.is_ok() {
            shared.pool.put(tx);
        }
    }
}

async fn eom(shared: &Shared, cx: &mut EomContext<Conn>) -> Status {
    let Some(conn) = cx.data.as_mut() else {
        return Status::Continue;
    };
    let Some(mut msg) = conn.msg.take() else {
        return Status::Continue;
    };
    let eom_started = Instant::now();
    let config = shared.config();
    take_macros(&cx.macros, &mut msg.macros);
    end_headers(&mut msg);
    let result = match msg.failed.take() {
        Some(reason) => Err(reason),
        None => {
            let facts = ConnFacts::of(conn);
            let chunk = std::mem::take(&mut msg.buf);
            match send(shared, &facts, &mut msg, &chunk, true).await {
                Ok(reply) => Ok(reply.unwrap_or_default()),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    // Negotiated with the MTA when the connection began, and still configured.
    let add_header = conn.add_header && config.add_header;
    let ms = msg.started.elapsed().as_millis();
    shared
        .eom_latency
        .record(eom_started.elapsed(), result.is_ok());
    match result {
        Ok(reply) => {
            // `2.0.0 Ok: <arrival id> <message id>`
            let mut words = reply.rsplit(' ');
            let message_id = words.next().unwrap_or("").to_owned();
            let arrival_id = words.next().unwrap_or("").to_owned();
            tracing::info!(queue_id = %msg.queue_id(), arrival = %arrival_id,
                message = %message_id, size = msg.size, rcpts = msg.rcpts.len(), ms,
                "archived");
            if add_header && !message_id.is_empty() {
                let value = if conn.leading_space {
                    format!(" {message_id}")
                } else {
                    message_id.clone()
                };
                if let Err(e) = cx.actions.add_header(ARCHIVED_HEADER, value).await {
                    tracing::warn!(queue_id = %msg.queue_id(), error = %e,
                        "could not add {ARCHIVED_HEADER}");
                }
            }
            Status::Continue
        }
        Err(reason) => match config.on_failure {
            OnFailure::Tempfail => {
                tracing::warn!(queue_id = %msg.queue_id(), reason = %reason, ms,
                    "not archived; answering 451 so the MTA keeps the message and retries");
                let text = reply_text(&reason);
                if cx
                    .reply
                    .set_error_reply("451", Some("4.3.0"), [text])
                    .is_err()
                {
                    let _ = cx
                        .reply
                        .set_error_reply("451", Some("4.3.0"), ["archive unavailable"]);
                }
                Status::Tempfail
            }
            OnFailure::Accept => {
                tracing::error!(queue_id = %msg.queue_id(), reason = %reason, ms,
                    "NOT ARCHIVED: on_failure = \"accept\" lets this message through \
                     without an archived copy");
                Status::Continue
            }
        },
    }
}

/// Text safe for an SMTP reply line: printable ASCII, at most 200 characters.
fn reply_text(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(200)
        .collect();
    if t.trim().is_empty() {
        "archive unavailable".into()
    } else {
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_text_is_safe() {
        assert_eq!(reply_text("a\r\nb"), "a??b");
        assert_eq!(reply_text(""), "archive unavailable");
        assert_eq!(reply_text(&"x".repeat(500)).len(), 200);
        assert_eq!(reply_text("caf\u{e9}"), "caf?");
    }

    #[test]
    fn unbracket_paths() {
        assert_eq!(unbracket("<a@b>"), "a@b");
        assert_eq!(unbracket("<>"), "");
        assert_eq!(unbracket("a@b"), "a@b");
    }

    fn msg() -> Msg {
        let mut m = Msg::new(
            "a@b.test".into(),
            vec!["SIZE=10".into(), "BODY=8BITMIME".into(), "RET=HDRS".into()],
        );
        m.rcpts = vec!["c@d.test".into()];
        m.rcpt_params = vec![vec!["NOTIFY=NEVER".into()]];
        m.macros.insert("i".into(), "4ABCDEF".into());
        m.macros.insert("{auth_authen}".into(), "alice".into());
        m.macros.insert("{rcpt_mailer}#1".into(), "smtp".into());
        m
    }

    fn conn() -> Conn {
        Conn {
            macros: [
                ("{tls_version}".to_owned(), "TLSv1.3".to_owned()),
                ("{cipher_bits}".to_owned(), "256".to_owned()),
                ("{cipher}".to_owned(), "TLS_AES_256_GCM_SHA384".to_owned()),
                ("j".to_owned(), "mx.test".to_owned()),
            ]
            .into(),
            client_name: Some("client.test".into()),
            client_addr: Some("192.0.2.1:1234".into()),
            helo: Some("evil \u{1} helo".into()),
            ..Conn::default()
        }
    }

    #[test]
    fn mail_line_carries_what_cofferd_takes_and_xcoffer_the_rest() {
        let line = mail_line(&ConnFacts::of(&conn()), &msg());
        let (head, value) = line.split_once(" XCOFFER=").unwrap();
        assert_eq!(head, "MAIL FROM:<a@b.test> BODY=8BITMIME");
        let x = coffer_proto::decode(value).unwrap();
        assert_eq!(x.mail_params, ["SIZE=10", "BODY=8BITMIME", "RET=HDRS"]);
        assert_eq!(x.rcpt_params, [["NOTIFY=NEVER"]]);
        assert_eq!(x.queue_id.as_deref(), Some("4ABCDEF"));
        assert_eq!(x.auth_user.as_deref(), Some("alice"));
        assert_eq!(x.helo.as_deref(), Some("evil \u{1} helo"));
        assert_eq!(x.client_addr.as_deref(), Some("192.0.2.1:1234"));
        let tls = x.tls.unwrap();
        assert_eq!(tls.bits, Some(256));
        assert_eq!(tls.version.as_deref(), Some("TLSv1.3"));
        assert_eq!(x.macros["j"], "mx.test");
        assert_eq!(x.macros["{rcpt_mailer}#1"], "smtp");
    }

    #[test]
    fn a_huge_envelope_still_fits_the_mail_line() {
        let mut m = msg();
        for i in 2..=1000 {
            m.rcpts.push(format!("r{i}@d.test"));
            m.rcpt_params
                .push(vec![format!("ORCPT=rfc822;r{i}@d.test")]);
            m.macros
                .insert(format!("{{rcpt_addr}}#{i}"), format!("r{i}@d.test"));
        }
        let line = mail_line(&ConnFacts::of(&conn()), &m);
        assert!(line.len() + 2 <= MAX_MAIL_LINE, "{}", line.len());
        let x = coffer_proto::decode(line.split_once(" XCOFFER=").unwrap().1).unwrap();
        assert!(x.rcpt_params.is_empty());
        assert!(!x.macros.keys().any(|k| k.contains('#')));
        assert_eq!(x.queue_id.as_deref(), Some("4ABCDEF"));
    }
}
