//! Which backend holds a stored OpenAI response.
//!
//! Response ids are scoped to a provider account: `previous_response_id`,
//! `GET /v1/responses/{id}` and `DELETE` must reach the backend that
//! produced the response. A proxy remembers the owner of every response it
//! served ([`remember`]); a request for an id it has not seen (another proxy
//! served it, or this one restarted) tries the candidates in affinity order
//! and moves on when a backend answers that it does not know the id
//! (see [`crate::retry`]). No shared state: every proxy finds the owner.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, LazyLock};

use parking_lot::Mutex;

/// Owners remembered at most; the oldest are forgotten first.
pub(crate) const CAPACITY: usize = 100_000;

#[derive(Default)]
struct Owners {
    by_id: HashMap<Box<str>, Arc<str>>,
    order: VecDeque<Box<str>>,
}

static OWNERS: LazyLock<Mutex<Owners>> = LazyLock::new(Mutex::default);

/// Remembers that `backend_id` produced the response `id`.
pub(crate) fn remember(id: &str, backend_id: &Arc<str>) {
    if id.is_empty() || id.len() > 256 {
        return;
    }
    let mut o = OWNERS.lock();
    if o.by_id.insert(id.into(), backend_id.clone()).is_none() {
        o.order.push_back(id.into());
        while o.order.len() > CAPACITY {
            if let Some(old) = o.order.pop_front() {
                o.by_id.remove(&old);
            }
        }
    }
}

/// The backend that produced `id`, if this proxy served it.
pub(crate) fn owner(id: &str) -> Option<Arc<str>> {
    OWNERS.lock().by_id.get(id).cloned()
}

/// Forgets `id` (after a `DELETE`).
pub(crate) fn forget(id: &str) {
    OWNERS.lock().by_id.remove(id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_remembered_and_forgotten() {
        let be: Arc<str> = Arc::from("be_1");
        remember("resp_test_1", &be);
        assert_eq!(owner("resp_test_1").as_deref(), Some("be_1"));
        forget("resp_test_1");
        assert_eq!(owner("resp_test_1"), None);
        remember("", &be);
        assert_eq!(owner(""), None);
    }
}
