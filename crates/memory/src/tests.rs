use super::*;

const MIB: u64 = 1 << 20;

fn budgets(tenant: u64, process: u64) -> (Arc<Budget>, Arc<Budget>) {
    (Budget::new(tenant), Budget::new(process))
}

#[test]
fn a_charge_is_all_or_nothing_and_names_the_limit_that_refused() {
    let (tenant, process) = budgets(10 * MIB, 12 * MIB);
    let a = Account::new(8 * MIB, tenant.clone(), process.clone());
    a.charge(6 * MIB).unwrap();
    assert_eq!(a.charge(3 * MIB), Err(OverBudget::Request { limit: 8 * MIB }));
    assert_eq!((a.used(), tenant.used(), process.used()), (6 * MIB, 6 * MIB, 6 * MIB), "a refused charge takes nothing");

    let b = Account::new(8 * MIB, tenant.clone(), process.clone());
    assert_eq!(b.charge(5 * MIB), Err(OverBudget::Tenant { limit: 10 * MIB }));
    assert_eq!(b.refused(), Some(OverBudget::Tenant { limit: 10 * MIB }));
    b.charge(4 * MIB).unwrap();

    let other_tenant = Budget::new(10 * MIB);
    let c = Account::new(8 * MIB, other_tenant.clone(), process.clone());
    assert_eq!(c.charge(3 * MIB), Err(OverBudget::Process { limit: 12 * MIB }));
    assert_eq!(other_tenant.used(), 0, "the tenant's charge is undone when the process refuses");
    c.charge(2 * MIB).unwrap();
    assert_eq!(process.used(), 12 * MIB);
    assert_eq!(process.snapshot().refused, 1);
}

#[test]
fn dropping_an_account_gives_back_everything_it_holds() {
    let (tenant, process) = budgets(100 * MIB, 100 * MIB);
    let a = Arc::new(Account::new(50 * MIB, tenant.clone(), process.clone()));
    a.charge(10 * MIB).unwrap();
    a.charge_outside_request(2 * MIB).unwrap();
    let held = a.hold(5 * MIB).unwrap();
    assert_eq!((a.used(), tenant.used()), (15 * MIB, 17 * MIB));
    drop(held);
    assert_eq!((a.used(), tenant.used()), (10 * MIB, 12 * MIB));
    a.release(4 * MIB);
    drop(a);
    assert_eq!((tenant.used(), process.used()), (0, 0));
}

#[test]
fn a_stack_charged_outside_the_request_does_not_count_against_its_limit() {
    let (tenant, process) = budgets(4 * MIB, 100 * MIB);
    let a = Account::new(2 * MIB, tenant.clone(), process);
    a.charge_outside_request(3 * MIB).unwrap();
    a.charge(MIB).unwrap();
    assert_eq!(a.charge(1), Err(OverBudget::Tenant { limit: 4 * MIB }), "but it does against the tenant's budget");
}

#[test]
fn concurrent_charges_never_pass_a_budget() {
    let (tenant, process) = budgets(64 * MIB, 1 << 40);
    let peak = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2000 {
                    let a = Arc::new(Account::new(32 * MIB, tenant.clone(), process.clone()));
                    if let Ok(_held) = a.hold(20 * MIB) {
                        peak.fetch_max(tenant.used(), Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert!(peak.load(Ordering::Relaxed) <= 64 * MIB);
    assert_eq!((tenant.used(), process.used()), (0, 0));
}
