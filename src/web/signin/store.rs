//! The one-time `state` records of this replica: pending (sign-in started here) and used (answer
//! consumed), each kept until its expiry and bounded in number.
//!
//! Several replicas: this store is per process and is NOT shared. The flow does not depend on it
//! for anything but refusing a second use: the `state` is signed with the key all replicas share,
//! bound to the browser by a cookie, and the PKCE verifier is derived from the key and the state ID
//! (never stored). So a callback that reaches another replica than the one that started the sign-in
//! (no session affinity needed) or a replica that restarted in between still completes. A replay
//! that reaches a replica which has not seen the state passes this store, but fails at the
//! provider: authorization codes are single-use (RFC 6749 §4.1.2) and bound to the PKCE challenge.

use crate::sync::LockExt as _;
use jiff::Timestamp;
use std::collections::HashMap;
use std::sync::Mutex;

/// Default bound on the records kept (pending plus used).
pub const DEFAULT_CAPACITY: usize = 10_000;

/// Which sign-in a state belongs to (as this replica recorded it when it issued the state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateRecord {
    pub ns: String,
    pub name: String,
    pub uid: String,
    pub expires: Timestamp,
    pub used: bool,
}

/// What consuming a state found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Consumed {
    /// Issued here and not used before: now marked used.
    Pending,
    /// Not issued by this replica (another replica, or before a restart): now marked used.
    Unknown,
    /// Used before.
    Used,
}

/// The store is full of live records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many sign-ins in progress")]
pub struct Full;

#[derive(Debug)]
pub struct StateStore {
    capacity: usize,
    records: Mutex<HashMap<String, StateRecord>>,
}

impl Default for StateStore {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl StateStore {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity,
            records: Mutex::default(),
        }
    }

    fn purge(map: &mut HashMap<String, StateRecord>, now: Timestamp) {
        map.retain(|_, r| r.expires > now);
    }

    /// Record a state issued now. Live records are never evicted (that would allow a replay):
    /// when the store is full of them, new sign-ins are refused until some expire.
    pub fn insert(&self, id: &str, record: StateRecord, now: Timestamp) -> Result<(), Full> {
        let mut map = self.records.locked();
        if map.len() >= self.capacity {
            Self::purge(&mut map, now);
            if map.len() >= self.capacity {
                return Err(Full);
            }
        }
        map.insert(id.to_owned(), record);
        Ok(())
    }

    /// Mark `id` used, remembering it until `expires`; say whether it was pending, unknown or used.
    pub fn consume(&self, id: &str, claims: StateRecord, now: Timestamp) -> Consumed {
        let mut map = self.records.locked();
        match map.get_mut(id) {
            Some(r) if r.used => Consumed::Used,
            Some(r) => {
                r.used = true;
                Consumed::Pending
            }
            None => {
                if map.len() >= self.capacity {
                    Self::purge(&mut map, now);
                }
                // When full of live records, a replay on this replica is left to the provider's
                // single-use codes rather than growing without bound.
                if map.len() < self.capacity {
                    map.insert(
                        id.to_owned(),
                        StateRecord {
                            used: true,
                            ..claims
                        },
                    );
                }
                Consumed::Unknown
            }
        }
    }

    /// The record of `id`, if this replica issued or consumed it.
    pub fn get(&self, id: &str) -> Option<StateRecord> {
        self.records.locked().get(id).cloned()
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.records.locked().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
