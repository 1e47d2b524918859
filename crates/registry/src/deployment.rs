//! A deployment: the version of a worker that serves its requests, or a
//! split of its requests between up to [`MAX_SPLIT`] versions by integer
//! percentages that add up to 100.
//!
//! A request is placed by a roll in `0..100`: [`sticky_roll`] of the value
//! of the configured sticky header, so that the same key always reaches the
//! same version, or [`random_roll`] without one.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// The most versions one deployment splits requests between.
pub const MAX_SPLIT: usize = 4;

/// One version of a split and its share of requests, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub version: u64,
    pub percent: u8,
}

/// Which versions serve a worker's requests. Always valid: built only by
/// [`Deployment::single`] and [`Deployment::split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    targets: Vec<Target>,
}

/// Why a split was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeploymentError {
    #[error("a deployment needs at least one version")]
    Empty,
    #[error("a split has at most {MAX_SPLIT} versions, not {0}")]
    TooManyVersions(usize),
    #[error("version {0} is listed twice in the split")]
    Duplicate(u64),
    #[error("version {version} has {percent}%: each version of a split needs 1% to 100%")]
    Share { version: u64, percent: u8 },
    #[error("the split's percentages add up to {0}, not 100")]
    Total(u32),
}

impl Deployment {
    /// Every request to `version`.
    pub fn single(version: u64) -> Deployment {
        Deployment { targets: vec![Target { version, percent: 100 }] }
    }

    /// Requests split between `targets`, in the order given.
    pub fn split(targets: Vec<Target>) -> Result<Deployment, DeploymentError> {
        if targets.is_empty() {
            return Err(DeploymentError::Empty);
        }
        if targets.len() > MAX_SPLIT {
            return Err(DeploymentError::TooManyVersions(targets.len()));
        }
        for (i, t) in targets.iter().enumerate() {
            if !(1..=100).contains(&t.percent) {
                return Err(DeploymentError::Share { version: t.version, percent: t.percent });
            }
            if targets[..i].iter().any(|u| u.version == t.version) {
                return Err(DeploymentError::Duplicate(t.version));
            }
        }
        let total: u32 = targets.iter().map(|t| u32::from(t.percent)).sum();
        if total != 100 {
            return Err(DeploymentError::Total(total));
        }
        Ok(Deployment { targets })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The versions this deployment serves.
    pub fn versions(&self) -> impl Iterator<Item = u64> + '_ {
        self.targets.iter().map(|t| t.version)
    }

    /// The version that a request with `roll` (in `0..100`) goes to: the
    /// targets take consecutive ranges of rolls, as wide as their shares.
    pub fn pick(&self, roll: u8) -> u64 {
        let mut upper = 0u32;
        for t in &self.targets {
            upper += u32::from(t.percent);
            if u32::from(roll) < upper {
                return t.version;
            }
        }
        // A roll of 100 or more is a caller's mistake; the last target
        // takes it rather than no version at all.
        self.targets[self.targets.len() - 1].version
    }

    /// The stored form: `version:percent` pairs separated by commas.
    pub(crate) fn encode(&self) -> String {
        self.targets.iter().map(|t| format!("{}:{}", t.version, t.percent)).collect::<Vec<_>>().join(",")
    }

    /// The stored form back, validated again.
    pub(crate) fn decode(text: &str) -> Option<Deployment> {
        let targets = text
            .split(',')
            .map(|pair| {
                let (v, p) = pair.split_once(':')?;
                Some(Target { version: v.parse().ok()?, percent: p.parse().ok()? })
            })
            .collect::<Option<Vec<_>>>()?;
        Deployment::split(targets).ok()
    }
}

impl fmt::Display for Deployment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let [only] = self.targets.as_slice() {
            return write!(f, "version {}", only.version);
        }
        let parts: Vec<String> = self.targets.iter().map(|t| format!("version {} {}%", t.version, t.percent)).collect();
        f.write_str(&parts.join(", "))
    }
}

/// The roll of a sticky key. It depends on the key alone (SHA-256, not the
/// process's randomly seeded hasher), so a key reaches the same version on
/// every server and after every restart, for as long as the split is the same.
pub fn sticky_roll(key: &[u8]) -> u8 {
    let digest = Sha256::digest(key);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 100) as u8
}

/// A uniformly random roll, for a request without a sticky key.
pub fn random_roll() -> u8 {
    rand::random_range(0..100u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(version: u64, percent: u8) -> Target {
        Target { version, percent }
    }

    #[test]
    fn a_split_is_refused_unless_it_is_up_to_four_versions_adding_up_to_100() {
        assert_eq!(Deployment::split(vec![]), Err(DeploymentError::Empty));
        assert_eq!(Deployment::split(vec![t(1, 20); 5]), Err(DeploymentError::TooManyVersions(5)));
        assert_eq!(Deployment::split(vec![t(1, 50), t(1, 50)]), Err(DeploymentError::Duplicate(1)));
        assert_eq!(Deployment::split(vec![t(1, 0), t(2, 100)]), Err(DeploymentError::Share { version: 1, percent: 0 }));
        assert_eq!(Deployment::split(vec![t(1, 60), t(2, 30)]), Err(DeploymentError::Total(90)));
        assert_eq!(Deployment::split(vec![t(1, 101)]), Err(DeploymentError::Share { version: 1, percent: 101 }));
        let four = Deployment::split(vec![t(1, 25), t(2, 25), t(3, 25), t(4, 25)]).unwrap();
        assert_eq!(four.versions().collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(Deployment::decode(&four.encode()), Some(four));
        assert_eq!(Deployment::decode("1:50,2:40"), None, "a damaged record is not a deployment");
    }

    #[test]
    fn a_90_10_split_lands_within_two_percent_over_10000_requests() {
        let split = Deployment::split(vec![t(7, 90), t(8, 10)]).unwrap();
        let to_new = (0..10_000).filter(|_| split.pick(random_roll()) == 8).count();
        assert!((800..=1200).contains(&to_new), "{to_new} of 10000 went to the 10% version");
        // Sticky keys: each key always reaches one version, and the keys
        // spread as the split says.
        let mut sticky_to_new = 0;
        for i in 0..10_000 {
            let key = format!("user-{i}");
            let version = split.pick(sticky_roll(key.as_bytes()));
            for _ in 0..3 {
                assert_eq!(split.pick(sticky_roll(key.as_bytes())), version);
            }
            sticky_to_new += usize::from(version == 8);
        }
        assert!((800..=1200).contains(&sticky_to_new), "{sticky_to_new} of 10000 keys went to the 10% version");
    }

    #[test]
    fn every_roll_has_a_version() {
        let split = Deployment::split(vec![t(1, 33), t(2, 33), t(3, 34)]).unwrap();
        let picks: Vec<u64> = (0..100).map(|r| split.pick(r)).collect();
        assert_eq!(picks.iter().filter(|&&v| v == 1).count(), 33);
        assert_eq!(picks.iter().filter(|&&v| v == 3).count(), 34);
        assert_eq!(split.pick(250), 3);
    }
}
