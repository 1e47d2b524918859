//! The test cluster itself: SCRAM over TCP, tenant roles, restarts.

use tokio_postgres::error::SqlState;

use cordon_testpg::{TestPostgres, connect};

#[tokio::test]
async fn superuser_connects_with_scram_and_nothing_is_trusted_over_tcp() {
    let pg = TestPostgres::start();
    let client = pg.connect("postgres").await;
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let user: String = client.query_one("SELECT current_user::text", &[]).await.unwrap().get(0);
    assert_eq!(user, pg.superuser());
    let stored: String = client.query_one("SELECT rolpassword FROM pg_authid WHERE rolname = current_user", &[]).await.unwrap().get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "the password is stored as a SCRAM verifier");

    let wrong = pg.url_as(pg.superuser(), "not-the-password", "postgres");
    let err = tokio_postgres::connect(&wrong, tokio_postgres::NoTls).await.err().expect("a wrong password is refused");
    assert_eq!(err.code(), Some(&SqlState::INVALID_PASSWORD), "{err:?}");
    let none = format!("host=127.0.0.1 port={} user={} dbname=postgres", pg.port, pg.superuser());
    let err = tokio_postgres::connect(&none, tokio_postgres::NoTls).await.err().expect("no password is refused");
    assert!(format!("{err:?}").contains("password missing"), "{err:?}");
}

#[tokio::test]
async fn tenant_role_owns_its_database_and_only_it_connects() {
    let pg = TestPostgres::start();
    pg.create_role_and_database("tenant_a", "secret-a", "db_a").await;
    pg.create_role_and_database("tenant b", "it's secret", "db b").await;

    let a = connect(&pg.url_as("tenant_a", "secret-a", "db_a")).await;
    let row = a.query_one("SELECT current_user::text, current_database()::text", &[]).await.unwrap();
    assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("tenant_a".into(), "db_a".into()));
    a.batch_execute("CREATE TABLE notes (body text); INSERT INTO notes VALUES ('hello')").await.unwrap();

    let b = connect(&pg.url_as("tenant b", "it's secret", "db b")).await;
    let db: String = b.query_one("SELECT current_database()::text", &[]).await.unwrap().get(0);
    assert_eq!(db, "db b");

    let cross = pg.url_as("tenant b", "it's secret", "db_a");
    let err = tokio_postgres::connect(&cross, tokio_postgres::NoTls).await.err().expect("tenant b cannot open db_a");
    assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err:?}");
}

#[tokio::test]
async fn restart_keeps_the_port_and_the_data() {
    let pg = TestPostgres::start();
    let port = pg.port;
    let client = pg.connect("postgres").await;
    client.batch_execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (42)").await.unwrap();

    pg.restart();
    assert!(client.query_one("SELECT 1", &[]).await.is_err(), "the old connection was closed by the restart");
    assert_eq!(pg.port, port);
    let client = pg.connect("postgres").await;
    let n: i32 = client.query_one("SELECT n FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);

    pg.stop();
    let url = pg.url("postgres");
    assert!(tokio_postgres::connect(&url, tokio_postgres::NoTls).await.is_err(), "a stopped server refuses");
    pg.start_again();
    let client = pg.connect("postgres").await;
    let n: i32 = client.query_one("SELECT n FROM kept", &[]).await.unwrap().get(0);
    assert_eq!(n, 42);
}

#[tokio::test]
async fn clusters_in_one_process_are_separate_and_removed_on_drop() {
    let first = TestPostgres::start();
    let second = TestPostgres::start();
    assert_ne!(first.port, second.port);
    assert_ne!(first.data_dir, second.data_dir);
    assert_ne!(first.password(), second.password());
    assert!(first.socket_dir.join(format!(".s.PGSQL.{}", first.port)).exists());

    first.connect("postgres").await.batch_execute("CREATE DATABASE only_in_first").await.unwrap();
    let err = tokio_postgres::connect(&second.url("only_in_first"), tokio_postgres::NoTls).await.err();
    assert!(err.is_some(), "the second cluster does not see the first one's database");

    let dir = first.socket_dir.clone();
    drop(first);
    assert!(!dir.exists(), "drop removes the cluster's directory");
    second.connect("postgres").await.query_one("SELECT 1", &[]).await.unwrap();
}
