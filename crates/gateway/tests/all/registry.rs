//! The live registry under load: deploys, rollbacks, splits, the kill
//! switch and concurrent changes, against a real server with real guests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use cordon_config::WorkerSpec;
use cordon_registry::{Deployment, Target};
use cordon_runtime::Runtime;
use cordon_runtime::registry::DeployError;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

use crate::harness::*;

const HELLO: &str = "Hello from Cordon";
const HOSTILE: &str = "ok from hostile";

/// Worker `api` of tenant `acme` on `api.localhost/`, first as `hello`.
fn api_worker() -> String {
    format!(
        r#"
[[worker]]
name = "api"
tenant = "acme"
component = "{hello}"
routes = ["api.localhost/"]

[[worker]]
name = "web"
tenant = "globex"
component = "{hello}"
routes = ["web.localhost/"]
"#,
        hello = guest("hello").display()
    )
}

fn spec(tenant: &str, name: &str, routes: &[&str]) -> WorkerSpec {
    WorkerSpec { name: name.into(), tenant: tenant.into(), routes: routes.iter().map(|r| r.to_string()).collect(), ..WorkerSpec::default() }
}

fn component(name: &str) -> Vec<u8> {
    std::fs::read(guest(name)).unwrap()
}

/// A registry change, off the async threads: it compiles.
async fn change<T: Send + 'static>(runtime: &Arc<Runtime>, f: impl FnOnce(&Runtime) -> T + Send + 'static) -> T {
    let runtime = runtime.clone();
    tokio::task::spawn_blocking(move || f(&runtime)).await.unwrap()
}

/// Which version answered: hello or hostile, and nothing else.
fn which(status: u16, body: &str) -> Result<&'static str, String> {
    match (status, body) {
        (200, b) if b.starts_with(HELLO) => Ok("hello"),
        (200, HOSTILE) => Ok("hostile"),
        (status, body) => Err(format!("{status} {body:?}")),
    }
}

/// Sends requests until `stop`, on one keep-alive connection (or a new
/// connection per request), and returns what answered each.
async fn client(addr: std::net::SocketAddr, keep_alive: bool, stop: Arc<AtomicBool>) -> Vec<Result<&'static str, String>> {
    let mut seen = Vec::new();
    let mut sender = None;
    while !stop.load(Ordering::Relaxed) {
        if !keep_alive {
            let r = request(addr, "GET", "api.localhost", "/", &[], None).await;
            seen.push(which(r.status, &r.text()).map_err(|e| format!("{e} {:?}", r.body_error)));
            continue;
        }
        if sender.is_none() {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let Some(s) = sender.as_mut() else { continue };
        // The connection's task finishes the previous exchange first.
        if let Err(e) = s.ready().await {
            seen.push(Err(format!("the server closed the connection after {} requests: {e:?}", seen.len())));
            sender = None;
            continue;
        }
        let req = http::Request::builder().uri("/").header("host", "api.localhost").body(Full::new(Bytes::new())).unwrap();
        match s.send_request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if resp.headers().get("connection").is_some_and(|v| v == "close") {
                    seen.push(Err(format!("the server asked to close the connection after {} requests", seen.len())));
                    sender = None;
                }
                match resp.into_body().collect().await {
                    Ok(body) => seen.push(which(status, &String::from_utf8_lossy(&body.to_bytes()))),
                    Err(e) => seen.push(Err(format!("body cut: {e}"))),
                }
            }
            Err(e) => seen.push(Err(format!("connection failed after {} requests: {e:?}", seen.len()))),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_deploys_and_twenty_rollbacks_under_load_fail_no_request() {
    let s = start(&api_worker()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = [true, true, false].into_iter().map(|keep| tokio::spawn(client(s.addr, keep, stop.clone()))).collect();
    let (hello, hostile) = (component("hello"), component("hostile"));
    for i in 0..20 {
        let bytes = if i % 2 == 0 { hostile.clone() } else { hello.clone() };
        let version = change(&s.runtime, move |r| r.deploy(&spec("acme", "api", &["api.localhost/"]), &bytes, "test")).await.unwrap();
        assert_eq!(version, i + 2, "version 1 came from the file");
        let expected = if i % 2 == 0 { HOSTILE } else { HELLO };
        // Effective for every new request once deploy returns.
        let r = s.get("api.localhost", "/").await;
        assert!(r.text().starts_with(expected), "after deploy {i}: {}", r.text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..20 {
        let back = change(&s.runtime, |r| r.rollback("acme", "api", None)).await.unwrap();
        assert_eq!(back, 20 - i);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answered = std::collections::BTreeMap::new();
    for c in clients {
        for seen in c.await.unwrap() {
            let version = seen.unwrap_or_else(|e| panic!("a request failed across a deploy or rollback: {e}"));
            *answered.entry(version).or_insert(0) += 1;
        }
    }
    assert!(answered.len() == 2 && answered.values().all(|n| *n > 0), "both versions answered: {answered:?}");
    // Rolled back to version 1, the file's hello.
    assert!(s.get("api.localhost", "/").await.text().starts_with(HELLO));
    let err = change(&s.runtime, |r| r.rollback("acme", "api", None)).await.unwrap_err();
    assert!(matches!(err, DeployError::NothingToRollBackTo { current: 1, .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_holds_its_shares_and_a_sticky_key_keeps_its_version() {
    let s = start_with(&api_worker(), Options { server: "version_key_header = \"Cordon-Version-Key\"", ..Options::default() }).await;
    let v2 = change(&s.runtime, |r| r.deploy(&spec("acme", "api", &["api.localhost/"]), &component("hostile"), "test")).await.unwrap();
    let split = Deployment::split(vec![Target { version: 1, percent: 90 }, Target { version: v2, percent: 10 }]).unwrap();
    change(&s.runtime, move |r| r.set_split("acme", "api", &split)).await.unwrap();
    // The split itself over 10,000 picks, as the gateway makes them.
    let snapshot = s.runtime.snapshot();
    let api = snapshot.worker("acme", "api").unwrap();
    let to_v2 = (0..10_000).filter(|_| api.pick(&http::HeaderMap::new()).0 == v2).count();
    assert!((800..=1200).contains(&to_v2), "{to_v2} of 10000 went to the 10% version");
    // Through the server: requests without a key land on both; one key always on one.
    let mut without_key = std::collections::BTreeMap::new();
    for _ in 0..200 {
        let r = s.get("api.localhost", "/").await;
        *without_key.entry(which(r.status, &r.text()).unwrap()).or_insert(0) += 1;
    }
    assert!(without_key["hello"] > without_key.get("hostile").copied().unwrap_or(0), "{without_key:?}");
    for key in ["user-1", "user-2", "user-3", "user-42"] {
        let first = request(s.addr, "GET", "api.localhost", "/", &[("cordon-version-key", key)], None).await;
        let first = which(first.status, &first.text()).unwrap();
        for _ in 0..20 {
            let again = request(s.addr, "GET", "api.localhost", "/", &[("cordon-version-key", key)], None).await;
            assert_eq!(which(again.status, &again.text()).unwrap(), first, "key {key}");
        }
    }
    // The versions of a split must share their routes.
    let v3 = change(&s.runtime, |r| r.deploy(&spec("acme", "api", &["api.localhost/", "api2.localhost/"]), &component("hello"), "test"))
        .await
        .unwrap();
    let mixed = Deployment::split(vec![Target { version: v2, percent: 50 }, Target { version: v3, percent: 50 }]).unwrap();
    let err = change(&s.runtime, move |r| r.set_split("acme", "api", &mixed)).await.unwrap_err();
    assert!(matches!(err, DeployError::SplitRoutesDiffer { .. }), "{err}");
    // A split naming a version that does not exist changes nothing.
    let missing = Deployment::split(vec![Target { version: 1, percent: 50 }, Target { version: 99, percent: 50 }]).unwrap();
    let err = change(&s.runtime, move |r| r.set_split("acme", "api", &missing)).await.unwrap_err();
    assert!(err.to_string().contains("no version 99"), "{err}");
    assert_eq!(s.runtime.snapshot().worker("acme", "api").unwrap().deployment, Deployment::single(v3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kill_switch_refuses_new_requests_at_once_and_can_stop_those_in_flight() {
    let s = start(&api_worker()).await;
    let v2 = change(&s.runtime, |r| r.deploy(&spec("acme", "api", &["api.localhost/"]), &component("hostile"), "test")).await.unwrap();
    // A request in flight that disable leaves alone, and one it stops.
    let slow = tokio::spawn(request(s.addr, "GET", "api.localhost", "/sleep?ms=1500", &[], None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let aborted = change(&s.runtime, |r| r.disable("acme", "api", false)).await.unwrap();
    assert_eq!(aborted, 0);
    let r = s.get("api.localhost", "/").await;
    assert_eq!((r.status, r.error_code().as_str()), (503, "worker_disabled"), "{}", r.text());
    assert_eq!(slow.await.unwrap().text(), "slept", "a request in flight finishes");
    // Another tenant's worker is not touched.
    assert!(s.get("web.localhost", "/").await.text().starts_with(HELLO));

    change(&s.runtime, |r| r.enable("acme", "api")).await.unwrap();
    assert_eq!(s.get("api.localhost", "/").await.text(), HOSTILE, "enable restores version {v2}");
    let long = tokio::spawn(request(s.addr, "GET", "api.localhost", "/sleep?ms=20000", &[], None));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let aborted = change(&s.runtime, |r| r.disable("acme", "api", true)).await.unwrap();
    assert_eq!(aborted, 1, "the guest in flight is stopped");
    let long = long.await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5), "stopped in {:?}", started.elapsed());
    assert_ne!(long.text(), "slept", "{} {}", long.status, long.text());
    let health = s.health().await;
    let api = health["workers"].as_array().unwrap().iter().find(|w| w["tenant"] == "acme").unwrap().clone();
    assert_eq!((api["disabled"].as_bool(), api["version"].as_u64()), (Some(true), Some(v2)), "{api}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_cannot_take_another_tenants_route_and_two_tenants_may_both_have_an_api() {
    let s = start(&api_worker()).await;
    let err =
        change(&s.runtime, |r| r.deploy(&spec("globex", "api", &["globex.localhost/", "API.localhost/"]), &component("hostile"), "t"))
            .await
            .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("route `api.localhost/` is already served by another tenant"), "{message}");
    assert!(!message.contains("acme"), "the refusal does not say whose route it is: {message}");
    assert!(s.get("api.localhost", "/").await.text().starts_with(HELLO), "nothing changed");
    // Its own route: globex gets an `api` of its own beside acme's.
    let v = change(&s.runtime, |r| r.deploy(&spec("globex", "api", &["globex.localhost/"]), &component("hostile"), "t")).await.unwrap();
    assert_eq!(v, 1);
    assert_eq!(s.get("globex.localhost", "/").await.text(), HOSTILE);
    assert!(s.get("api.localhost", "/").await.text().starts_with(HELLO));
    // An invalid spec is refused with its key path.
    let mut bad = spec("globex", "api", &["globex.localhost/"]);
    bad.limits.cpu_ms = Some(0);
    let err = change(&s.runtime, move |r| r.deploy(&bad, &component("hello"), "t")).await.unwrap_err();
    assert!(err.to_string().contains("limits.cpu_ms"), "{err}");
    // The engine's ceilings, sized at start, are named with their values.
    let mut big = spec("globex", "api", &["globex.localhost/"]);
    big.limits.memory_mb = Some(256);
    let err = change(&s.runtime, move |r| r.deploy(&big, &component("hello"), "t")).await.unwrap_err();
    assert!(err.to_string().contains("sandbox.max_memory_mb = 128"), "{err}");
    let huge = vec![0u8; (128 << 20) + 1];
    let err = change(&s.runtime, move |r| r.deploy(&spec("globex", "api", &["globex.localhost/"]), &huge, "t")).await.unwrap_err();
    assert!(err.to_string().contains("sandbox.max_component_mb = 128"), "{err}");
    assert_eq!(s.get("globex.localhost", "/").await.text(), HOSTILE, "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_of_one_worker_all_land_in_some_order() {
    let s = start(&api_worker()).await;
    let deploys: Vec<_> = (0..6)
        .map(|i| {
            let runtime = s.runtime.clone();
            let bytes = component(if i % 2 == 0 { "hello" } else { "hostile" });
            tokio::task::spawn_blocking(move || runtime.deploy(&spec("acme", "api", &["api.localhost/"]), &bytes, "test").unwrap())
        })
        .collect();
    let mut versions = Vec::new();
    for d in deploys {
        versions.push(d.await.unwrap());
    }
    versions.sort();
    assert_eq!(versions, [2, 3, 4, 5, 6, 7]);
    let listed: Vec<u64> = s.runtime.versions("acme", "api").unwrap().iter().map(|v| v.version).collect();
    assert_eq!(listed, [7, 6, 5, 4, 3, 2, 1]);
    // The snapshot serves the last one to land, whole.
    let snapshot = s.runtime.snapshot();
    let api = snapshot.worker("acme", "api").unwrap();
    assert_eq!(api.deployment, Deployment::single(7));
    assert_eq!(api.versions().count(), 1);
}

/// The config of the restart test: worker `api` of `acme` (hello) and `web`
/// of `globex`, with its data directory in `dir`.
fn restart_config(dir: &std::path::Path) -> cordon_config::Config {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\n[sandbox]\nmax_instances = 16\n{}",
        dir.join("data").display(),
        api_worker()
    );
    let path = dir.join("cordon.toml");
    std::fs::write(&path, text).unwrap();
    cordon_config::Config::load(&path).unwrap()
}

/// Run as a child process by the test below: changes the registry, says so
/// on stdout, and waits to be killed.
#[test]
#[ignore = "run by a_restart_after_kill_9_serves_what_was_active as a child process"]
fn child_changes_the_registry_and_waits_to_be_killed() {
    let Some(dir) = std::env::var_os("CORDON_REGISTRY_CHILD_DIR") else { return };
    let runtime = Runtime::start(&restart_config(std::path::Path::new(&dir))).unwrap();
    let v2 = runtime.deploy(&spec("acme", "api", &["api.localhost/"]), &component("hostile"), "alice").unwrap();
    runtime.deploy(&spec("acme", "api", &["api.localhost/"]), &component("hello"), "bob").unwrap();
    let split = Deployment::split(vec![Target { version: v2, percent: 30 }, Target { version: 1, percent: 70 }]).unwrap();
    runtime.set_split("acme", "api", &split).unwrap();
    runtime.disable("globex", "web", false).unwrap();
    println!("changed");
    std::thread::sleep(Duration::from_secs(600));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_serves_what_was_active() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "registry::child_changes_the_registry_and_waits_to_be_killed", "--ignored", "--nocapture"])
        .env("CORDON_REGISTRY_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap().contains("changed")), "the child made its changes");
    child.kill().unwrap();
    child.wait().unwrap();

    let config = restart_config(dir.path());
    let runtime = tokio::task::spawn_blocking(move || Runtime::start(&config).unwrap()).await.unwrap();
    let snapshot = runtime.snapshot();
    let api = snapshot.worker("acme", "api").unwrap();
    let split = Deployment::split(vec![Target { version: 2, percent: 30 }, Target { version: 1, percent: 70 }]).unwrap();
    assert_eq!((api.deployment.clone(), api.disabled), (split, false));
    let web = snapshot.worker("globex", "web").unwrap();
    assert_eq!((web.deployment.clone(), web.disabled), (Deployment::single(1), true));
    let versions: Vec<(u64, String)> = runtime.versions("acme", "api").unwrap().into_iter().map(|v| (v.version, v.actor)).collect();
    assert_eq!(versions, [(3, "bob".into()), (2, "alice".into()), (1, "cordon.toml".into())], "the same file made no new version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_granted_secrets_opens_the_vault_when_no_worker_had_any_at_start() {
    let s = start(&api_worker()).await;
    let mut with_secret = spec("acme", "api", &["api.localhost/"]);
    with_secret.secrets = vec!["TOKEN".into()];
    let deploy = with_secret.clone();
    let err = change(&s.runtime, move |r| r.deploy(&deploy, &component("hello"), "t")).await.unwrap_err();
    assert!(err.to_string().contains("cordon secret put"), "the vault opened and found no value: {err}");
    // With the value stored, the same deploy lands.
    let data = s.data_dir();
    let (key, _) = cordon_vars::vault::MasterKey::load_with_env(None, &data).unwrap();
    let vault = cordon_vars::vault::Vault::open(&data, key).unwrap();
    vault.put("acme", "api", "TOKEN", &cordon_vars::vault::SecretValue::new("t0ken".into())).unwrap();
    let v = change(&s.runtime, move |r| r.deploy(&with_secret, &component("hello"), "t")).await.unwrap();
    assert_eq!(v, 2);
}
