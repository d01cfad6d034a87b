//! P14 for notification: `notification_app` is confined to DML on `keel_notification`.

#[tokio::test]
async fn notification_app_role_is_confined_to_dml_on_its_own_database() {
    let db = keel_testkit::TestDb::create("notification", &notification::MIGRATOR).await;
    keel_testkit::privilege::assert_app_role_is_confined(&db, &["keel_checkout", "keel_billing"])
        .await;
}
