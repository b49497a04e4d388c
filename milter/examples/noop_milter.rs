//! A milter that lets every message through at once: the benchmark's floor.
//!
//! `bench/milter.sh` puts it in front of a third smtpd service of the same Postfix so
//! the cost of the milter protocol itself (Postfix's side of it, one milter connection
//! per SMTP connection, every header and body chunk sent over a socket) is measured
//! beside coffer-milter in the same run. It negotiates exactly what coffer-milter does —
//! LEADING_SPACE, every NOREPLY offered, the same macro lists, a callback for every
//! stage so Postfix sends the whole message — and runs on the same kind of runtime,
//! but keeps nothing and hands nothing off.
//!
//! Not a product: it archives nothing. Usage: `noop_milter unix:PATH` (mode 0666).

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;

use coffer_milter::session::{
    CONNECT_MACROS, DATA_MACROS, EOH_MACROS, HELO_MACROS, MAIL_MACROS, NOREPLY, RCPT_MACROS,
};
use indymilter::{Callbacks, MacroStage, ProtoOpts, Status};

fn main() -> std::io::Result<()> {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let Some(path) = arg.strip_prefix("unix:") else {
        eprintln!("usage: noop_milter unix:PATH");
        std::process::exit(2);
    };
    let _ = std::fs::remove_file(path);
    let std_listener = std::os::unix::net::UnixListener::bind(path)?;
    std_listener.set_nonblocking(true)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    coffer_milter::server::runtime()?.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(std_listener)?;
        let config = indymilter::Config {
            max_connections: 256,
            ..Default::default()
        };
        let shutdown = async {
            use tokio::signal::unix::{signal, SignalKind};
            if let Ok(mut term) = signal(SignalKind::terminate()) {
                term.recv().await;
            }
        };
        indymilter::run(listener, callbacks(), config, shutdown).await
    })
}

/// Noreply where negotiated (the stages before end-of-message), else Continue.
fn go_on(noreply: Option<&ProtoOpts>, flag: ProtoOpts) -> Status {
    if noreply.is_some_and(|n| n.contains(flag)) {
        Status::Noreply
    } else {
        Status::Continue
    }
}

fn callbacks() -> Callbacks<ProtoOpts> {
    Callbacks::new()
        .on_negotiate(|cx, _actions, mta_opts| {
            Box::pin(async move {
                let mut opts = cx.requested_opts;
                let mut noreply = ProtoOpts::empty();
                if mta_opts.contains(ProtoOpts::LEADING_SPACE) {
                    opts |= ProtoOpts::LEADING_SPACE;
                }
                for flag in NOREPLY {
                    if mta_opts.contains(flag) {
                        opts |= flag;
                        noreply |= flag;
                    }
                }
                cx.requested_opts = opts;
                for (stage, list) in [
                    (MacroStage::Connect, CONNECT_MACROS),
                    (MacroStage::Helo, HELO_MACROS),
                    (MacroStage::Mail, MAIL_MACROS),
                    (MacroStage::Rcpt, RCPT_MACROS),
                    (MacroStage::Data, DATA_MACROS),
                    (MacroStage::Eoh, EOH_MACROS),
                ] {
                    cx.requested_macros
                        .insert(stage, CString::new(list).expect("no NUL"));
                }
                cx.data = Some(noreply);
                Status::Continue
            })
        })
        .on_connect(|cx, _, _| {
            Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_CONNECT) })
        })
        .on_helo(|cx, _| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_HELO) }))
        .on_mail(|cx, _| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_MAIL) }))
        .on_rcpt(|cx, _| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_RCPT) }))
        .on_data(|cx| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_DATA) }))
        .on_header(|cx, _, _| {
            Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_HEADER) })
        })
        .on_eoh(|cx| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_EOH) }))
        .on_body(|cx, _| Box::pin(async move { go_on(cx.data.as_ref(), ProtoOpts::NOREPLY_BODY) }))
        .on_eom(|_| Box::pin(async { Status::Continue }))
        .on_abort(|_| Box::pin(async { Status::Continue }))
        .on_close(|cx| {
            cx.data = None;
            Box::pin(async { Status::Continue })
        })
}
