//! Routing: exact host (without port, case-insensitive), then the longest
//! path prefix, matched by whole segments (`/hello` matches `/hello` and
//! `/hello/x`, not `/helloworld`).

use std::collections::HashMap;
use std::sync::Arc;

use cordon_runtime::Worker;

pub(crate) struct Router {
    /// Per host, the prefixes longest first.
    hosts: HashMap<String, Vec<(String, Arc<Worker>)>>,
}

impl Router {
    pub fn new(workers: &[Arc<Worker>]) -> Self {
        let mut hosts: HashMap<String, Vec<(String, Arc<Worker>)>> = HashMap::new();
        for w in workers {
            for r in &w.routes {
                hosts.entry(r.host.clone()).or_default().push((r.path_prefix.clone(), w.clone()));
            }
        }
        for routes in hosts.values_mut() {
            routes.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
        }
        Self { hosts }
    }

    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Worker>> {
        self.hosts.get(host)?.iter().find(|(prefix, _)| prefix_matches(prefix, path)).map(|(_, w)| w)
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
