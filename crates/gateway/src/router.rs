//! Routing: exact host (without port, case-insensitive), then the longest
//! path prefix, matched by whole segments (`/hello` matches `/hello` and
//! `/hello/x`, not `/helloworld`).

use std::collections::HashMap;
use std::sync::Arc;

use cordon_runtime::Executor;

use crate::http1::KeptAlive;
use crate::http1::body::RequestBody;

/// Where a route leads: the worker, and the count of keep-alive
/// connections its tenant's responses hold, found here so that a request
/// looks up nothing more.
#[derive(Clone)]
pub(crate) struct Target {
    pub worker: Arc<dyn Executor<RequestBody>>,
    pub kept_alive: Arc<KeptAlive>,
}

pub(crate) struct Router {
    /// Per host, the prefixes longest first.
    hosts: HashMap<String, Vec<(String, Target)>>,
}

impl Router {
    /// `kept_alive` gives each worker's tenant its count.
    pub fn new(workers: &[Arc<dyn Executor<RequestBody>>], kept_alive: impl Fn(&str) -> Arc<KeptAlive>) -> Self {
        let mut hosts: HashMap<String, Vec<(String, Target)>> = HashMap::new();
        for w in workers {
            for r in w.routes() {
                let target = Target { worker: w.clone(), kept_alive: kept_alive(w.tenant()) };
                hosts.entry(r.host.clone()).or_default().push((r.path_prefix.clone(), target));
            }
        }
        for routes in hosts.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        Self { hosts }
    }

    pub fn find(&self, host: &str, path: &str) -> Option<&Target> {
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
