use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_the_posture_and_the_workers() {
    let s = start(&standard_workers()).await;
    assert_eq!(s.get("hello.localhost", "/").await.status, 200);
    let h = s.health().await;
    let sandbox = &h["sandbox"];
    assert_eq!(sandbox["allocator"]["strategy"], "pooling");
    assert_eq!(sandbox["allocator"]["max_instances"], 64);
    assert_eq!(sandbox["guard_pages"]["enabled"], true);
    assert_eq!(sandbox["copy_on_write_memory_init"], true);
    assert_eq!(sandbox["wasm_threads"], false);
    assert_eq!(sandbox["clock_resolution_ns"], 1_000_000);
    let mpk = &sandbox["memory_protection_keys"];
    assert_eq!(mpk["setting"], "auto");
    assert_eq!(mpk["active"], cordon_runtime::policy::cpu_has_memory_protection_keys());
    assert!(mpk["reason"].as_str().is_some_and(|r| !r.is_empty()));

    let workers = h["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let hello = workers.iter().find(|w| w["name"] == "hello").unwrap();
    assert_eq!(hello["tenant"], "good");
    assert_eq!(hello["limits"]["cpu_ms"], 50);
    assert_eq!(hello["routes"][0], "hello.localhost/");
    // The request above is counted once its log line is written.
    for _ in 0..50 {
        if s.health().await["workers"][0]["stats"]["requests"].as_u64() >= Some(1) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let h = s.health().await;
    let hello = h["workers"].as_array().unwrap().iter().find(|w| w["name"] == "hello").unwrap().clone();
    assert!(hello["stats"]["requests"].as_u64() >= Some(1), "{hello}");
    assert!(hello["stats"]["instantiate_us_mean"].as_f64().unwrap() > 0.0, "{hello}");
    // Instance quotas: a quarter of the 64 slots per tenant, nothing held
    // once the request's instance is gone.
    assert_eq!(hello["limits"]["max_instances"], 16);
    assert_eq!(hello["instances"], serde_json::json!({"max_instances": 16, "in_flight": 0, "refused": 0, "max_queued": 0, "queued": 0}));
    assert_eq!(
        h["tenants"]["good"],
        serde_json::json!({"max_instances": 16, "in_flight": 0, "refused": 0, "max_queued": 128, "queued": 0})
    );
    // Guest threads, and each tenant's weight and guest CPU.
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(h["cpu"]["guest_threads"], cores, "one guest thread per core by default");
    assert_eq!(h["cpu"]["tenants"]["good"]["cpu_weight"], 100);
    assert!(h["cpu"]["tenants"]["good"]["guest_cpu_us"].as_u64() > Some(0), "{}", h["cpu"]);
    assert_eq!(h["tenants"]["evil"]["max_instances"], 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_only_health() {
    let s = start(&standard_workers()).await;
    let r = request(s.admin, "POST", "localhost", "/health", &[], None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.error_code(), "method_not_allowed");
    let r = request(s.admin, "GET", "localhost", "/secrets", &[], None).await;
    assert_eq!(r.status, 404);
    // Workers are not reachable through the admin port, nor health through the main one.
    let r = request(s.admin, "GET", "hello.localhost", "/", &[], None).await;
    assert_eq!(r.status, 404);
    assert_eq!(s.get("localhost", "/health").await.status, 404);
}
