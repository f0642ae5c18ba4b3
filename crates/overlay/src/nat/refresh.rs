//! One TURN Refresh transaction of our own, outside turn-client-proto,
//! from the agent's 5-tuple: the client only refreshes allocations it made
//! itself, and two jobs need one it did not make.
//!
//! * **Release** (lifetime 0): an agent killed without deleting its
//!   allocation leaves it on the server under our address and port, and the
//!   server answers every new Allocate from that 5-tuple with 437 until it
//!   expires (coturn: the lifetime we asked for, 30 min). We hold the
//!   credentials it was made with, so we delete it.
//! * **Check** (our usual lifetime): a relayed path through our allocation
//!   died; the server says whether it still knows the allocation (success)
//!   or not (437: it restarted).
//!
//! coturn answers the first, unsigned Refresh with 401 and its realm and
//! nonce (its 437 to an Allocate carries neither), and the signed retry
//! with the outcome; a 438 (stale nonce) is signed again with the new one.
//! Datagrams are resent on a short timer; answers count only when their
//! transaction ID is ours.

use std::time::{Duration, Instant};

use stun_proto::auth::{LongTermClientAuth, LongTermClientValidation};
use stun_proto::types::attribute::ErrorCode;
use stun_proto::types::message::{
    LongTermCredentials, Message, MessageClass, MessageType, MessageWriteVec, TransactionId,
};
use stun_proto::types::prelude::*;
use turn_client_proto::types::attribute::Lifetime;
use turn_client_proto::types::message::REFRESH;

/// A request goes out at 0, 0.5 and 1.5 s; without an answer by 3 s it
/// has failed (well inside the set-up timeout).
const FIRST_RESEND: Duration = Duration::from_millis(500);
const SENDS: u32 = 3;
/// Signed requests a run sends at most (a 401 challenge, then stale
/// nonces): a server that keeps changing its nonce is not answering.
const SIGNED_MAX: u32 = 3;

/// How a refresh ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The server refreshed (or, lifetime 0, deleted) the allocation of our
    /// 5-tuple.
    Done,
    /// 437: the server has no allocation for our 5-tuple.
    NoAllocation,
    /// Refused otherwise, or no answer: why.
    Failed(String),
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Send [`Refresh::request`] (again).
    Send,
    /// Nothing until [`Refresh::deadline`] or an answer.
    Wait,
    Finished(Outcome),
}

pub(super) struct Refresh {
    lifetime: u32,
    auth: LongTermClientAuth,
    tid: TransactionId,
    request: Vec<u8>,
    resend_at: Instant,
    sends: u32,
    signed: u32,
}

impl Refresh {
    /// A Refresh of `lifetime` seconds, unsigned (the server's 401 gives the
    /// realm and nonce); `tid` is the caller's random draw. Send
    /// [`Refresh::request`] at once.
    pub(super) fn new(
        now: Instant,
        username: &str,
        password: &str,
        lifetime: u32,
        tid: u128,
    ) -> Refresh {
        let mut auth = LongTermClientAuth::new();
        auth.set_credentials(LongTermCredentials::new(username.into(), password.into()));
        let mut r = Refresh {
            lifetime,
            auth,
            tid: TransactionId::from(tid),
            request: Vec::new(),
            resend_at: now,
            sends: 0,
            signed: 0,
        };
        r.build(now, tid);
        r
    }

    /// The request to send.
    pub(super) fn request(&self) -> &[u8] {
        &self.request
    }

    /// When [`Refresh::timeout`] must run.
    pub(super) fn deadline(&self) -> Instant {
        self.resend_at
    }

    /// Builds the request with transaction `tid`, signed once the server
    /// challenged us, and restarts the resend timer.
    fn build(&mut self, now: Instant, tid: u128) {
        self.tid = TransactionId::from(tid);
        let mtype = MessageType::from_class_method(MessageClass::Request, REFRESH);
        let mut m = Message::builder(mtype, self.tid, MessageWriteVec::with_capacity(160));
        let signed = m
            .add_attribute(&Lifetime::new(self.lifetime))
            .ok()
            .and_then(|()| self.auth.sign_outgoing_message(m).ok());
        self.request = signed.map(|m| m.finish()).unwrap_or_default();
        self.sends = 1;
        self.resend_at = now + FIRST_RESEND;
    }

    /// The resend timer fired.
    pub(super) fn timeout(&mut self, now: Instant) -> Step {
        if now < self.resend_at {
            return Step::Wait;
        }
        if self.sends >= SENDS {
            return Step::Finished(Outcome::Failed("no answer to our Refresh".into()));
        }
        self.sends += 1;
        self.resend_at = now + FIRST_RESEND * self.sends;
        Step::Send
    }

    /// Whether `msg` answers our request.
    pub(super) fn answers(&self, msg: &Message<'_>) -> bool {
        msg.is_response() && msg.has_method(REFRESH) && msg.transaction_id() == self.tid
    }

    /// An answer (see [`Refresh::answers`]); `tid` is a fresh random draw
    /// in case the request must be signed again.
    pub(super) fn handle(&mut self, now: Instant, msg: &Message<'_>, tid: u128) -> Step {
        let code = msg.attribute::<ErrorCode>().ok().map(|e| e.code());
        let validation = self.auth.validate_incoming_message(msg);
        if msg.has_class(MessageClass::Success) {
            // Only the server that holds our password can sign it.
            return match validation {
                Ok(LongTermClientValidation::Validated(_)) => Step::Finished(Outcome::Done),
                _ => Step::Wait,
            };
        }
        match (code, validation) {
            (Some(437), _) => Step::Finished(Outcome::NoAllocation),
            (Some(401 | 438), Ok(LongTermClientValidation::ResendRequest(_)))
                if self.signed < SIGNED_MAX =>
            {
                self.signed += 1;
                self.build(now, tid);
                Step::Send
            }
            _ => {
                let why = msg
                    .attribute::<ErrorCode>()
                    .map(|e| format!("{} {}", e.code(), e.reason()))
                    .unwrap_or_else(|_| "an error without a code".into());
                Step::Finished(Outcome::Failed(why))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(req: &[u8], code: u16, realm_nonce: Option<(&str, &str)>) -> Vec<u8> {
        use stun_proto::types::attribute::{Nonce, Realm};
        let req = Message::from_bytes(req).unwrap();
        let mut m = Message::builder_error(&req, MessageWriteVec::new());
        m.add_attribute(&ErrorCode::builder(code).build().unwrap())
            .unwrap();
        if let Some((realm, nonce)) = realm_nonce {
            m.add_attribute(&Realm::new(realm).unwrap()).unwrap();
            m.add_attribute(&Nonce::new(nonce).unwrap()).unwrap();
        }
        m.finish()
    }

    #[test]
    fn challenge_then_signed_then_stale_nonce_then_mismatch() {
        let t0 = Instant::now();
        let mut r = Refresh::new(t0, "evio", "pw", 0, 1);
        let first = r.request().to_vec();
        let m = Message::from_bytes(&first).unwrap();
        assert!(m.attribute::<Lifetime>().is_ok_and(|l| l.seconds() == 0));
        assert!(m
            .attribute::<stun_proto::types::attribute::MessageIntegrity>()
            .is_err());
        // coturn's challenge.
        let a = error(&first, 401, Some(("evio.test", "n1")));
        let a = Message::from_bytes(&a).unwrap();
        assert!(r.answers(&a));
        assert_eq!(r.handle(t0, &a, 2), Step::Send);
        let signed = Message::from_bytes(r.request()).unwrap();
        assert!(signed
            .attribute::<stun_proto::types::attribute::MessageIntegrity>()
            .is_ok());
        assert!(!r.answers(&a), "an answer to the old transaction");
        let stale = error(r.request(), 438, Some(("evio.test", "n2")));
        let stale = Message::from_bytes(&stale).unwrap();
        assert_eq!(r.handle(t0, &stale, 3), Step::Send);
        let gone = error(r.request(), 437, None);
        let gone = Message::from_bytes(&gone).unwrap();
        assert_eq!(
            r.handle(t0, &gone, 4),
            Step::Finished(Outcome::NoAllocation)
        );
    }

    #[test]
    fn an_unsigned_success_is_not_believed_and_silence_fails() {
        let t0 = Instant::now();
        let mut r = Refresh::new(t0, "evio", "pw", 1800, 1);
        let req = Message::from_bytes(r.request()).unwrap();
        let ok = Message::builder_success(&req, MessageWriteVec::new()).finish();
        let ok = Message::from_bytes(&ok).unwrap();
        assert_eq!(r.handle(t0, &ok, 2), Step::Wait);
        let mut sends = 1;
        let now = loop {
            let now = r.deadline();
            match r.timeout(now) {
                Step::Send => sends += 1,
                Step::Finished(Outcome::Failed(_)) => break now,
                s => panic!("{s:?}"),
            }
        };
        assert_eq!(sends, SENDS);
        assert_eq!(now - t0, Duration::from_secs(3));
    }
}
