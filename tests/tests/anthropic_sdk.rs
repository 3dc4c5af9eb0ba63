//! The official `anthropic` Python SDK through two real proxies to an
//! `api: anthropic` backend (`tests/python/anthropic_sdk_check.py`):
//! messages plain and streamed (`get_final_message()` usage), count_tokens,
//! a prompt-cache read through the other proxy, Anthropic error types for an
//! unknown model and a bad key, `models.retrieve`.
//!
//! Needs `pip install -r tests/python/requirements.txt`; fails, rather than
//! skips, when the SDK is missing.

use crate::data_plane_support::*;

#[test]
fn the_official_anthropic_python_sdk_works_through_two_proxies() {
    let f = Fleet::start(vec![BackendSpec::new("ant", "anthropic", "claude", "")], 2);
    run_python_checks(
        "anthropic_sdk_check.py",
        "anthropic",
        &[
            ("CLAW_BASE_URL", f.proxies[0].url()),
            ("CLAW_BASE_URL_B", f.proxies[1].url()),
            ("CLAW_API_KEY", f.key.clone()),
            ("CLAW_MODEL", "claude".to_owned()),
        ],
        &[
            "ok messages",
            "ok stream",
            "ok count_tokens",
            "ok cache",
            "ok unknown model -> 404 not_found_error",
            "ok bad key -> 401 authentication_error",
            "ok models.retrieve claude",
        ],
        || f.logs(),
    );
    // The SDK's requests reached the upstream with the native model id, the
    // backend's key and no client key.
    let seen = f.mocks[0].requests();
    assert!(seen.iter().any(|r| r.path == "/v1/messages" && r.stream));
    assert!(seen.iter().any(|r| r.path == "/v1/messages/count_tokens"));
    for r in &seen {
        assert_eq!(r.model.as_deref(), Some("claude-ant"), "{}", r.path);
        assert_eq!(r.header("x-api-key"), Some(f.specs[0].key().as_str()));
        assert!(
            r.header_list.iter().all(|(_, v)| !v.contains(&f.key)),
            "a client key reached the upstream: {:?}",
            r.header_list
        );
    }
}
