//! Egress control: which outbound destinations a worker may reach, and the
//! sending of its subrequests under that policy.
//!
//! The rules, in the order a subrequest meets them:
//! 1. the request's attempt budget (`max_subrequests`) and byte budget;
//! 2. the target's host must be a name or a canonical IP literal
//!    ([`host::parse_host`]); integer, octal, hex and shortened IPv4 forms are
//!    refused, because resolvers and libraries disagree about them;
//! 3. scheme, host and port must match an entry of the worker's
//!    [`Allowlist`];
//! 4. the name is resolved once, asynchronously and within a lookup slot of
//!    the tenant's ([`network`]), and every address it resolves to must be
//!    public ([`address::forbidden_range`]) unless the matching entry names
//!    that literal IP or a CIDR containing it;
//! 5. the connection goes to one of exactly those checked addresses, so a
//!    second lookup can never rebind the name; `https` verifies the
//!    certificate against the name; redirects are returned, never followed.
//!
//! The policy ([`allowlist`], [`address`], [`host`]) is pure and tested
//! exhaustively here; [`send`] does the I/O, through the [`Network`] the
//! process shares.

pub mod address;
pub mod allowlist;
pub mod host;
pub mod network;
pub mod send;

pub use address::{ForbiddenRange, forbidden_range};
pub use allowlist::{Allowlist, AllowlistError, HostPattern, OutboundRule, Scheme};
pub use host::{HostError, TargetHost, parse_host};
pub use network::{
    BoxFuture, DEFAULT_OUTBOUND_CONNECTIONS_PER_TENANT, Dial, DnsConfig, DnsResolver, HostsFile, LookupLimits, Network, NetworkBuilder,
    NetworkError, Resolve, TcpDialer,
};
pub use send::{
    ConnectionTask, EgressError, EgressLimits, EgressStats, EgressUsage, Phase, RequestEgress, ResponseBody, Timeouts, WorkerEgress,
};
