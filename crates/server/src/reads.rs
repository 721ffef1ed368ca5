//! Hot list responses kept in memory until storage announces a change (the dashboard and scripts
//! poll the same few pages many times a second; storage is asked once per change instead).
//!
//! Every write to a cached table is announced on the bus after it commits (`hcp.devices`,
//! `hcp.maintenance`, `hcp.decision.<site>`); each announcement bumps the table's generation and
//! a response is served from memory only while its generation is current. A response computed
//! while a write commits is stored under the generation read before the query, so it is never
//! served after the bump. The invalidation task subscribes before the API serves; while its
//! subscription is down nothing is served from memory. The API's own writes bump the generation
//! before they answer (read-your-writes), and so does the event stream before it hands a change to
//! a client (a client that fetches on an event sees the change).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use axum::body::Bytes;

/// The tables whose pages are cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    Devices = 0,
    Decisions = 1,
}

/// Entries kept at most per table; a table's map is emptied when full (the hot set is a handful of
/// pages).
const MAX_ENTRIES: usize = 512;

pub struct ReadCache {
    gens: [AtomicU64; 2],
    live: AtomicBool,
    /// Per table: page key -> (generation, body).
    maps: [Mutex<HashMap<String, (u64, Bytes)>>; 2],
}

impl Default for ReadCache {
    fn default() -> Self {
        ReadCache {
            gens: [AtomicU64::new(0), AtomicU64::new(0)],
            live: AtomicBool::new(false),
            maps: [Mutex::default(), Mutex::default()],
        }
    }
}

impl ReadCache {
    /// The table a bus subject announces a change of, if any.
    pub fn table_of(subject: &str) -> Option<Table> {
        match subject {
            "hcp.devices" | "hcp.maintenance" => Some(Table::Devices),
            s if s.starts_with("hcp.decision.") => Some(Table::Decisions),
            _ => None,
        }
    }

    /// A change announced (or made here): pages of its table computed before are not served again.
    pub fn note(&self, subject: &str) {
        if let Some(t) = Self::table_of(subject) {
            self.bump(t);
        }
    }

    pub fn bump(&self, t: Table) {
        self.gens[t as usize].fetch_add(1, Ordering::SeqCst);
    }

    /// Whether changes are being heard (the invalidation task's subscription is up).
    pub fn set_live(&self, live: bool) {
        if live {
            // Anything may have changed while nobody listened.
            self.bump(Table::Devices);
            self.bump(Table::Decisions);
        }
        self.live.store(live, Ordering::SeqCst);
    }

    /// The generation to store a page under: read it before querying storage.
    pub fn generation(&self, t: Table) -> u64 {
        self.gens[t as usize].load(Ordering::SeqCst)
    }

    pub fn get(&self, t: Table, key: &str) -> Option<Bytes> {
        if !self.live.load(Ordering::SeqCst) {
            return None;
        }
        let current = self.generation(t);
        let map = self.maps[t as usize].lock().unwrap_or_else(|e| e.into_inner());
        match map.get(key) {
            Some((g, b)) if *g == current => Some(b.clone()),
            _ => None,
        }
    }

    pub fn put(&self, t: Table, key: String, generation: u64, body: Bytes) {
        if !self.live.load(Ordering::SeqCst) || generation != self.generation(t) {
            return;
        }
        let mut map = self.maps[t as usize].lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_ENTRIES {
            map.clear();
        }
        map.insert(key, (generation, body));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_served_until_its_table_changes() {
        let c = ReadCache::default();
        let b = Bytes::from_static(b"[1]");
        let g = c.generation(Table::Devices);
        c.put(Table::Devices, "k".into(), g, b.clone());
        assert_eq!(c.get(Table::Devices, "k"), None, "nothing kept while changes are not heard");
        c.set_live(true);
        let g = c.generation(Table::Devices);
        c.put(Table::Devices, "k".into(), g, b.clone());
        assert_eq!(c.get(Table::Devices, "k"), Some(b.clone()));
        c.note("hcp.decision.site-a");
        assert_eq!(c.get(Table::Devices, "k"), Some(b.clone()), "another table's change");
        c.note("hcp.maintenance");
        assert_eq!(c.get(Table::Devices, "k"), None, "stale after the change");
        // A page computed across a change is not stored under the new generation.
        let before = c.generation(Table::Devices);
        c.note("hcp.devices");
        c.put(Table::Devices, "k".into(), before, b.clone());
        assert_eq!(c.get(Table::Devices, "k"), None);
        c.set_live(false);
        assert_eq!(c.get(Table::Devices, "k"), None);
    }
}
