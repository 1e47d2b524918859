//! The policy half of egress control: which outbound destinations a worker
//! may reach. Pure functions over parsed values, no I/O, so that every rule
//! is tested exhaustively here; resolving names and connecting to the checked
//! addresses belong to the runtime's outbound handler.
//!
//! The rules, in the order a request meets them:
//! 1. the target's host must be a name or a canonical IP literal
//!    ([`host::parse_host`]); integer, octal, hex and shortened IPv4 forms are
//!    refused, because resolvers and libraries disagree about them;
//! 2. scheme, host and port must match an entry of the worker's
//!    [`Allowlist`];
//! 3. every address the host resolves to must be public
//!    ([`address::forbidden_range`]) unless the matching entry names that
//!    literal IP or a CIDR containing it.

pub mod address;
pub mod allowlist;
pub mod host;

pub use address::{ForbiddenRange, forbidden_range};
pub use allowlist::{Allowlist, AllowlistError, HostPattern, OutboundRule, Scheme};
pub use host::{HostError, TargetHost, parse_host};
