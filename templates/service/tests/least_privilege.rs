//! P14 for skeleton: `skeleton_app` is confined to DML on its own database. The other database
//! it must not reach is one the test creates, owned by other roles, so the proof does not
//! depend on which services exist.

#[tokio::test]
async fn the_app_role_is_confined_to_dml_on_its_own_database() {
    let db = keel_testkit::TestDb::create(skeleton::NAME, &skeleton::MIGRATOR).await;
    let other = keel_testkit::TestDb::create("platform", &keel_pg::PLATFORM_MIGRATOR).await;
    keel_testkit::privilege::assert_app_role_is_confined(&db, &[&other.name]).await;
}
