use super::*;
use crate::deployment::Target;

fn store(dir: &Path) -> RegistryStore {
    let mut store = RegistryStore::open(dir, MIN_KEPT_VERSIONS).unwrap();
    store.unnamed_grace = Duration::ZERO;
    store
}

fn component(n: u32) -> Vec<u8> {
    format!("(component) ;; {n}").into_bytes()
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn versions_deployments_and_the_kill_switch_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let store = store(&data);
        let c = store.store_component(&component(1)).unwrap();
        let v1 = store.create_version("acme", "api", &c, "{\"routes\":[\"a/\"]}", "operator").unwrap();
        let v2 = store.create_version("acme", "api", &c, "{\"routes\":[\"b/\"]}", "alice").unwrap();
        assert_eq!((v1.version, v2.version), (1, 2));
        store
            .deploy(
                "acme",
                "api",
                &Deployment::split(vec![Target { version: 1, percent: 90 }, Target { version: 2, percent: 10 }]).unwrap(),
            )
            .unwrap();
        store.set_disabled("acme", "api", true).unwrap();
        // Another tenant's worker of the same name is another worker.
        store.create_version("beta", "api", &c, "{}", "bob").unwrap();
    }
    let store = store(&data);
    let workers = store.workers().unwrap();
    assert_eq!(workers.len(), 2);
    assert_eq!(workers[0].tenant, "acme");
    assert!(workers[0].disabled);
    assert_eq!(workers[0].deployment.as_ref().unwrap().versions().collect::<Vec<_>>(), [1, 2]);
    assert_eq!((workers[1].tenant.as_str(), workers[1].deployment.as_ref()), ("beta", None));
    let versions = store.versions("acme", "api").unwrap();
    assert_eq!(versions.iter().map(|v| (v.version, v.actor.as_str())).collect::<Vec<_>>(), [(2, "alice"), (1, "operator")]);
    assert_eq!(versions[1].spec, "{\"routes\":[\"a/\"]}");
    assert!(versions[0].created_ms > 0);
    assert_eq!(store.read_component(&versions[0].component).unwrap(), component(1));
    // Enabling restores the same deployment.
    store.set_disabled("acme", "api", false).unwrap();
    assert_eq!(store.workers().unwrap()[0].deployment.as_ref().unwrap().versions().collect::<Vec<_>>(), [1, 2]);
}

#[test]
fn a_deployment_naming_a_version_that_does_not_exist_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let c = store.store_component(&component(1)).unwrap();
    store.create_version("acme", "api", &c, "{}", "op").unwrap();
    store.deploy("acme", "api", &Deployment::single(1)).unwrap();
    let split = Deployment::split(vec![Target { version: 1, percent: 50 }, Target { version: 9, percent: 50 }]).unwrap();
    let err = store.deploy("acme", "api", &split).unwrap_err();
    assert!(matches!(err, RegistryError::NoSuchVersion { version: 9, .. }), "{err:?}");
    assert_eq!(store.workers().unwrap()[0].deployment, Some(Deployment::single(1)));
    assert!(matches!(store.deploy("acme", "nope", &Deployment::single(1)).unwrap_err(), RegistryError::NoSuchVersion { .. }));
    assert!(matches!(store.set_disabled("acme", "nope", true).unwrap_err(), RegistryError::NoSuchWorker { .. }));
    let missing = ComponentHash::of(b"never stored");
    assert!(matches!(store.create_version("acme", "api", &missing, "{}", "op").unwrap_err(), RegistryError::NoSuchComponent { .. }));
}

#[test]
fn concurrent_creations_each_get_their_own_version() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(store(dir.path()));
    let c = store.store_component(&component(1)).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (store, c) = (store.clone(), c.clone());
            std::thread::spawn(move || {
                (0..10).map(|_| store.create_version("acme", "api", &c, "{}", "op").unwrap().version).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    all.sort();
    assert_eq!(all, (1..=40).collect::<Vec<_>>());
}

#[test]
fn old_versions_are_pruned_but_the_active_ones_and_their_components_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let first = store.store_component(&component(0)).unwrap();
    store.create_version("acme", "api", &first, "{}", "op").unwrap();
    store.deploy("acme", "api", &Deployment::single(1)).unwrap();
    for n in 1..=MIN_KEPT_VERSIONS as u32 + 5 {
        let c = store.store_component(&component(n)).unwrap();
        store.create_version("acme", "api", &c, "{}", "op").unwrap();
    }
    let kept: Vec<u64> = store.versions("acme", "api").unwrap().iter().map(|v| v.version).collect();
    // The newest 100, and version 1 because it is deployed.
    assert_eq!(kept.len(), MIN_KEPT_VERSIONS + 1);
    assert_eq!(kept[0], MIN_KEPT_VERSIONS as u64 + 6);
    assert_eq!(*kept.last().unwrap(), 1);
    assert!(store.version("acme", "api", 2).unwrap().is_none());
    // Pruned versions' components are gone; the kept ones' are there.
    let files = files_in(&store.components);
    assert_eq!(files.len(), MIN_KEPT_VERSIONS + 1, "{files:?}");
    assert!(store.read_component(&first).is_ok());
    assert!(matches!(store.read_component(&ComponentHash::of(&component(1))).unwrap_err(), RegistryError::NoSuchComponent { .. }));
    // Once another version is deployed, version 1 goes at the next change.
    store.deploy("acme", "api", &Deployment::single(kept[0])).unwrap();
    assert!(store.version("acme", "api", 1).unwrap().is_none());
    assert!(store.read_component(&first).is_err());
}

#[test]
fn a_component_is_stored_once_by_its_hash_and_checked_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let a = store.store_component(&component(1)).unwrap();
    assert_eq!(store.store_component(&component(1)).unwrap(), a);
    assert_eq!(a.as_str().len(), 64);
    store.create_version("acme", "api", &a, "{}", "op").unwrap();
    assert_eq!(files_in(&store.components), [format!("{a}.wasm")]);
    fs::write(store.component_path(&a), b"(component) ;; replaced").unwrap();
    assert!(matches!(store.read_component(&a).unwrap_err(), RegistryError::ComponentDamaged { .. }));
}

#[test]
fn a_component_no_version_names_is_removed_once_old_enough() {
    let dir = tempfile::tempdir().unwrap();
    let (named, unnamed) = {
        let store = store(dir.path());
        let named = store.store_component(&component(1)).unwrap();
        store.create_version("acme", "api", &named, "{}", "op").unwrap();
        (named, store.store_component(&component(2)).unwrap())
    };
    // A young unnamed file is kept: another process may be about to name it.
    let kept = RegistryStore::open(dir.path(), 0).unwrap();
    assert!(kept.component_path(&unnamed).exists());
    drop(kept);
    // Old enough (a grace of zero here), it goes.
    let store = store(dir.path());
    store.remove_unnamed_components().unwrap();
    assert!(store.component_path(&named).exists());
    assert!(!store.component_path(&unnamed).exists());
}

/// Run as a child process by the test below: creates versions one after
/// another and prints each number once it is acknowledged.
#[test]
#[ignore = "run by every_acknowledged_change_survives_kill_9 as a child process"]
fn child_creates_versions_until_killed() {
    let Some(dir) = std::env::var_os("CORDON_REGISTRY_CHILD_DIR") else { return };
    let store = RegistryStore::open(Path::new(&dir), MIN_KEPT_VERSIONS).unwrap();
    let c = store.store_component(&component(1)).unwrap();
    let mut out = std::io::stdout();
    loop {
        let v = store.create_version("acme", "api", &c, "{}", "op").unwrap();
        store.deploy("acme", "api", &Deployment::single(v.version)).unwrap();
        writeln!(out, "acknowledged {}", v.version).unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn every_acknowledged_change_survives_kill_9() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "store::tests::child_creates_versions_until_killed", "--ignored", "--nocapture"])
        .env("CORDON_REGISTRY_CHILD_DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last = 0;
    while last < 30 {
        let line = lines.next().expect("the child stopped early").unwrap();
        if let Some(n) = line.strip_prefix("acknowledged ") {
            last = n.parse().unwrap();
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let store = RegistryStore::open(dir.path(), MIN_KEPT_VERSIONS).unwrap();
    let newest = store.versions("acme", "api").unwrap()[0].version;
    assert!(newest >= last, "version {last} was acknowledged, but the newest kept is {newest}");
    let deployed = store.workers().unwrap()[0].deployment.clone().unwrap();
    assert!(deployed.versions().next().unwrap() >= last);
}
