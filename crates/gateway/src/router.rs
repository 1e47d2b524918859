//! Routing: exact host (without port, case-insensitive), then the longest
//! path prefix, matched by whole segments (`/hello` matches `/hello` and
//! `/hello/x`, not `/helloworld`).

use std::collections::HashMap;
use std::sync::Arc;

use cordon_runtime::Executor;
use cordon_runtime::registry::{Deployed, Snapshot};

use crate::http1::KeptAlive;
use crate::http1::body::RequestBody;

/// Where a request goes: the version of the worker that runs it, and the
/// count of keep-alive connections its tenant's responses hold.
#[derive(Clone)]
pub(crate) struct Target {
    pub worker: Arc<dyn Executor<RequestBody>>,
    pub kept_alive: Arc<KeptAlive>,
}

/// Where a route leads: the deployed worker, and its tenant's count.
#[derive(Clone)]
pub(crate) struct Routed {
    pub deployed: Arc<Deployed>,
    pub kept_alive: Arc<KeptAlive>,
}

/// The routes of one registry snapshot.
pub(crate) struct Router {
    /// The snapshot it was built from.
    pub generation: u64,
    /// Per host, the prefixes longest first.
    hosts: HashMap<String, Vec<(String, Routed)>>,
}

impl Router {
    /// `kept_alive` gives each worker's tenant its count.
    pub fn new(snapshot: &Snapshot, kept_alive: &dyn Fn(&str) -> Arc<KeptAlive>) -> Self {
        let mut hosts: HashMap<String, Vec<(String, Routed)>> = HashMap::new();
        for deployed in snapshot.workers() {
            for r in &deployed.routes {
                let routed = Routed { deployed: deployed.clone(), kept_alive: kept_alive(&deployed.tenant) };
                hosts.entry(r.host.clone()).or_default().push((r.path_prefix.clone(), routed));
            }
        }
        for routes in hosts.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        Self { generation: snapshot.generation, hosts }
    }

    pub fn find(&self, host: &str, path: &str) -> Option<&Routed> {
        self.hosts.get(host)?.iter().find(|(prefix, _)| prefix_matches(prefix, path)).map(|(_, t)| t)
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/" || path == prefix || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/hello", "/hello"));
        assert!(prefix_matches("/hello", "/hello/x"));
        assert!(!prefix_matches("/hello", "/helloworld"));
        assert!(!prefix_matches("/hello", "/"));
    }
}
