//! The harness's own promises: every resource a test gets exists while the test runs, is
//! its own, and is gone afterwards — so tests run in parallel and leave nothing behind.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use keel_testkit::{Stack, TestRedis, TestVhost, eventually};

#[tokio::test]
async fn a_redis_prefix_is_private_and_its_keys_are_removed_on_drop() {
    let (a, b) = (
        TestRedis::create("checkout").await,
        TestRedis::create("checkout").await,
    );
    assert!(a.prefix.starts_with("checkout:"), "{}", a.prefix);
    assert_ne!(a.prefix, b.prefix);
    let client = redis::Client::open(a.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{}stock", a.prefix);
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let other: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", b.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(other.is_empty(), "b sees none of a's keys");
    drop(a);
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 0, "dropping the prefix deleted its keys");
}

async fn vhost_exists(name: &str) -> bool {
    let stack = Stack::load();
    reqwest::Client::new()
        .get(format!("{}/api/vhosts/{name}", stack.amqp_mgmt_base()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .unwrap()
        .status()
        == 200
}

#[tokio::test]
async fn a_vhost_exists_while_held_and_is_deleted_on_drop() {
    let vhost = TestVhost::create().await;
    let name = vhost.name.clone();
    assert!(vhost_exists(&name).await);
    // It is usable by the AMQP client, not just listed.
    let conn = lapin::Connection::connect(&vhost.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();
    drop(vhost);
    assert!(!vhost_exists(&name).await);
}

#[tokio::test]
async fn eventually_returns_as_soon_as_the_condition_holds() {
    let start = tokio::time::Instant::now();
    let mut n = 0;
    let v = eventually(Duration::from_secs(5), "third poll", || {
        n += 1;
        let n = n;
        async move { (n >= 3).then_some(n) }
    })
    .await;
    assert_eq!(v, 3);
    assert!(start.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
#[should_panic(expected = "condition not met within")]
async fn eventually_fails_with_the_condition_named_after_the_deadline() {
    eventually(Duration::from_millis(50), "never true", || async {
        None::<()>
    })
    .await;
}

#[tokio::test]
async fn a_test_database_is_migrated_private_and_dropped_on_drop() {
    use sqlx::Connection;
    // A migration set of its own (so its own template), under the checkout roles.
    let dir = std::env::temp_dir().join(format!("keel-testkit-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("0001_grants.sql"),
        "GRANT USAGE ON SCHEMA public TO checkout_app;\n\
         ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT, INSERT ON TABLES TO checkout_app;",
    )
    .unwrap();
    std::fs::write(dir.join("0002_things.sql"), "CREATE TABLE things (id int);").unwrap();
    let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();

    let (a, b) = (
        keel_testkit::TestDb::create("checkout", &migrator).await,
        keel_testkit::TestDb::create("checkout", &migrator).await,
    );
    assert_ne!(a.name, b.name);
    let mut conn = sqlx::PgConnection::connect(&a.app_url()).await.unwrap();
    sqlx::query("INSERT INTO things VALUES (1)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut other = sqlx::PgConnection::connect(&b.app_url()).await.unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM things")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(n, 0, "b does not see a's rows");
    drop((conn, other));

    let name = a.name.clone();
    drop(a);
    let stack = Stack::load();
    let mut admin = sqlx::PgConnection::connect(&stack.admin_url("postgres"))
        .await
        .unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "dropped with the value");
    let _ = std::fs::remove_dir_all(&dir);
}
