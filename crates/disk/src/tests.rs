use std::sync::mpsc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, params};

use super::*;

fn file(dir: &Path, tenant: &str, name: &str) -> (PathBuf, Connection) {
    let path = dir.join("sql").join(tenant).join(format!("{name}.sqlite3"));
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let conn = Connection::open(&path).unwrap();
    sqlite::configure(&conn, &path).unwrap();
    conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(())).unwrap();
    conn.execute_batch("CREATE TABLE t (id INTEGER PRIMARY KEY, b BLOB)").unwrap();
    (path, conn)
}

fn is_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

#[test]
fn the_allowance_is_what_is_left_of_the_quota_and_above_the_reserve() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::new(dir.path());
    ledger.set_free_space_reserve(0);
    ledger.set_tenant_quota("acme", 10 << 20);
    let account = ledger.account("acme");
    account.record(&[]);
    let stored = dir.path().join("sql/acme/a.sqlite3");
    fs::create_dir_all(stored.parent().unwrap()).unwrap();
    fs::write(&stored, vec![0u8; 4 << 20]).unwrap();
    account.record(std::slice::from_ref(&stored));
    assert_eq!(account.used(), 4 << 20);

    let turn = account.begin_write().unwrap();
    assert_eq!(turn.allowance(WriteKind::Grow), Ok(Allowance { bytes: 6 << 20, bound: Bound::Quota }));
    assert_eq!(turn.allowance(WriteKind::Shrink), Ok(Allowance { bytes: (6 << 20) + (1 << 20), bound: Bound::Quota }));
    drop(turn);

    // Over the quota: nothing to grow by, the headroom for deletes only.
    fs::write(&stored, vec![0u8; 11 << 20]).unwrap();
    account.record(std::slice::from_ref(&stored));
    let turn = account.begin_write().unwrap();
    assert_eq!(turn.allowance(WriteKind::Grow), Ok(Allowance { bytes: 0, bound: Bound::Quota }));
    assert_eq!(turn.allowance(WriteKind::Shrink), Ok(Allowance { bytes: 0, bound: Bound::Quota }), "past the headroom too");
    drop(turn);

    // A file that is gone counts nothing.
    fs::remove_file(&stored).unwrap();
    account.record(std::slice::from_ref(&stored));
    assert_eq!(account.used(), 0);

    // A reserve above the free space refuses growing writes, not deletes;
    // a reserve just below it caps the allowance at what is above it.
    let free = statvfs_available(dir.path()).unwrap();
    ledger.set_free_space_reserve(free + (1 << 30));
    let turn = account.begin_write().unwrap();
    match turn.allowance(WriteKind::Grow) {
        Err(DiskError::ReserveReached { reserve, .. }) => assert_eq!(reserve, free + (1 << 30)),
        other => panic!("expected the reserve to refuse, got {other:?}"),
    }
    assert_eq!(turn.allowance(WriteKind::Shrink).map(|a| a.bound), Ok(Bound::Quota));
    drop(turn);
    ledger.set_free_space_reserve(free.saturating_sub(1 << 20));
    ledger.free_space().free_now();
    let turn = account.begin_write().unwrap();
    let allowance = turn.allowance(WriteKind::Grow).unwrap();
    assert_eq!(allowance.bound, Bound::Reserve, "{allowance:?}");
    assert!(allowance.bytes <= 2 << 20, "{allowance:?}");
}

#[test]
fn the_account_lists_the_tenants_files_in_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    for (path, len) in
        [("kv/acme/a.sqlite3", 1000), ("kv/acme/a.sqlite3-wal", 200), ("sql/acme/db.sqlite3", 30), ("sql/other/db.sqlite3", 5)]
    {
        let path = dir.path().join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, vec![0u8; len]).unwrap();
    }
    let ledger = Ledger::new(dir.path());
    assert_eq!(ledger.account("acme").used(), 1230);
    assert_eq!(ledger.account("other").used(), 5);
    assert_eq!(ledger.account("nobody").used(), 0);
    assert!(Arc::ptr_eq(&ledger.account("acme"), &ledger.account("acme")));
}

#[test]
fn stores_of_one_data_directory_share_a_ledger() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = Ledger::shared(a.path());
    assert!(Arc::ptr_eq(&first, &Ledger::shared(a.path())));
    assert!(!Arc::ptr_eq(&first, &Ledger::shared(b.path())));
    first.set_tenant_quota("acme", 123);
    assert_eq!(Ledger::shared(a.path()).account("acme").quota(), 123);
}

#[test]
fn sqlite_stops_at_the_allowance_and_the_rollback_keeps_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, conn) = file(dir.path(), "acme", "db");
    sqlite::limit_growth(&conn, 256 << 10).unwrap();
    let before = sqlite::page_count(&conn).unwrap();

    // One value larger than the allowance.
    let e = conn.execute("INSERT INTO t (b) VALUES (zeroblob(1048576))", []).unwrap_err();
    assert!(is_full(&e), "{e:?}");
    // Many small rows, in one statement.
    let e = conn
        .execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100000) INSERT INTO t (b) SELECT randomblob(100) FROM n", [])
        .unwrap_err();
    assert!(is_full(&e), "{e:?}");
    // An index over rows that fit.
    conn.execute("INSERT INTO t (b) SELECT randomblob(1000) FROM (SELECT 1 UNION ALL SELECT 2) LIMIT 2", []).unwrap();
    for _ in 0..6 {
        conn.execute("INSERT INTO t (b) SELECT randomblob(1000) FROM t", []).unwrap_or(0);
    }
    let e = conn.execute("CREATE INDEX t_b ON t (b)", []).unwrap_err();
    assert!(is_full(&e), "{e:?}");
    let after = sqlite::page_count(&conn).unwrap();
    assert!(after <= before + 64, "the file stayed within 256 KiB of growth: {before} -> {after} pages");
}

#[test]
fn deletes_work_in_a_file_at_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, conn) = file(dir.path(), "acme", "db");
    conn.execute_batch("CREATE TABLE kv (k TEXT PRIMARY KEY, v BLOB) WITHOUT ROWID; CREATE INDEX kv_v ON kv (v)").unwrap();
    sqlite::limit_growth(&conn, 512 << 10).unwrap();
    // Fill it to the last page with rows of varying length, which is what
    // makes a delete from an index rebalance.
    let mut i = 0u64;
    loop {
        let len = 50 + (i * 7919) % 900;
        match conn.execute("INSERT INTO kv VALUES (?1, randomblob(?2))", params![format!("key{i:08}"), len]) {
            Ok(_) => i += 1,
            Err(e) if is_full(&e) => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(i > 100, "only {i} rows fit");
    // No growth at all, as for a tenant over its quota: no insert fits.
    sqlite::limit_growth(&conn, 0).unwrap();
    assert!(is_full(&conn.execute("INSERT INTO kv VALUES ('more', randomblob(4000))", []).unwrap_err()));
    // A delete now and then needs a page (an index rebalance, which depends
    // on the random values), so deletes get the headroom that the account
    // gives writes that only delete (`WriteKind::Shrink`), and stay in it.
    let headroom = delete_headroom(512 << 10);
    let before = sqlite::page_count(&conn).unwrap();
    sqlite::limit_growth(&conn, headroom).unwrap();
    let mut deleted = 0;
    for k in (0..i).step_by(3) {
        deleted += conn.execute("DELETE FROM kv WHERE k = ?1", [format!("key{k:08}")]).expect("a delete at the limit");
    }
    assert!(deleted > 30);
    conn.execute("DELETE FROM kv WHERE k > 'key00000500'", []).expect("a bulk delete at the limit");
    let after = sqlite::page_count(&conn).unwrap();
    let page = sqlite::page_size(&conn).unwrap();
    assert!(after.saturating_sub(before) * page <= headroom, "deletes grew the file from {before} to {after} pages");
}

#[test]
fn reclaim_gives_deleted_pages_back_to_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let (path, conn) = file(dir.path(), "acme", "db");
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000) INSERT INTO t (b) SELECT randomblob(1000) FROM n",
        [],
    )
    .unwrap();
    sqlite::checkpoint_truncate(&conn).unwrap();
    let full = fs::metadata(&path).unwrap().len();
    assert!(full > 2_000_000, "{full}");
    conn.execute("DELETE FROM t", []).unwrap();
    assert!(sqlite::freelist_count(&conn).unwrap() > 400);
    // Bounded in time: with no time at all it still makes one step.
    let given = sqlite::reclaim(&conn, Duration::ZERO).unwrap();
    assert_eq!(given, u64::from(RECLAIM_STEP_PAGES));
    sqlite::after_write(&conn, &path, WriteKind::Shrink, false).unwrap();
    let mut rounds = 0;
    while sqlite::freelist_count(&conn).unwrap() > 0 {
        sqlite::after_write(&conn, &path, WriteKind::Shrink, false).unwrap();
        rounds += 1;
        assert!(rounds < 100);
    }
    let small = fs::metadata(&path).unwrap().len();
    assert!(small < 100_000, "{full} -> {small}");
    let wal = fs::metadata(sqlite_files(&path)[1].clone()).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "the WAL was truncated");
}

#[test]
fn files_get_temp_store_in_memory_and_a_wal_limit_and_old_files_get_auto_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.sqlite3");
    {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (b BLOB); INSERT INTO t VALUES (randomblob(100000));").unwrap();
        let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0)).unwrap();
        assert_eq!(mode, 0);
    }
    let conn = Connection::open(&path).unwrap();
    sqlite::configure(&conn, &path).unwrap();
    let get = |name: &str| -> i64 { conn.pragma_query_value(None, name, |r| r.get(0)).unwrap() };
    assert_eq!(get("auto_vacuum"), 2, "migrated by one VACUUM");
    assert_eq!(get("temp_store"), 2);
    assert_eq!(get("journal_size_limit"), WAL_LIMIT as i64);
    let rows: i64 = conn.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 1, "the data survived");
}

#[test]
fn writes_of_one_tenant_take_turns_and_a_stopped_job_stops_waiting() {
    let ledger = Arc::new(Ledger::new(tempfile::tempdir().unwrap().path()));
    let account = ledger.account("acme");
    let first = account.begin_write().unwrap();
    let (tx, rx) = mpsc::channel();
    let waiter = {
        let account = Arc::clone(&account);
        std::thread::spawn(move || {
            let turn = account.begin_write().unwrap();
            tx.send(()).unwrap();
            drop(turn);
        })
    };
    assert!(rx.recv_timeout(Duration::from_millis(100)).is_err(), "the second write waited");
    // Another tenant does not wait.
    drop(ledger.account("other").begin_write().unwrap());
    drop(first);
    rx.recv_timeout(Duration::from_secs(5)).expect("the second write got its turn");
    waiter.join().unwrap();

    // Inside a pool job, the wait ends with the job.
    let held = account.begin_write().unwrap();
    let pool = cordon_blocking::BlockingPool::new(cordon_blocking::PoolConfig {
        name: "test",
        threads: 1,
        tenant_threads: 1,
        queue: 1,
        tenant_queue: 1,
    });
    let waiting = Arc::clone(&account);
    let job = pool
        .spawn("acme", move |ctx| {
            ctx.set_deadline(Some(Instant::now() + Duration::from_millis(50)));
            waiting.begin_write().map(drop)
        })
        .unwrap();
    let runtime = tokio_runtime();
    let done = runtime.block_on(job).unwrap();
    assert_eq!(done.value, Err(StopReason::DeadlinePassed));
    drop(held);
}

fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Removing an index entry from an interior page puts its predecessor
/// there instead, which can be longer and split the page: a delete that
/// needs a new page. Long keys each followed by a short one make that
/// happen often; without headroom such deletes fail at the limit.
#[test]
fn a_delete_can_need_a_page_and_the_headroom_lets_it_through() {
    let dir = tempfile::tempdir().unwrap();
    let (_path, conn) = file(dir.path(), "acme", "db");
    conn.execute_batch("CREATE TABLE kv (k BLOB PRIMARY KEY) WITHOUT ROWID").unwrap();
    let fill = |conn: &Connection| {
        conn.execute_batch("BEGIN").unwrap();
        for i in 0..1000u32 {
            conn.execute("INSERT INTO kv VALUES (?1)", [format!("{i:06}a{}", "x".repeat(900)).as_bytes()]).unwrap();
            conn.execute("INSERT INTO kv VALUES (?1)", [format!("{i:06}b").as_bytes()]).unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        assert_eq!(sqlite::freelist_count(conn).unwrap(), 0);
    };
    let delete_short_keys = |conn: &Connection| {
        (0..1000u32).filter(|i| conn.execute("DELETE FROM kv WHERE k = ?1", [format!("{i:06}b").as_bytes()]).is_err()).count()
    };
    fill(&conn);
    sqlite::limit_growth(&conn, 0).unwrap();
    let failed = delete_short_keys(&conn);
    assert!(failed > 0, "no delete needed a page");
    // Deleting the entries that take the space frees pages, and then the
    // rest can go too.
    let long_failed = (0..1000u32)
        .filter(|i| conn.execute("DELETE FROM kv WHERE k = ?1", [format!("{i:06}a{}", "x".repeat(900)).as_bytes()]).is_err())
        .count();
    assert_eq!(long_failed, 0);
    assert_eq!(delete_short_keys(&conn), 0);
    let left: i64 = conn.query_row("SELECT count(*) FROM kv", [], |r| r.get(0)).unwrap();
    assert_eq!(left, 0);

    conn.execute("DELETE FROM kv", []).unwrap();
    sqlite::reclaim(&conn, Duration::from_secs(5)).unwrap();
    fill(&conn);
    sqlite::limit_growth(&conn, delete_headroom(4 << 20)).unwrap();
    assert_eq!(delete_short_keys(&conn), 0, "with the headroom every delete works ({failed} failed without)");
}
