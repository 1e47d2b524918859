use crate::harness::*;

fn workers() -> String {
    format!(
        r#"{std}
[[worker]]
name = "root"
tenant = "good"
component = "{hostile}"
routes = ["localhost/"]
"#,
        std = standard_workers(),
        hostile = guest("hostile").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_longest_prefix() {
    let s = start(&workers()).await;

    let r = s.get("hello.localhost", "/a/b?x=1").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "Hello from Cordon\nmethod: GET\npath: /a/b?x=1\n");

    // The port in Host is ignored, and so is case.
    let r = s.get("HELLO.localhost:1234", "/").await;
    assert!(r.text().starts_with("Hello from Cordon"), "{}", r.text());

    // `localhost/hello` wins over `localhost/` for /hello and below...
    for path in ["/hello", "/hello/", "/hello/deeper?q"] {
        let r = s.get("localhost", path).await;
        assert!(r.text().starts_with("Hello from Cordon"), "{path}: {}", r.text());
    }
    // ...but not for a path that merely starts with the same letters.
    for path in ["/helloworld", "/", "/other"] {
        assert_eq!(s.get("localhost", path).await.text(), "ok from hostile", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_get_a_json_404() {
    let s = start(&standard_workers()).await;
    for (host, path) in [("nobody.localhost", "/"), ("localhost", "/nothing"), ("hello.localhost.evil", "/")] {
        let r = s.get(host, path).await;
        assert_eq!(r.status, 404, "{host}{path}");
        assert_eq!(r.error_code(), "not_found");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_pass_both_ways() {
    let s = start(&standard_workers()).await;
    let r = request(
        s.addr,
        "POST",
        "hostile.localhost",
        "/echo?q=1",
        &[("x-test-one", "1"), ("x-test-two", "zwei"), ("x-other", "dropped by the echo"), ("x-request-id", "forged")],
        Some(b"payload".to_vec()),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-seen-method"), Some("POST"));
    assert_eq!(r.header("x-seen-path"), Some("/echo?q=1"));
    assert_eq!(r.header("x-test-one"), Some("1"));
    assert_eq!(r.header("x-test-two"), Some("zwei"));
    assert_eq!(r.text(), "payload");
    // The worker sees the gateway's request id, never one the client made up.
    assert_eq!(r.header("x-seen-request-id"), r.header("x-request-id"));
    assert_ne!(r.header("x-seen-request-id"), Some("forged"));
    let r = s.get("hostile.localhost", "/headers").await;
    assert_eq!(r.header("x-from-worker"), Some("yes"));
    let id = r.header("x-request-id").expect("x-request-id");
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_has_its_own_request_id() {
    let s = start(&standard_workers()).await;
    let a = s.get("hello.localhost", "/").await;
    let b = s.get("nobody.localhost", "/").await;
    let c = s.get("hostile.localhost", "/trap").await;
    let ids: Vec<_> = [&a, &b, &c].iter().map(|r| r.header("x-request-id").unwrap().to_string()).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2], "{ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_is_denied() {
    let s = start(&standard_workers()).await;
    let r = s.get("hostile.localhost", "/outbound").await;
    assert_eq!(r.status, 200);
    assert!(r.text().contains("outbound: error") && r.text().contains("HttpRequestDenied"), "{}", r.text());
}

/// A worker is its tenant and its name: two tenants each deploy `api`, and
/// each serves its own routes, with its own counters, log lines and
/// `/health` entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_each_serve_their_own_worker_named_api() {
    let workers = format!(
        r#"
[[worker]]
name = "api"
tenant = "acme"
component = "{hello}"
routes = ["acme.localhost/"]

[[worker]]
name = "api"
tenant = "globex"
component = "{hostile}"
routes = ["globex.localhost/"]
"#,
        hello = guest("hello").display(),
        hostile = guest("hostile").display(),
    );
    let s = start(&workers).await;
    let acme = s.get("acme.localhost", "/").await;
    assert!(acme.text().starts_with("Hello from Cordon"), "{}", acme.text());
    let globex = s.get("globex.localhost", "/").await;
    assert_eq!(globex.text(), "ok from hostile");

    for (tenant, response) in [("acme", &acme), ("globex", &globex)] {
        let id = response.header("x-request-id").unwrap().to_string();
        let line = wait_for_log(&id, |e| e["message"] == "request").await;
        assert_eq!((line["tenant"].as_str(), line["worker"].as_str()), (Some(tenant), Some("api")), "{line}");
    }

    // Each counts only its own request once its log line is written.
    let mut h = s.health().await;
    for _ in 0..50 {
        let counted = h["workers"].as_array().unwrap().iter().all(|w| w["stats"]["requests"].as_u64() >= Some(1));
        if counted {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        h = s.health().await;
    }
    let mut seen: Vec<(String, String, String, u64)> = h["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let field = |k: &str| w[k].as_str().unwrap_or_default().to_string();
            (
                field("tenant"),
                field("name"),
                w["routes"][0].as_str().unwrap_or_default().to_string(),
                w["stats"]["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("acme".to_string(), "api".to_string(), "acme.localhost/".to_string(), 1),
            ("globex".to_string(), "api".to_string(), "globex.localhost/".to_string(), 1)
        ]
    );
}
