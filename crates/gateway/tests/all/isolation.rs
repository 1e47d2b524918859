use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_state_survives_between_requests() {
    let s = start(&standard_workers()).await;
    for _ in 0..5 {
        let r = s.get("hostile.localhost", "/counter").await;
        assert_eq!((r.status, r.text().as_str()), (200, "1"), "a fresh instance per request");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clocks_are_coarse() {
    let s = start(&standard_workers()).await;
    for _ in 0..3 {
        let text = s.get("hostile.localhost", "/clock").await.text();
        let field = |k: &str| -> String {
            text.split_whitespace().find_map(|f| f.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("{k} in {text}")).to_string()
        };
        let mono: u64 = field("mono").parse().unwrap();
        let res: u64 = field("res").parse().unwrap();
        let wall_ns: u64 = field("wall").split('.').nth(1).unwrap().parse().unwrap();
        assert_eq!(res, 1_000_000, "monotonic resolution is 1 ms");
        assert_eq!(mono % 1_000_000, 0, "monotonic reading {mono} is a whole millisecond");
        assert_eq!(wall_ns % 1_000_000, 0, "wall-clock nanoseconds {wall_ns} are a whole millisecond");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_output_is_captured_and_tagged() {
    let s = start(&standard_workers()).await;
    let r = s.get("hostile.localhost", "/stdout").await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap().to_string();
    let out = wait_for_log("hello stdout", |e| e["request_id"] == id.as_str()).await;
    assert_eq!(out["stream"], "stdout");
    assert_eq!(out["worker"], "hostile");
    let err = wait_for_log("hello stderr", |e| e["request_id"] == id.as_str()).await;
    assert_eq!(err["stream"], "stderr");

    // Past the cap (4096 bytes for this worker), output is dropped and
    // counted; what was kept is one event, its newlines escaped.
    let r = s.get("hostile.localhost", "/spam?bytes=100000").await;
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").unwrap().to_string();
    let dropped = wait_for_log("dropped_bytes", |e| e["request_id"] == id.as_str()).await;
    assert_eq!(dropped["dropped_bytes"], 100_000 - 4096);
    assert_eq!(dropped["stream"], "stdout");
    let events: Vec<_> = log_events(&id).into_iter().filter(|e| e["stream"] == "stdout").collect();
    assert_eq!(events.len(), 1, "one event per stream: {events:?}");
    let message = events[0]["message"].as_str().unwrap();
    assert_eq!(message, format!("{}\\n", "y".repeat(1023)).repeat(4), "the kept 4096 bytes, newlines escaped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_log_line_per_request() {
    let s = start(&standard_workers()).await;
    let r = s.get("hello.localhost", "/logged").await;
    let id = r.header("x-request-id").unwrap().to_string();
    let line = wait_for_log("\"request\"", |e| e["request_id"] == id.as_str() && e["message"] == "request").await;
    assert_eq!(line["tenant"], "good");
    assert_eq!(line["worker"], "hello");
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/logged");
    assert!(line["cpu_us"].as_u64().unwrap() > 0, "{line}");
    assert!(line["duration_us"].as_u64().is_some(), "{line}");
    assert_eq!(log_events(&id).iter().filter(|e| e["message"] == "request").count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_request_cannot_read_the_next_ones_body() {
    use tokio::io::AsyncWriteExt;
    let s = start(&standard_workers()).await;
    let mut c = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    // One connection: first the hostile tenant's worker, which answers and
    // then keeps reading its body; then a request with a secret for another
    // tenant's worker.
    c.write_all(b"GET /late-read?ms=500 HTTP/1.1\r\nHost: hostile.localhost\r\n\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    c.write_all(b"POST / HTTP/1.1\r\nHost: hello.localhost\r\nContent-Length: 14\r\nConnection: close\r\n\r\nTOP-SECRET-XYZ")
        .await
        .unwrap();
    let reply = read_until_close(&mut c, std::time::Duration::from_secs(5)).await;
    assert!(reply.contains("answered early") && reply.contains("Hello from Cordon"), "{reply}");
    let line = wait_for_log("late-read saw", |_| true).await;
    let text = line["message"].as_str().unwrap();
    assert!(!text.contains("TOP-SECRET"), "a worker read another request's body: {text}");
    assert!(text.contains("saw 0 bytes"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_grants_no_environment_files_sockets_or_name_lookup() {
    let s = start(&standard_workers()).await;
    let r = s.get("hostile.localhost", "/escape").await;
    assert_eq!(r.status, 200);
    let text = r.text();
    let field =
        |k: &str| text.lines().find_map(|l| l.strip_prefix(&format!("{k}="))).unwrap_or_else(|| panic!("{k} in {text}")).to_string();
    assert_eq!(field("env"), "0", "{text}");
    assert_eq!(field("args"), "0", "{text}");
    assert_eq!(field("preopens"), "0", "{text}");
    for k in ["tcp", "udp", "dns"] {
        assert!(field(k).starts_with("denied"), "{k} must be denied: {text}");
    }
}
