//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as Postgres speaks it.
//!
//! The accelerator authenticates clients itself, so it never needs their passwords: it keeps a
//! [`ScramVerifier`] (the same secret Postgres stores in `pg_authid`) and proves to the client
//! that it holds it. Channel binding is not offered (no SCRAM-SHA-256-PLUS), so a client that
//! insists on it is refused rather than silently downgraded.
//!
//! Every client message is bounded to [`MAX_MESSAGE_BYTES`] before it is parsed. Failures carry
//! no secrets, and a wrong password is indistinguishable from an unknown user: see
//! [`ScramServer::new_for_unknown_user`].

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use rand::{RngCore, TryRngCore};
use sha2::{Digest, Sha256};

/// The SASL mechanism name to advertise in AuthenticationSASL.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Postgres's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Real client messages are well under 200 bytes; a few KiB leaves room for long user names.
pub const MAX_MESSAGE_BYTES: usize = 4096;

/// Postgres generates 16-byte salts.
const SALT_BYTES: usize = 16;
/// Parsed verifiers may come from elsewhere; this bounds what we accept from them.
const MAX_SALT_BYTES: usize = 256;
const MAX_VERIFIER_BYTES: usize = 1024;
/// 24 random bytes encode to 32 base64 characters with no padding.
const SERVER_NONCE_BYTES: usize = 24;
const KEY_BYTES: usize = 32;
const VERIFIER_PREFIX: &str = "SCRAM-SHA-256$";

type HmacSha256 = Hmac<Sha256>;

/// What a failed exchange reports. Messages name the step and the problem, never a password,
/// key or proof.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("SCRAM {message} is {len} bytes, more than the {max}-byte limit")]
    MessageTooLong { message: &'static str, len: usize, max: usize },
    #[error("SCRAM {message} is not valid UTF-8")]
    NotUtf8 { message: &'static str },
    #[error("malformed SCRAM {message}: {reason}")]
    Malformed { message: &'static str, reason: &'static str },
    #[error("client requires SCRAM channel binding, but this server does not offer SCRAM-SHA-256-PLUS")]
    ChannelBindingNotSupported,
    #[error("client uses a SCRAM authorization identity, which is not supported")]
    AuthzidNotSupported,
    #[error("client requires an unsupported SCRAM extension")]
    MandatoryExtension,
    #[error("SCRAM channel binding data does not match the client-first-message")]
    ChannelBindingMismatch,
    #[error("SCRAM nonce in the client-final-message does not match")]
    NonceMismatch,
    /// Deliberately the same for a wrong password and an unknown user.
    #[error("password authentication failed")]
    AuthenticationFailed,
    #[error("SCRAM {0} received out of order")]
    OutOfOrder(&'static str),
    #[error("could not read OS randomness for the SCRAM nonce")]
    Randomness,
    #[error("invalid SCRAM-SHA-256 verifier: {0}")]
    InvalidVerifier(&'static str),
}

impl ScramError {
    /// The SQLSTATE to report to the client.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            // invalid_password
            ScramError::AuthenticationFailed => "28P01",
            // system_error
            ScramError::Randomness => "58000",
            // internal_error: the stored verifier is broken, not the client.
            ScramError::InvalidVerifier(_) => "XX000",
            // protocol_violation, as Postgres reports malformed SCRAM messages.
            _ => "08P01",
        }
    }
}

/// The secret a server keeps instead of a password: salt, iteration count, StoredKey and
/// ServerKey. It is password-equivalent for impersonating the server and for logging in with a
/// sniffed exchange, so `Debug` hides the keys.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; KEY_BYTES],
    server_key: [u8; KEY_BYTES],
}

impl ScramVerifier {
    /// Derives a verifier with a fresh random salt. An iteration count of 0 is raised to 1.
    pub fn from_password(password: &str, iterations: u32) -> ScramVerifier {
        let mut salt = [0u8; SALT_BYTES];
        rand::rng().fill_bytes(&mut salt);
        Self::from_password_with_salt(password, &salt, iterations)
    }

    pub(crate) fn from_password_with_salt(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let iterations = iterations.max(1);
        let salted = hi(&normalize(password), salt, iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        ScramVerifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// Parses Postgres's stored form, `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`,
    /// as found in `pg_authid.rolpassword` or produced by `ALTER ROLE ... PASSWORD`.
    pub fn parse(s: &str) -> Result<ScramVerifier, ScramError> {
        use ScramError::InvalidVerifier as Invalid;
        if s.len() > MAX_VERIFIER_BYTES {
            return Err(Invalid("longer than 1024 bytes"));
        }
        let rest = s.strip_prefix(VERIFIER_PREFIX).ok_or(Invalid("does not start with \"SCRAM-SHA-256$\""))?;
        let (params, keys) = rest.split_once('$').ok_or(Invalid("missing '$' between parameters and keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(Invalid("missing ':' between iteration count and salt"))?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(Invalid("missing ':' between StoredKey and ServerKey"))?;
        if iterations.is_empty() || !iterations.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Invalid("iteration count is not a number"));
        }
        let iterations: u32 = iterations.parse().map_err(|_| Invalid("iteration count is out of range"))?;
        // Postgres's scram_iterations is an int GUC with a minimum of 1.
        if iterations == 0 || iterations > i32::MAX as u32 {
            return Err(Invalid("iteration count is out of range"));
        }
        let salt = STANDARD.decode(salt).map_err(|_| Invalid("salt is not valid base64"))?;
        if salt.is_empty() || salt.len() > MAX_SALT_BYTES {
            return Err(Invalid("salt must be 1 to 256 bytes"));
        }
        let key = |b64: &str, what: &'static str| -> Result<[u8; KEY_BYTES], ScramError> {
            STANDARD.decode(b64).ok().and_then(|k| <[u8; KEY_BYTES]>::try_from(k).ok()).ok_or(Invalid(what))
        };
        Ok(ScramVerifier {
            salt,
            iterations,
            stored_key: key(stored_key, "StoredKey is not 32 bytes of base64")?,
            server_key: key(server_key, "ServerKey is not 32 bytes of base64")?,
        })
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

/// The Postgres stored form, the inverse of [`ScramVerifier::parse`].
impl fmt::Display for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{VERIFIER_PREFIX}{}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

impl FromStr for ScramVerifier {
    type Err = ScramError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScramVerifier::parse(s)
    }
}

impl fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramVerifier").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

/// Makes unknown users look like real ones.
///
/// A client learns the salt and iteration count from server-first-message before any password
/// check. If an unknown user got a fresh random salt on every attempt, two attempts would reveal
/// that the user does not exist (a real user's salt never changes). So, as Postgres does with
/// its `mock_auth_nonce`, the salt is derived from the user name and a server secret: stable
/// for a name, unpredictable without the secret. Keep one `MockAuth` for the life of the
/// process, or persist its key so salts also survive restarts.
#[derive(Clone)]
pub struct MockAuth {
    key: [u8; KEY_BYTES],
    iterations: u32,
}

impl MockAuth {
    /// A mock with a random key. `iterations` should match what real users' verifiers use.
    pub fn random(iterations: u32) -> MockAuth {
        let mut key = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        MockAuth::from_key(key, iterations)
    }

    pub fn from_key(key: [u8; KEY_BYTES], iterations: u32) -> MockAuth {
        MockAuth { key, iterations: iterations.max(1) }
    }

    fn verifier_for(&self, user: &str) -> ScramVerifier {
        let salt = hmac(&self.key, &[b"cordon scram mock salt\0", user.as_bytes()]);
        // The keys never verify anything (the server is told to fail), so they are random.
        let mut stored_key = [0u8; KEY_BYTES];
        let mut server_key = [0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut stored_key);
        rand::rng().fill_bytes(&mut server_key);
        ScramVerifier { salt: salt[..SALT_BYTES].to_vec(), iterations: self.iterations, stored_key, server_key }
    }
}

impl fmt::Debug for MockAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockAuth").field("iterations", &self.iterations).finish_non_exhaustive()
    }
}

enum State {
    AwaitingClientFirst,
    AwaitingClientFinal {
        /// Echoed, base64-encoded, in the client-final `c=` attribute.
        gs2_header: String,
        client_first_bare: String,
        server_first: String,
        /// Client nonce followed by server nonce.
        nonce: String,
    },
    /// Succeeded or failed; either way nothing more is accepted.
    Done,
}

/// One SCRAM-SHA-256 exchange: feed it the client's SASLInitialResponse data, send back the
/// result in AuthenticationSASLContinue, feed it the SASLResponse data, and send back the result
/// in AuthenticationSASLFinal. Authentication succeeded only if [`ScramServer::client_final`]
/// returned `Ok`. Any error ends the exchange.
pub struct ScramServer {
    verifier: ScramVerifier,
    /// Set for unknown users, so the exchange runs in full and then fails.
    always_fail: bool,
    state: State,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::AwaitingClientFirst => "awaiting client-first-message",
            State::AwaitingClientFinal { .. } => "awaiting client-final-message",
            State::Done => "done",
        };
        f.debug_struct("ScramServer").field("state", &state).finish_non_exhaustive()
    }
}

impl ScramServer {
    pub fn new(verifier: &ScramVerifier) -> Self {
        ScramServer { verifier: verifier.clone(), always_fail: false, state: State::AwaitingClientFirst }
    }

    /// An exchange for a user who does not exist. It sends the same kind of server-first-message
    /// as a real user's (stable salt, same iteration count), does the same work on the proof, and
    /// fails with the same [`ScramError::AuthenticationFailed`] as a wrong password, so a client
    /// cannot probe which users exist.
    pub fn new_for_unknown_user(user: &str, mock: &MockAuth) -> Self {
        ScramServer { verifier: mock.verifier_for(user), always_fail: true, state: State::AwaitingClientFirst }
    }

    /// Handles client-first-message; returns server-first-message.
    pub fn client_first(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut nonce = [0u8; SERVER_NONCE_BYTES];
        rand::rngs::OsRng.try_fill_bytes(&mut nonce).map_err(|_| {
            self.state = State::Done;
            ScramError::Randomness
        })?;
        self.client_first_with_nonce(data, &STANDARD.encode(nonce))
    }

    fn client_first_with_nonce(&mut self, data: &[u8], server_nonce: &str) -> Result<Vec<u8>, ScramError> {
        const MESSAGE: &str = "client-first-message";
        if !matches!(std::mem::replace(&mut self.state, State::Done), State::AwaitingClientFirst) {
            return Err(ScramError::OutOfOrder(MESSAGE));
        }
        let msg = bounded_utf8(MESSAGE, data)?;
        let malformed = |reason| ScramError::Malformed { message: MESSAGE, reason };

        // gs2-header = gs2-cbind-flag "," [ authzid ] ","
        let (flag, rest) = msg.split_once(',').ok_or(malformed("missing GS2 header"))?;
        match flag {
            // "n": client does not support channel binding. "y": it does, but believes we do
            // not; true, since we never advertise SCRAM-SHA-256-PLUS.
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingNotSupported),
            _ => return Err(malformed("GS2 channel-binding flag must be 'n', 'y' or 'p=...'")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(malformed("GS2 header is not terminated by ','"))?;
        match authzid {
            "" => {}
            a if a.starts_with("a=") => return Err(ScramError::AuthzidNotSupported),
            _ => return Err(malformed("GS2 authorization identity must be empty or 'a=...'")),
        }
        let gs2_header = &msg[..msg.len() - bare.len()];

        let mut attrs = bare.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(ScramError::MandatoryExtension);
        }
        // The user name is ignored, as in Postgres: the startup packet's `user` is what counts,
        // and libpq sends "n=". It still has to be well formed.
        let user = first.strip_prefix("n=").ok_or(malformed("expected the user name attribute 'n='"))?;
        if !is_saslname(user) {
            return Err(malformed("user name has an invalid '=' escape"));
        }
        let client_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(malformed("expected the nonce attribute 'r='"))?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(is_printable) {
            return Err(malformed("nonce must be non-empty printable ASCII"));
        }
        // RFC 5802: optional extensions may follow and are ignored if not understood.
        if !attrs.all(is_attribute) {
            return Err(malformed("invalid attribute after the nonce"));
        }

        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!("r={nonce},s={},i={}", STANDARD.encode(&self.verifier.salt), self.verifier.iterations);
        let reply = server_first.clone().into_bytes();
        self.state =
            State::AwaitingClientFinal { gs2_header: gs2_header.to_owned(), client_first_bare: bare.to_owned(), server_first, nonce };
        Ok(reply)
    }

    /// Handles client-final-message; returns server-final-message, which lets the client check
    /// that we know the verifier. `Ok` means the client proved it knows the password.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        const MESSAGE: &str = "client-final-message";
        let State::AwaitingClientFinal { gs2_header, client_first_bare, server_first, nonce } =
            std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::OutOfOrder(MESSAGE));
        };
        let msg = bounded_utf8(MESSAGE, data)?;
        let malformed = |reason| ScramError::Malformed { message: MESSAGE, reason };

        // The proof must be the last attribute, and it signs everything before it.
        let (without_proof, proof) = msg.rsplit_once(",p=").ok_or(malformed("missing the proof attribute 'p='"))?;
        let proof: [u8; KEY_BYTES] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(malformed("proof must be the last attribute, 32 bytes of base64"))?;

        let mut attrs = without_proof.split(',');
        let binding = attrs.next().and_then(|a| a.strip_prefix("c=")).ok_or(malformed("expected the channel binding attribute 'c='"))?;
        let binding = STANDARD.decode(binding).map_err(|_| malformed("channel binding is not valid base64"))?;
        // Without channel binding, c= carries the GS2 header and nothing else.
        if binding != gs2_header.as_bytes() {
            return Err(ScramError::ChannelBindingMismatch);
        }
        let final_nonce = attrs.next().and_then(|a| a.strip_prefix("r=")).ok_or(malformed("expected the nonce attribute 'r='"))?;
        if final_nonce != nonce {
            return Err(ScramError::NonceMismatch);
        }
        if !attrs.all(is_attribute) {
            return Err(malformed("invalid attribute before the proof"));
        }

        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature) {
            *k ^= s;
        }
        let computed = CtOutput::<Sha256>::new(Sha256::digest(client_key));
        let stored = CtOutput::<Sha256>::new(self.verifier.stored_key.into());
        // Constant time, and the unknown-user path does the same work before failing.
        let proof_ok = computed == stored;
        if !proof_ok || self.always_fail {
            return Err(ScramError::AuthenticationFailed);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

fn bounded_utf8<'a>(message: &'static str, data: &'a [u8]) -> Result<&'a str, ScramError> {
    if data.len() > MAX_MESSAGE_BYTES {
        return Err(ScramError::MessageTooLong { message, len: data.len(), max: MAX_MESSAGE_BYTES });
    }
    std::str::from_utf8(data).map_err(|_| ScramError::NotUtf8 { message })
}

/// RFC 5802 `printable`: visible ASCII except ','.
fn is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x2b | 0x2d..=0x7e)
}

/// RFC 5802 `saslname`: '=' appears only in the escapes "=2C" and "=3D".
fn is_saslname(s: &str) -> bool {
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        let escape = &rest[i..];
        if !(escape.starts_with("=2C") || escape.starts_with("=3D")) {
            return false;
        }
        rest = &escape[3..];
    }
    true
}

/// RFC 5802 `attr-val`: one ASCII letter, '=', and a value without ','.
fn is_attribute(a: &str) -> bool {
    let bytes = a.as_bytes();
    bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b'='
}

/// SASLprep (RFC 4013), as Postgres and its clients apply it. Passwords that SASLprep refuses
/// (prohibited characters) are used as they are, which is also what Postgres, libpq and
/// tokio-postgres do, so both sides derive the same key either way.
fn normalize(password: &str) -> Cow<'_, [u8]> {
    if password.is_ascii() {
        // The common case, and the identity under SASLprep (or refused by it, which also
        // means the raw bytes).
        return Cow::Borrowed(password.as_bytes());
    }
    match stringprep::saslprep(password) {
        Ok(prepared) => Cow::Owned(prepared.into_owned().into_bytes()),
        Err(_) => Cow::Borrowed(password.as_bytes()),
    }
}

/// HMAC-SHA-256 over the concatenation of `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_BYTES] {
    let mut mac = keyed(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC hashes over-long keys and pads short ones, so no key length is refused.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// PBKDF2-HMAC-SHA-256 with one output block, which is SCRAM's Hi(). The keyed state is cloned
/// per round instead of rebuilt, halving the work.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; KEY_BYTES] {
    let key = keyed(password);
    let mut mac = key.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; KEY_BYTES] = mac.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut mac = key.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Recognises the error a malformed input must produce.
    type Check = fn(&ScramError) -> bool;

    /// Fast verifiers for tests that are not about the iteration count.
    const FAST: u32 = 16;
    const SERVER_NONCE: &str = "c2VydmVyIG5vbmNlIGZvciB0ZXN0cw";

    /// Verifiers produced by PostgreSQL 15 (`CREATE ROLE ... PASSWORD` with
    /// password_encryption = 'scram-sha-256'), with the passwords they were made from.
    const POSTGRES_VERIFIERS: [(&str, &str); 3] = [
        (
            "correct horse battery staple",
            "SCRAM-SHA-256$4096:yxxYz2EypmYK83LDzt9RQg==$gQkWv9XQW0r2fOLuwTzeXAvtrpmmRBKnk09zvygt7wg=:GWMSG2lc+QrjF8IAsBJs9XGu/IKToS9cASWrYRp7rE8=",
        ),
        // Full-width letters, which SASLprep folds to "pass".
        (
            "\u{ff50}\u{ff41}\u{ff53}\u{ff53}",
            "SCRAM-SHA-256$4096:vSr8ybEi1vFB/gStcxu6Ag==$6XM8Nk4kf78RQampCZrJtKKHgx8Vr/QQXUbNmcyjr/E=:kxHsL0BZFhJbXXNRr5wKdPEfbGzaWYUcpTFpOqvW32A=",
        ),
        // A no-break space (mapped to a space) and a soft hyphen (mapped to nothing).
        (
            "pa\u{a0}ss\u{ad}word",
            "SCRAM-SHA-256$4096:/IIJf9eq8Otz7N61RGyKcQ==$PY45zhAWTy6NEY5i3c/5nBAInbavz4kIlCBWhyRvAok=:cZ7j9ZMbefI+bdp4gwl0RQTBth/fUIbYdPEMPegMVxk=",
        ),
    ];

    /// Runs a whole exchange against the client tokio-postgres uses. The client's own checks
    /// (nonce prefix, server signature) must pass whenever the server accepts.
    fn exchange(server: &mut ScramServer, password: &str, binding: ChannelBinding) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), binding);
        let server_first = server.client_first(client.message())?;
        client.update(&server_first).expect("client accepts server-first-message");
        let server_final = server.client_final(client.message())?;
        client.finish(&server_final).expect("client verifies server-final-message");
        Ok(())
    }

    fn text(bytes: Vec<u8>) -> String {
        String::from_utf8(bytes).unwrap()
    }

    /// What a client computes for `p=`, written out from RFC 5802 so tests need no random nonce.
    fn client_final_for(password: &str, verifier: &ScramVerifier, client_first_bare: &str, server_first: &str, header_b64: &str) -> String {
        let nonce = server_first.split(',').next().unwrap().strip_prefix("r=").unwrap();
        let without_proof = format!("c={header_b64},r={nonce}");
        let salted = hi(&normalize(password), &verifier.salt, verifier.iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let signature = hmac(&stored_key, &[format!("{client_first_bare},{server_first},{without_proof}").as_bytes()]);
        let proof: Vec<u8> = client_key.iter().zip(signature).map(|(k, s)| k ^ s).collect();
        format!("{without_proof},p={}", STANDARD.encode(proof))
    }

    #[test]
    fn authenticates_tokio_postgres_client() {
        let verifier = ScramVerifier::from_password("s3cret", DEFAULT_ITERATIONS);
        for binding in [ChannelBinding::unsupported(), ChannelBinding::unrequested()] {
            let mut server = ScramServer::new(&verifier);
            exchange(&mut server, "s3cret", binding).unwrap();
            // The exchange is over.
            assert!(matches!(server.client_final(b"c=biws,r=x,p=x"), Err(ScramError::OutOfOrder(_))));
        }
    }

    #[test]
    fn wrong_password_fails() {
        let verifier = ScramVerifier::from_password("s3cret", FAST);
        for password in ["s3cret ", "S3cret", "", "s3cre"] {
            let err = exchange(&mut ScramServer::new(&verifier), password, ChannelBinding::unsupported()).unwrap_err();
            assert!(matches!(err, ScramError::AuthenticationFailed), "{err}");
            assert_eq!(err.sqlstate(), "28P01");
        }
    }

    #[test]
    fn unknown_user_fails_exactly_like_a_wrong_password() {
        let verifier = ScramVerifier::from_password("s3cret", FAST);
        let mock = MockAuth::random(FAST);
        let wrong = exchange(&mut ScramServer::new(&verifier), "guess", ChannelBinding::unsupported()).unwrap_err();
        for password in ["guess", "s3cret", ""] {
            let unknown =
                exchange(&mut ScramServer::new_for_unknown_user("mallory", &mock), password, ChannelBinding::unsupported()).unwrap_err();
            assert!(matches!(unknown, ScramError::AuthenticationFailed));
            assert_eq!(unknown.to_string(), wrong.to_string());
            assert_eq!(unknown.sqlstate(), wrong.sqlstate());
        }

        // server-first-message has the same shape, and a stable salt per user name.
        let first = |server: &mut ScramServer| {
            let reply = text(server.client_first_with_nonce(b"n,,n=,r=abc", SERVER_NONCE).unwrap());
            let salt = reply.split(",s=").nth(1).unwrap().split(',').next().unwrap().to_owned();
            (reply.split(",i=").nth(1).unwrap().to_owned(), STANDARD.decode(&salt).unwrap())
        };
        let real = first(&mut ScramServer::new(&verifier));
        let mallory = first(&mut ScramServer::new_for_unknown_user("mallory", &mock));
        assert_eq!(mallory, first(&mut ScramServer::new_for_unknown_user("mallory", &mock)));
        assert_ne!(mallory.1, first(&mut ScramServer::new_for_unknown_user("trudy", &mock)).1);
        assert_ne!(mallory.1, first(&mut ScramServer::new_for_unknown_user("mallory", &MockAuth::random(FAST))).1);
        assert_eq!((real.0, real.1.len()), (mallory.0, mallory.1.len()));
        let persisted = MockAuth::from_key([7; 32], FAST);
        assert_eq!(
            first(&mut ScramServer::new_for_unknown_user("x", &persisted)),
            first(&mut ScramServer::new_for_unknown_user("x", &persisted))
        );
    }

    #[test]
    fn rfc7677_test_vector() {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let verifier = ScramVerifier::from_password_with_salt("pencil", &salt, 4096);
        let mut server = ScramServer::new(&verifier);
        let server_first = server.client_first_with_nonce(b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO", "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0").unwrap();
        assert_eq!(text(server_first), "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096");
        let server_final = server
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(text(server_final), "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn recorded_psql_exchange() {
        let salt = STANDARD.decode("fs3IXBy7U7+IvVjZ").unwrap();
        let verifier = ScramVerifier::from_password_with_salt("foobar", &salt, 4096);
        let mut server = ScramServer::new(&verifier);
        let server_first = server.client_first_with_nonce(b"n,,n=,r=9IZ2O01zb9IgiIZ1WJ/zgpJB", "jx/oIRLs02gGSHcw1KEty3eY").unwrap();
        assert_eq!(text(server_first), "r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,s=fs3IXBy7U7+IvVjZ,i=4096");
        let server_final = server
            .client_final(b"c=biws,r=9IZ2O01zb9IgiIZ1WJ/zgpJBjx/oIRLs02gGSHcw1KEty3eY,p=AmNKosjJzS31NTlQYNs5BTeQjdHdk7lOflDo5re2an8=")
            .unwrap();
        assert_eq!(text(server_final), "v=U+ppxD5XUKtradnv8e2MkeupiA8FU87Sg8CXzXHDAzw=");
    }

    #[test]
    fn verifier_string_round_trips() {
        let verifier = ScramVerifier::from_password("s3cret", 5000);
        let s = verifier.to_string();
        assert!(s.starts_with("SCRAM-SHA-256$5000:"), "{s}");
        assert_eq!(ScramVerifier::parse(&s).unwrap(), verifier);
        assert_eq!(s.parse::<ScramVerifier>().unwrap(), verifier);
        assert_eq!(verifier.salt().len(), 16);
        assert_ne!(ScramVerifier::from_password("s3cret", 5000), verifier, "fresh salt each time");
        assert_eq!(ScramVerifier::from_password("x", 0).iterations(), 1);
    }

    #[test]
    fn accepts_postgres_protocol_verifiers() {
        let s = postgres_protocol::password::scram_sha_256(b"from the client library");
        let verifier = ScramVerifier::parse(&s).unwrap();
        assert_eq!(verifier.to_string(), s);
        exchange(&mut ScramServer::new(&verifier), "from the client library", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn matches_verifiers_made_by_postgres() {
        for (password, stored) in POSTGRES_VERIFIERS {
            let verifier = ScramVerifier::parse(stored).unwrap();
            assert_eq!(verifier.to_string(), stored);
            // Same salt, same password: the same secret Postgres derived, SASLprep included.
            assert_eq!(ScramVerifier::from_password_with_salt(password, verifier.salt(), 4096), verifier, "{password:?}");
            exchange(&mut ScramServer::new(&verifier), password, ChannelBinding::unsupported()).unwrap();
        }
        // The normalized forms log in too, as they do against Postgres.
        let pass = ScramVerifier::parse(POSTGRES_VERIFIERS[1].1).unwrap();
        exchange(&mut ScramServer::new(&pass), "pass", ChannelBinding::unsupported()).unwrap();
        let spaced = ScramVerifier::parse(POSTGRES_VERIFIERS[2].1).unwrap();
        exchange(&mut ScramServer::new(&spaced), "pa ssword", ChannelBinding::unsupported()).unwrap();
    }

    #[test]
    fn refuses_malformed_verifiers() {
        let good = ScramVerifier::from_password("pw", FAST).to_string();
        let (head, keys) = good.rsplit_once('$').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        let cases = [
            String::new(),
            "md5abcdef".to_owned(),
            good.replace("SCRAM-SHA-256$", "SCRAM-SHA-1$"),
            good.replacen(':', ";", 1),
            format!("{head}${stored}"),
            format!("{head}${stored}:{}", &server[4..]),
            format!("{head}${}:{server}", stored.replace('=', "")),
            good.replace("$16:", "$0:"),
            good.replace("$16:", "$-16:"),
            good.replace("$16:", "$+16:"),
            good.replace("$16:", "$99999999999:"),
            good.replace("$16:", "$2147483648:"),
            good.replace("$16:", "$:"),
            format!("SCRAM-SHA-256$16:$${keys}"),
            format!("SCRAM-SHA-256$16:!!!!${keys}"),
            format!("SCRAM-SHA-256$16:{}${keys}", STANDARD.encode([0u8; 300])),
            format!("{good}{}", "A".repeat(2000)),
        ];
        for case in cases {
            let err = ScramVerifier::parse(&case).unwrap_err();
            assert!(matches!(err, ScramError::InvalidVerifier(_)), "{case:?}: {err}");
            assert!(!err.to_string().contains(stored), "errors do not quote keys");
        }
    }

    #[test]
    fn refuses_malformed_client_first() {
        let verifier = ScramVerifier::from_password("pw", FAST);
        let huge = format!("n,,n=,r={}", "a".repeat(MAX_MESSAGE_BYTES));
        let cases: Vec<(&[u8], Check)> = vec![
            (b"", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,", |e| matches!(e, ScramError::Malformed { .. })),
            (b"x,,n=,r=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"nn,,n=,r=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"p=tls-server-end-point,,n=,r=abc", |e| matches!(e, ScramError::ChannelBindingNotSupported)),
            (b"n,a=admin,n=,r=abc", |e| matches!(e, ScramError::AuthzidNotSupported)),
            (b"n,admin,n=,r=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,m=ext,n=,r=abc", |e| matches!(e, ScramError::MandatoryExtension)),
            (b"n,,n=", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,r=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,x=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=a\x01b", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=a b", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=bad=name,r=abc", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=abc,", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=abc,junk", |e| matches!(e, ScramError::Malformed { .. })),
            (b"n,,n=,r=ab\xffc", |e| matches!(e, ScramError::NotUtf8 { .. })),
            (huge.as_bytes(), |e| matches!(e, ScramError::MessageTooLong { .. })),
        ];
        for (input, check) in cases {
            let mut server = ScramServer::new(&verifier);
            let err = server.client_first(input).unwrap_err();
            assert!(check(&err), "{:?}: got {err:?}", String::from_utf8_lossy(input));
            assert!(matches!(server.client_first(b"n,,n=,r=abc"), Err(ScramError::OutOfOrder(_))), "an error ends the exchange");
        }
        // Accepted: escaped user names, and optional extensions, which RFC 5802 says to ignore.
        for input in [&b"n,,n=a=2Cb=3Dc,r=abc"[..], b"y,,n=user,r=abc,x=ext", b"n,,n=,r=!~"] {
            ScramServer::new(&verifier).client_first(input).unwrap();
        }
    }

    #[test]
    fn refuses_malformed_client_final() {
        let verifier = ScramVerifier::from_password("pw", FAST);
        let first = "n,,n=,r=clientnonce";
        let server_first = text(ScramServer::new(&verifier).client_first_with_nonce(first.as_bytes(), SERVER_NONCE).unwrap());
        let good = client_final_for("pw", &verifier, "n=,r=clientnonce", &server_first, "biws");
        let (without_proof, proof) = good.rsplit_once(",p=").unwrap();
        let mut tampered = STANDARD.decode(proof).unwrap();
        tampered[7] ^= 1;
        let nonce = format!("clientnonce{SERVER_NONCE}");
        let cases: Vec<(String, Check)> = vec![
            (good.replace(SERVER_NONCE, "c2VydmVyIG5vbmNlIGZvciB0ZXN0cX"), |e| matches!(e, ScramError::NonceMismatch)),
            (good.replace(&nonce, "clientnonce"), |e| matches!(e, ScramError::NonceMismatch)),
            (good.replace(",r=", ",r=x"), |e| matches!(e, ScramError::NonceMismatch)),
            (format!("{without_proof},p={}", STANDARD.encode(&tampered)), |e| matches!(e, ScramError::AuthenticationFailed)),
            (format!("{without_proof},p={}", STANDARD.encode([0u8; 32])), |e| matches!(e, ScramError::AuthenticationFailed)),
            (good.replace("c=biws", "c=eSws"), |e| matches!(e, ScramError::ChannelBindingMismatch)),
            (good.replace("c=biws", "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAAAA"), |e| matches!(e, ScramError::ChannelBindingMismatch)),
            (good.replace("c=biws", "c=b!ws"), |e| matches!(e, ScramError::Malformed { .. })),
            (good.replace("c=biws,", ""), |e| matches!(e, ScramError::Malformed { .. })),
            (without_proof.to_owned(), |e| matches!(e, ScramError::Malformed { .. })),
            (format!("{without_proof},p={}", STANDARD.encode([0u8; 31])), |e| matches!(e, ScramError::Malformed { .. })),
            (format!("{without_proof},p={proof}x"), |e| matches!(e, ScramError::Malformed { .. })),
            (format!("{good},x=trailing"), |e| matches!(e, ScramError::Malformed { .. })),
            (format!("{without_proof},junk,p={proof}"), |e| matches!(e, ScramError::Malformed { .. })),
            (format!("{without_proof},p={}", "A".repeat(MAX_MESSAGE_BYTES)), |e| matches!(e, ScramError::MessageTooLong { .. })),
        ];
        for (input, check) in cases {
            let mut server = ScramServer::new(&verifier);
            server.client_first_with_nonce(first.as_bytes(), SERVER_NONCE).unwrap();
            let err = server.client_final(input.as_bytes()).unwrap_err();
            assert!(check(&err), "{input:?}: got {err:?}");
            assert!(matches!(server.client_final(good.as_bytes()), Err(ScramError::OutOfOrder(_))), "an error ends the exchange");
        }
        // The untampered message, and one with an ignored extension, do authenticate.
        for input in [good.clone(), client_final_for("pw", &verifier, "n=,r=clientnonce", &server_first, "biws").replace(",p=", ",x=1,p=")]
        {
            let mut server = ScramServer::new(&verifier);
            server.client_first_with_nonce(first.as_bytes(), SERVER_NONCE).unwrap();
            let result = server.client_final(input.as_bytes());
            // The extension is inside the signed part, so only a proof computed over it passes.
            assert_eq!(result.is_ok(), input == good, "{input}");
        }
        let mut server = ScramServer::new(&verifier);
        assert!(matches!(server.client_final(good.as_bytes()), Err(ScramError::OutOfOrder(_))), "client-final first");
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let verifier = ScramVerifier::from_password("hunter2", FAST);
        let s = verifier.to_string();
        let (_, keys) = s.rsplit_once('$').unwrap();
        let (stored, server) = keys.split_once(':').unwrap();
        for shown in
            [format!("{verifier:?}"), format!("{:?}", ScramServer::new(&verifier)), format!("{:?}", MockAuth::from_key([9; 32], 1))]
        {
            assert!(!shown.contains(stored) && !shown.contains(server) && !shown.contains("hunter2") && !shown.contains("9, 9"), "{shown}");
        }
        let err = exchange(&mut ScramServer::new(&verifier), "hunter3", ChannelBinding::unsupported()).unwrap_err();
        assert!(!format!("{err} {err:?}").contains("hunter"));
    }

    fn mutate(rng: &mut StdRng, input: &mut Vec<u8>) {
        const PIECES: [&[u8]; 10] = [b",", b"=", b"r=", b"p=", b"c=", b"n,,", b"=2C", b"\0", b"\xff", b"AAAA"];
        for _ in 0..rng.random_range(1..4) {
            let len = input.len();
            match rng.random_range(0..5) {
                0 if len > 0 => input[rng.random_range(0..len)] = rng.random(),
                1 if len > 0 => {
                    let at = rng.random_range(0..len);
                    input.drain(at..rng.random_range(at..=len));
                }
                2 if len > 0 => input[rng.random_range(0..len)] = b"!,=az09+/"[rng.random_range(0..9)],
                3 => {
                    let at = rng.random_range(0..=len);
                    input.splice(at..at, PIECES[rng.random_range(0..PIECES.len())].iter().copied());
                }
                _ => {
                    let at = rng.random_range(0..=len);
                    let extra: Vec<u8> = (0..rng.random_range(1..6)).map(|_| rng.random()).collect();
                    input.splice(at..at, extra);
                }
            }
        }
    }

    #[test]
    fn fuzz_client_messages() {
        let mut rng = StdRng::seed_from_u64(0x5c4a_0001);
        let verifier = ScramVerifier::from_password_with_salt("pw", b"fixed salt", FAST);
        let first = b"n,,n=,r=clientnonce".to_vec();
        let server_first = text(ScramServer::new(&verifier).client_first_with_nonce(&first, SERVER_NONCE).unwrap());
        let good_final = client_final_for("pw", &verifier, "n=,r=clientnonce", &server_first, "biws").into_bytes();
        let (mut firsts_ok, mut finals_ok) = (0, 0);
        for i in 0..50_000 {
            let mut server = ScramServer::new(&verifier);
            let mut client_first = first.clone();
            if i % 5 == 0 {
                client_first = (0..rng.random_range(0..40)).map(|_| rng.random()).collect();
            } else if i % 5 != 1 {
                mutate(&mut rng, &mut client_first);
            }
            let Ok(reply) = server.client_first_with_nonce(&client_first, SERVER_NONCE) else {
                assert!(matches!(server.client_final(&good_final), Err(ScramError::OutOfOrder(_))));
                continue;
            };
            firsts_ok += 1;
            assert!(reply.len() < 2 * MAX_MESSAGE_BYTES);
            let mut client_final = good_final.clone();
            if i % 3 != 0 {
                mutate(&mut rng, &mut client_final);
            }
            if server.client_final(&client_final).is_ok() {
                finals_ok += 1;
                // Nothing but the exact, correctly signed exchange authenticates.
                assert_eq!((&client_first, &client_final), (&first, &good_final));
            }
            assert!(server.client_final(&good_final).is_err(), "one exchange per server");
        }
        assert!(firsts_ok > 10_000 && finals_ok > 1_000, "{firsts_ok} {finals_ok}");
    }
}
