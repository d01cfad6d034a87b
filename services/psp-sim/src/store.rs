//! The simulator's memory: bounded, insertion-ordered maps and the `[store]` bounds.
//!
//! psp-sim keeps authorizations, idempotency keys and sent webhooks in memory, not in a
//! database: it stands in for someone else's system, so losing its state on restart is
//! acceptable (a restarted provider that forgot everything is itself a useful failure to
//! rehearse), and it keeps the simulator free of any dependency on the dev stack.
//!
//! What must not break: every map is bounded ([`BoundedMap`]). A long-running `make dev`
//! stack sees an endless stream of demo orders; when a map is full the *oldest* entry is
//! evicted (counted in `psp_store_evictions_total`), so memory stays flat and the most
//! recent state, the one a test or demo looks at, is kept.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard, PoisonError};

use keel_config::{ConfigError, Validate, ensure_range};
use serde::Deserialize;

/// `[store]`: how much the simulator remembers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Authorizations kept; the oldest is forgotten beyond this (then `GET` answers 404).
    pub max_authorizations: usize,
    /// Idempotency keys remembered with their stored answers (P13).
    pub max_idempotency_keys: usize,
    /// Sent webhooks kept for `GET /admin/webhooks` and redelivery.
    pub max_webhooks: usize,
}

impl Validate for StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        ensure_range(
            "store.max_authorizations",
            self.max_authorizations,
            1,
            10_000_000,
        )?;
        ensure_range(
            "store.max_idempotency_keys",
            self.max_idempotency_keys,
            1,
            10_000_000,
        )?;
        ensure_range("store.max_webhooks", self.max_webhooks, 1, 1_000_000)
    }
}

/// A map that remembers at most `capacity` entries and forgets the oldest first.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    /// Names the map in metrics (`store` label).
    name: &'static str,
    entries: HashMap<K, V>,
    /// Keys in insertion order; each key of `entries` appears exactly once.
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Eq + Hash + Clone, V> BoundedMap<K, V> {
    /// An empty map named `name` (a metrics label) holding at most `capacity` entries.
    pub fn new(name: &'static str, capacity: usize) -> Self {
        Self {
            name,
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Inserts a new key, evicting the oldest entries if the map is full. Replacing the value
    /// of an existing key keeps its place in the order.
    pub fn insert(&mut self, key: K, value: V) {
        if let Some(existing) = self.entries.get_mut(&key) {
            *existing = value;
            return;
        }
        while self.entries.len() >= self.capacity {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&oldest);
            metrics::counter!("psp_store_evictions_total", "store" => self.name).increment(1);
        }
        self.order.push_back(key.clone());
        self.entries.insert(key, value);
        metrics::gauge!("psp_store_entries", "store" => self.name).set(self.entries.len() as f64);
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.entries.get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Eq + Hash + ?Sized,
    {
        self.entries.get_mut(key)
    }

    /// Values from oldest to newest.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.order.iter().filter_map(|k| self.entries.get(k))
    }
}

/// Locks `mutex`, recovering from poisoning. Every critical section in this crate is a few
/// map operations with no `.await` and no user code, so a panic inside one cannot leave the
/// data half-updated in a way that matters more than refusing to serve would.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_entry_is_evicted_when_full() {
        let mut m = BoundedMap::new("test", 2);
        m.insert("a", 1);
        m.insert("b", 2);
        m.insert("a", 10); // replace keeps a's place as oldest
        m.insert("c", 3);
        assert_eq!(m.get(&"a"), None);
        assert_eq!(m.values().copied().collect::<Vec<_>>(), vec![2, 3]);
    }
}
