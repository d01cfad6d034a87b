//! The `keel-smtp-sink` binary as scripts use it: started on port 0, addresses read from its
//! stdout, stopped with SIGTERM; bad arguments exit 64.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::Stdio;

use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use support::{DEADLINE, http, message};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_keel-smtp-sink");

fn sink_command() -> Command {
    let mut command = Command::new(BIN);
    // Keep the test independent of the environment it runs in.
    for var in [
        "KEEL_SMTP_SINK_SMTP",
        "KEEL_SMTP_SINK_HTTP",
        "KEEL_SMTP_SINK_MAX_MESSAGES",
    ] {
        command.env_remove(var);
    }
    command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Reads the two `... listening on ADDR` lines: (smtp, http).
async fn listening(child: &mut Child) -> (SocketAddr, SocketAddr) {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut next = async || {
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .unwrap()
            .unwrap();
        line.expect("a line on stdout")
    };
    let smtp = next().await;
    let http = next().await;
    let addr = |line: &str, prefix: &str| -> SocketAddr {
        line.strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{line:?} starts with {prefix:?}"))
            .parse()
            .unwrap()
    };
    (
        addr(&smtp, "smtp listening on "),
        addr(&http, "http listening on "),
    )
}

#[tokio::test]
async fn the_binary_serves_on_the_ports_it_prints_and_stops_on_sigterm() {
    let mut child = sink_command()
        .args(["--smtp", "127.0.0.1:0"])
        .env("KEEL_SMTP_SINK_HTTP", "127.0.0.1:0")
        .spawn()
        .unwrap();
    let (smtp, api) = listening(&mut child).await;
    assert!(smtp.ip().is_loopback() && api.ip().is_loopback());

    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(smtp.ip().to_string())
        .port(smtp.port())
        .build();
    mailer
        .send(message("b@keel.test", "via the binary", "hi"))
        .await
        .unwrap();
    let list: serde_json::Value = http()
        .get(format!("http://{api}/api/v1/messages"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["messages"][0]["Subject"], "via the binary");

    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0), "a clean stop after SIGTERM");
}

#[tokio::test]
async fn a_bad_flag_exits_64_with_a_message() {
    let output = sink_command()
        .args(["--smtp", "not-an-address"])
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--smtp"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing claims to listen");
}

#[tokio::test]
async fn a_zero_bound_from_the_environment_exits_64() {
    let output = sink_command()
        .env("KEEL_SMTP_SINK_MAX_MESSAGES", "0")
        .output()
        .await
        .unwrap();

    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("greater than zero"), "{stderr}");
    assert!(stderr.contains("KEEL_SMTP_SINK_"), "{stderr}");
}
