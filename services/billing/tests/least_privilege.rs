//! P14 for billing: `billing_app` is confined to DML on `keel_billing`.

#[tokio::test]
async fn billing_app_role_is_confined_to_dml_on_its_own_database() {
    let db = keel_testkit::TestDb::create("billing", &billing::MIGRATOR).await;
    keel_testkit::privilege::assert_app_role_is_confined(
        &db,
        &["keel_checkout", "keel_notification"],
    )
    .await;
}
