//! The SMTP side, over real sockets: the conversation, and every bound doing its job (the
//! bound is hit, the sink answers as documented, and the sink is still usable afterwards).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use keel_smtp_sink::SinkConfig;
use lettre::AsyncTransport;
use support::{RawClient, mailer, message, start, start_default};

#[tokio::test]
async fn a_message_sent_with_lettre_is_stored_with_its_envelope_and_subject() {
    let sink = start_default().await;

    mailer(&sink)
        .send(message(
            "Ada <ada@example.test>",
            "Order 42 confirmed",
            "Thanks!",
        ))
        .await
        .unwrap();

    let messages = sink.messages();
    assert_eq!(messages.len(), 1, "stored before the 250, so no waiting");
    let stored = &messages[0];
    assert_eq!(stored.from(), "noreply@keel.test");
    assert_eq!(stored.to(), ["ada@example.test"]);
    assert_eq!(stored.subject(), "Order 42 confirmed");
    assert_eq!(stored.text().trim_end(), "Thanks!");
    sink.shutdown().await;
}

#[tokio::test]
async fn ehlo_advertises_8bitmime_and_size_and_nothing_else() {
    let sink = start(SinkConfig {
        max_message_bytes: 4096,
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut client = RawClient::connect(sink.smtp_addr()).await;
    assert_eq!(client.reply().await.code, 220);

    let ehlo = client.command("EHLO client.test").await;

    assert_eq!(ehlo.code, 250);
    assert_eq!(ehlo.lines[1..], ["8BITMIME", "SIZE 4096"]);
    assert_eq!(client.command("STARTTLS").await.code, 502);
    assert_eq!(client.command("AUTH PLAIN AGEAYg==").await.code, 502);
    assert_eq!(client.command("FROBNICATE").await.code, 500);
    assert_eq!(client.command("NOOP").await.code, 250);
    assert_eq!(client.command("QUIT").await.code, 221);
    assert!(client.until_closed().await.is_empty(), "QUIT closes");
}

#[tokio::test]
async fn commands_out_of_order_get_503() {
    let sink = start_default().await;
    let mut client = RawClient::connect(sink.smtp_addr()).await;
    assert_eq!(client.reply().await.code, 220);

    assert_eq!(
        client.command("MAIL FROM:<a@keel.test>").await.code,
        503,
        "before EHLO"
    );
    assert_eq!(client.command("HELO client.test").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@keel.test>").await.code,
        503,
        "before MAIL"
    );
    assert_eq!(client.command("DATA").await.code, 503, "before MAIL");
    assert_eq!(client.command("MAIL FROM:<a@keel.test>").await.code, 250);
    assert_eq!(client.command("DATA").await.code, 503, "before RCPT");
    assert_eq!(client.command("RSET").await.code, 250);
    assert_eq!(
        client.command("RCPT TO:<b@keel.test>").await.code,
        503,
        "RSET ended it"
    );
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn leading_dots_are_unstuffed_and_the_lone_dot_ends_the_message() {
    let sink = start_default().await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    let reply = client
        .send_message(b"Subject: dots\r\n\r\n..\r\n..leading dot\r\nno.dot\r\n.\r\n")
        .await;

    assert_eq!(reply.code, 250);
    let messages = sink.messages();
    assert_eq!(
        messages[0].data(),
        b"Subject: dots\r\n\r\n.\r\n.leading dot\r\nno.dot\r\n"
    );
}

/// lettre stuffs, the sink unstuffs: a body line that starts with "." arrives intact.
#[tokio::test]
async fn a_body_line_starting_with_a_dot_survives_lettre_and_the_sink() {
    let sink = start_default().await;

    let body = "first\n.\n.second\n..third\n";
    mailer(&sink)
        .send(message("b@keel.test", "dots", body))
        .await
        .unwrap();

    // Trailing line ends aside: lettre adds an empty last line (see api.rs).
    assert_eq!(sink.messages()[0].text().trim_end(), body.trim_end());
}

#[tokio::test]
async fn an_oversize_message_is_refused_with_552_and_the_connection_stays_usable() {
    let sink = start(SinkConfig {
        max_message_bytes: 1024,
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    let line = "x".repeat(100);
    let big = format!(
        "Subject: big\r\n\r\n{}.\r\n",
        format!("{line}\r\n").repeat(20)
    );
    assert_eq!(client.send_message(big.as_bytes()).await.code, 552);
    assert!(sink.messages().is_empty());

    let small = client
        .send_message(b"Subject: small\r\n\r\nok\r\n.\r\n")
        .await;
    assert_eq!(small.code, 250, "same connection, next message");
    assert_eq!(
        client
            .command("MAIL FROM:<a@keel.test> SIZE=2048")
            .await
            .code,
        552
    );
    assert_eq!(sink.messages().len(), 1);
}

#[tokio::test]
async fn a_real_client_is_told_552_for_an_oversize_message() {
    let sink = start(SinkConfig {
        max_message_bytes: 1024,
        ..SinkConfig::ephemeral()
    })
    .await;

    let refused = mailer(&sink)
        .send(message("b@keel.test", "big", &"y".repeat(4000)))
        .await
        .unwrap_err();

    assert!(refused.is_permanent(), "{refused}");
    assert_eq!(
        refused.status().map(|code| code.to_string()).as_deref(),
        Some("552")
    );
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn a_command_line_over_1000_bytes_is_refused_with_500_and_the_session_goes_on() {
    let sink = start_default().await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    let long = format!("MAIL FROM:<{}@keel.test>", "a".repeat(1000));
    assert_eq!(client.command(&long).await.code, 500);

    assert_eq!(client.command("MAIL FROM:<a@keel.test>").await.code, 250);
}

#[tokio::test]
async fn a_data_line_over_1000_bytes_refuses_the_message_with_500() {
    let sink = start_default().await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    let data = format!(
        "Subject: long\r\n\r\n{}\r\nafter\r\n.\r\n",
        "z".repeat(1200)
    );
    assert_eq!(client.send_message(data.as_bytes()).await.code, 500);
    assert!(sink.messages().is_empty());

    let ok = client
        .send_message(b"Subject: fine\r\n\r\nok\r\n.\r\n")
        .await;
    assert_eq!(ok.code, 250, "the connection stays usable");
}

#[tokio::test]
async fn the_101st_recipient_gets_452() {
    let sink = start_default().await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;
    assert_eq!(client.command("MAIL FROM:<a@keel.test>").await.code, 250);

    for n in 0..100 {
        assert_eq!(
            client
                .command(&format!("RCPT TO:<r{n}@keel.test>"))
                .await
                .code,
            250
        );
    }
    assert_eq!(
        client
            .command("RCPT TO:<one-too-many@keel.test>")
            .await
            .code,
        452
    );

    assert_eq!(
        client.command("DATA").await.code,
        354,
        "the 100 still count"
    );
    client.send_raw(b"Subject: many\r\n\r\nhi\r\n.\r\n").await;
    assert_eq!(client.reply().await.code, 250);
    assert_eq!(sink.messages()[0].to().len(), 100);
}

#[tokio::test]
async fn a_connection_over_the_cap_gets_421_and_a_freed_slot_is_reused() {
    let sink = start(SinkConfig {
        max_connections: 1,
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut first = RawClient::connect(sink.smtp_addr()).await;
    assert_eq!(first.reply().await.code, 220);

    let mut second = RawClient::connect(sink.smtp_addr()).await;
    let replies = second.until_closed().await;
    assert_eq!(replies.iter().map(|r| r.code).collect::<Vec<_>>(), [421]);

    assert_eq!(first.command("QUIT").await.code, 221);
    drop(first);
    // The slot comes back when the first connection's task ends: wait for that, not for time.
    support::eventually("a new connection is greeted with 220", || async {
        let mut next = RawClient::connect(sink.smtp_addr()).await;
        next.next_reply().await.filter(|r| r.code == 220)
    })
    .await;
}

#[tokio::test]
async fn an_idle_connection_is_told_421_and_closed() {
    let sink = start(SinkConfig {
        idle_timeout: Duration::from_millis(200),
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    // Say nothing: the sink closes within the deadline (until_closed fails the test if not).
    let replies = client.until_closed().await;

    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].code, 421);
    assert!(replies[0].lines[0].contains("idle"), "{replies:?}");
}

#[tokio::test]
async fn a_full_mailbox_drops_the_oldest_message() {
    let sink = start(SinkConfig {
        max_messages: 2,
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    for n in 1..=3 {
        let data = format!("Subject: message {n}\r\n\r\nbody\r\n.\r\n");
        assert_eq!(client.send_message(data.as_bytes()).await.code, 250);
    }

    let subjects: Vec<_> = sink
        .messages()
        .iter()
        .map(|m| m.subject().to_owned())
        .collect();
    assert_eq!(subjects, ["message 2", "message 3"]);
}

/// Noise, NULs, invalid UTF-8 and a line that never ends: each connection is answered or
/// closed, and the sink still serves the next client.
#[tokio::test]
async fn garbage_never_takes_the_sink_down() {
    let sink = start(SinkConfig {
        idle_timeout: Duration::from_millis(300),
        ..SinkConfig::ephemeral()
    })
    .await;
    let mut state = 0x1234_5678_u32;
    let mut noise = || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state.to_le_bytes()[2]
    };
    let inputs: Vec<Vec<u8>> = vec![
        (0..5000).map(|_| noise()).collect(),
        b"\0\0\0\r\n\xff\xfe\r\nMAIL FROM:<\xc3\x28>\r\n".to_vec(),
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n\xff\xfe\r\n.\r\n".to_vec(),
        vec![b'A'; 50_000],
    ];
    for input in inputs {
        let mut client = RawClient::connect(sink.smtp_addr()).await;
        client.send_raw(&input).await;
        client.until_closed().await;
    }

    let mut client = RawClient::ready(sink.smtp_addr()).await;
    assert_eq!(
        client
            .send_message(b"Subject: still here\r\n\r\n.\r\n")
            .await
            .code,
        250
    );
}

#[tokio::test]
async fn shutdown_tells_open_connections_421() {
    let sink = start_default().await;
    let mut client = RawClient::ready(sink.smtp_addr()).await;

    sink.shutdown().await;

    let replies = client.until_closed().await;
    assert_eq!(replies.iter().map(|r| r.code).collect::<Vec<_>>(), [421]);
}
