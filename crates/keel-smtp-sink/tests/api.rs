//! The HTTP API, read as a test written for Mailpit would read it: field names, order, the
//! `latest` id, delete. Mail goes in with lettre, the client notification uses.
#![allow(clippy::unwrap_used)]

mod support;

use lettre::AsyncTransport;
use lettre::message::MultiPart;
use reqwest::StatusCode;
use serde_json::Value;
use support::{http, mailer, message, start_default, url};

async fn get_json(client: &reqwest::Client, url: String) -> Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_message_sent_with_lettre_is_listed_and_readable_with_mailpits_field_names() {
    let sink = start_default().await;
    let client = http();
    let email = lettre::Message::builder()
        .from("Keel <noreply@keel.test>".parse().unwrap())
        .to("ada@example.test".parse().unwrap())
        .to("bob@example.test".parse().unwrap())
        .message_id(Some("<order-42@keel.test>".into()))
        .subject("Order 42 confirmed")
        .body("Thanks for your order.\nIt ships tomorrow.\n".to_owned())
        .unwrap();
    mailer(&sink).send(email).await.unwrap();

    let list = get_json(&client, url(&sink, "/api/v1/messages")).await;
    assert_eq!(list["total"], 1);
    let summary = &list["messages"][0];
    assert_eq!(summary["From"]["Address"], "noreply@keel.test");
    assert_eq!(summary["To"][0]["Address"], "ada@example.test");
    assert_eq!(summary["To"][1]["Address"], "bob@example.test");
    assert_eq!(summary["Subject"], "Order 42 confirmed");
    assert_eq!(summary["MessageID"], "order-42@keel.test");
    let created = summary["Created"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{created}"
    );

    let id = summary["ID"].as_str().unwrap();
    let detail = get_json(&client, url(&sink, &format!("/api/v1/message/{id}"))).await;
    assert_eq!(detail["ID"], id);
    assert_eq!(detail["Subject"], "Order 42 confirmed");
    // lettre ends DATA with CRLF "." CRLF after a body that already ends in CRLF, so the
    // message as sent ends in an empty line; the comparison ignores trailing line ends.
    let text = detail["Text"].as_str().unwrap();
    assert_eq!(
        text.trim_end(),
        "Thanks for your order.\nIt ships tomorrow."
    );
    assert_eq!(detail["Headers"]["Subject"][0], "Order 42 confirmed");
    assert_eq!(
        detail["Headers"]["To"][0],
        "ada@example.test, bob@example.test"
    );

    let headers = get_json(
        &client,
        url(&sink, &format!("/api/v1/message/{id}/headers")),
    )
    .await;
    assert_eq!(
        headers["Message-Id"][0], "<order-42@keel.test>",
        "Go's canonical name"
    );

    let raw = client
        .get(url(&sink, &format!("/api/v1/message/{id}/raw")))
        .send()
        .await
        .unwrap();
    let raw = raw.bytes().await.unwrap();
    assert_eq!(&raw[..], sink.messages()[0].data());
}

#[tokio::test]
async fn messages_are_listed_newest_first_and_latest_is_the_newest() {
    let sink = start_default().await;
    let client = http();
    for n in 1..=3 {
        let email = message("b@keel.test", &format!("message {n}"), "body");
        mailer(&sink).send(email).await.unwrap();
    }

    let list = get_json(&client, url(&sink, "/api/v1/messages")).await;
    let subjects: Vec<_> = list["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects, ["message 3", "message 2", "message 1"]);

    let page = get_json(&client, url(&sink, "/api/v1/messages?start=1&limit=1")).await;
    assert_eq!(page["total"], 3);
    assert_eq!(page["messages"][0]["Subject"], "message 2");

    let latest = get_json(&client, url(&sink, "/api/v1/message/latest")).await;
    assert_eq!(latest["Subject"], "message 3");
}

#[tokio::test]
async fn delete_removes_every_message() {
    let sink = start_default().await;
    let client = http();
    for subject in ["one", "two"] {
        mailer(&sink)
            .send(message("b@keel.test", subject, "x"))
            .await
            .unwrap();
    }

    let deleted = client
        .delete(url(&sink, "/api/v1/messages"))
        .send()
        .await
        .unwrap();

    assert_eq!(deleted.status(), StatusCode::OK);
    let list = get_json(&client, url(&sink, "/api/v1/messages")).await;
    assert_eq!(list["total"], 0);
    assert_eq!(list["messages"], serde_json::json!([]));
    assert!(sink.messages().is_empty());
}

#[tokio::test]
async fn delete_with_ids_removes_only_those() {
    let sink = start_default().await;
    let client = http();
    for subject in ["keep", "drop"] {
        mailer(&sink)
            .send(message("b@keel.test", subject, "x"))
            .await
            .unwrap();
    }
    let drop_id = sink.messages()[1].id().to_string();

    client
        .delete(url(&sink, "/api/v1/messages"))
        .json(&serde_json::json!({ "IDs": [drop_id] }))
        .send()
        .await
        .unwrap();

    let subjects: Vec<_> = sink
        .messages()
        .iter()
        .map(|m| m.subject().to_owned())
        .collect();
    assert_eq!(subjects, ["keep"]);
}

#[tokio::test]
async fn an_unknown_message_is_a_404_problem() {
    let sink = start_default().await;
    let client = http();

    for path in [
        "/api/v1/message/latest",
        "/api/v1/message/0190a0a0-0000-7000-8000-000000000000",
        "/api/v1/message/not-an-id/headers",
        "/api/v2/nothing",
    ] {
        let response = client.get(url(&sink, path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{path}"
        );
    }
}

/// lettre encodes a non-ASCII subject as RFC 2047 words and picks quoted-printable or base64
/// for the body; the API shows both decoded, as Mailpit does.
#[tokio::test]
async fn non_ascii_subject_and_body_are_shown_decoded() {
    let sink = start_default().await;
    let client = http();
    let body = "Grüße aus Zürich — your order ships “tomorrow”.\n".repeat(3);
    let subject = "Bestellung bestätigt: Größe XL, Farbe grün, Lieferung nach Zürich";
    mailer(&sink)
        .send(message("b@keel.test", subject, &body))
        .await
        .unwrap();

    let detail = get_json(&client, url(&sink, "/api/v1/message/latest")).await;

    assert_eq!(detail["Subject"], subject);
    assert_eq!(detail["Text"].as_str().unwrap().trim_end(), body.trim_end());
    assert_ne!(
        sink.messages()[0].header("subject").as_deref(),
        Some(subject),
        "sent encoded"
    );
}

#[tokio::test]
async fn multipart_alternative_gives_text_and_html() {
    let sink = start_default().await;
    let client = http();
    let email = lettre::Message::builder()
        .from("noreply@keel.test".parse().unwrap())
        .to("b@keel.test".parse().unwrap())
        .subject("both")
        .multipart(MultiPart::alternative_plain_html(
            "plain words\n".to_owned(),
            "<p>html words</p>".to_owned(),
        ))
        .unwrap();
    mailer(&sink).send(email).await.unwrap();

    let detail = get_json(&client, url(&sink, "/api/v1/message/latest")).await;

    assert_eq!(detail["Text"], "plain words\n");
    assert_eq!(detail["HTML"], "<p>html words</p>");
}

#[tokio::test]
async fn livez_answers_ok() {
    let sink = start_default().await;

    let response = http().get(url(&sink, "/livez")).send().await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "ok");
}
