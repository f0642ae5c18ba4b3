//! Why things happened, as the core knows them: a handshake that failed, a
//! path that was chosen or left. The engine attaches these to its events
//! ([`crate::engine::Event`]); the agent turns them into log lines and into
//! the verdict of `peers --explain`. Kept apart from the engine so that the
//! words an operator reads live in one place.

use std::fmt;
use std::time::Duration;

use crate::crypto::Key;

/// Why a handshake did not complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Our initiation got no response for `waited` (`attempts` sent): the
    /// peer is unreachable on every path tried, down, or holds another
    /// network key (it drops what it cannot authenticate, silently).
    Timeout { waited: Duration, attempts: u32 },
    /// A handshake message whose mac1 does not match: the sender holds
    /// another network key, or addressed an old public key of this node.
    WrongNetworkKey,
    /// A valid initiation from a key that no record we believe names.
    UnknownKey(Key),
    /// Under load: the sender must first prove its address with a cookie
    /// (we sent one, or the peer sent us one).
    CookieNeeded,
    /// The Noise handshake itself failed (mac1 was right): a corrupted or
    /// forged message, or a different network name.
    Crypto,
}

impl HandshakeFailure {
    /// A stable label (log field, JSON).
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeFailure::Timeout { .. } => "timeout",
            HandshakeFailure::WrongNetworkKey => "wrong network key",
            HandshakeFailure::UnknownKey(_) => "unknown key",
            HandshakeFailure::CookieNeeded => "cookie needed",
            HandshakeFailure::Crypto => "handshake did not decrypt",
        }
    }
}

impl fmt::Display for HandshakeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeFailure::Timeout { waited, attempts } => write!(
                f,
                "timeout: no response to {attempts} initiations in {:.1} s \
                 (unreachable, down, or another network key)",
                waited.as_secs_f64()
            ),
            HandshakeFailure::WrongNetworkKey => f.write_str(
                "wrong network key: mac1 does not match (the sender holds another \
                 network key, or an old public key of this node)",
            ),
            HandshakeFailure::UnknownKey(k) => write!(
                f,
                "unknown key {}: no believed record names it",
                crate::crypto::b64(k)
            ),
            HandshakeFailure::CookieNeeded => {
                f.write_str("cookie needed: under load, the sender must prove its address first")
            }
            HandshakeFailure::Crypto => f.write_str("handshake did not decrypt"),
        }
    }
}

/// Why the path carrying a peer's traffic changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathWhy {
    /// The first path that answered (nothing was in use).
    #[default]
    First,
    /// The path in use went quiet while the peer reached us on another
    /// (its NAT mapping or address changed).
    Roamed,
    /// A path of a better class answered (local over direct over relay).
    BetterClass,
    /// A path of the same class answered with a clearly lower RTT.
    BetterRtt,
    /// The path in use lost its probes: the best other live one took over
    /// (if any).
    ProbesLost,
    /// The session was started over after no path answered: every path is
    /// tried again.
    Reset,
}

impl PathWhy {
    pub fn as_str(self) -> &'static str {
        match self {
            PathWhy::First => "first path to answer",
            PathWhy::Roamed => "peer roamed: the old path went quiet, it reached us on this one",
            PathWhy::BetterClass => "better class answered",
            PathWhy::BetterRtt => "better RTT",
            PathWhy::ProbesLost => "probes lost",
            PathWhy::Reset => "session restarted: no path answered",
        }
    }
}

impl fmt::Display for PathWhy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
