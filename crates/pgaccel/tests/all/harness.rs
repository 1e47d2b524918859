//! A proxy in front of a throwaway Postgres: the origin database `app` owned by role `app`, and a
//! `[[database]] main` of tenant `acme` with two proxy users, plus any extra configuration a
//! test adds.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use cordon_config::Config;
use cordon_pgaccel::accel::{Accelerator, DatabaseStats};
use cordon_pgaccel::proxy::{ProxySettings, serve};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};

use cordon_testpg::TestPostgres;

pub const APP_PASSWORD: &str = "origin-secret-Vq3";
pub const ACME_APP_PASSWORD: &str = "acme-app-pw";
pub const ACME_RO_PASSWORD: &str = "acme-ro-pw";
pub const GLOBEX_PASSWORD: &str = "globex-pw";

pub struct Proxy {
    pub pg: TestPostgres,
    pub accel: Arc<Accelerator>,
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
}

impl Proxy {
    /// Starts Postgres and the proxy. `database_extra` is appended to the `[[database]] main`
    /// table (e.g. `pool_size = 2`); `cache` is the body of its `[database.cache]` table.
    pub async fn start(database_extra: &str, cache: &str) -> Proxy {
        Proxy::start_with(database_extra, cache, ProxySettings::new(None, false)).await
    }

    /// Like [`Proxy::start`], with the listener's TLS settings.
    pub async fn start_with(database_extra: &str, cache: &str, settings: ProxySettings) -> Proxy {
        let pg = TestPostgres::start();
        pg.create_role_and_database("app", APP_PASSWORD, "app").await;
        pg.create_role_and_database("globex_origin", "globex-origin-pw", "globex").await;
        let port = pg.port;
        let text = format!(
            r#"
[postgres_proxy]
listen = "127.0.0.1:0"

[[database]]
name = "main"
tenant = "acme"
origin = "postgres://app@127.0.0.1:{port}/app"
origin_password_env = "APP_DB_PASSWORD"
{database_extra}

[[database.users]]
name = "acme_app"
password_env = "ACME_APP_PASSWORD"

[[database.users]]
name = "acme_ro"
password_env = "ACME_RO_PASSWORD"

[database.cache]
{cache}

[[database]]
name = "main"
tenant = "globex"
origin = "postgres://globex_origin@127.0.0.1:{port}/globex"
origin_password_env = "GLOBEX_DB_PASSWORD"

[[database.users]]
name = "acme_app"
password_env = "GLOBEX_PASSWORD"
"#
        );
        let config = Config::parse(Path::new("/nonexistent/cordon.toml"), &text).unwrap_or_else(|e| panic!("{e}"));
        let env: HashMap<&str, &str> = HashMap::from([
            ("APP_DB_PASSWORD", APP_PASSWORD),
            ("GLOBEX_DB_PASSWORD", "globex-origin-pw"),
            ("ACME_APP_PASSWORD", ACME_APP_PASSWORD),
            ("ACME_RO_PASSWORD", ACME_RO_PASSWORD),
            ("GLOBEX_PASSWORD", GLOBEX_PASSWORD),
        ]);
        let accel = Arc::new(Accelerator::from_config(&config, &|k| env.get(k).map(|v| v.to_string())).expect("accelerator"));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(serve(accel.clone(), listener, settings, async move {
            let _ = rx.await;
        }));
        Proxy { pg, accel, addr, shutdown: Some(tx) }
    }

    pub fn url(&self, user: &str, password: &str, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} password={password} dbname={dbname}", self.addr.port())
    }

    /// Connects as `acme_app` to `main` through the proxy.
    pub async fn client(&self) -> Client {
        self.client_as("acme_app", ACME_APP_PASSWORD, "acme.main").await
    }

    pub async fn client_as(&self, user: &str, password: &str, dbname: &str) -> Client {
        let (client, connection) = tokio_postgres::connect(&self.url(user, password, dbname), NoTls)
            .await
            .unwrap_or_else(|e| panic!("connecting through the proxy: {e:?}"));
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    /// A direct connection to the origin database, as its owner.
    pub async fn origin(&self) -> Client {
        cordon_testpg::connect(&self.pg.url_as("app", APP_PASSWORD, "app")).await
    }

    pub fn stats(&self) -> DatabaseStats {
        self.accel.database("acme", "main").unwrap().stats()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Waits until `check` holds, for at most `secs` seconds.
pub async fn eventually(secs: u64, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
