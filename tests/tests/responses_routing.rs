//! Response ids are scoped to a provider account (issue 12): a response
//! created through proxy A is continued (`previous_response_id`), fetched
//! (`GET`) and deleted through proxy B, and each of those reaches the
//! backend that stored it, of three `api: openai` backends. The mocks
//! answer an id they do not hold with the real API's 400/404, so a wrong
//! route fails here.

use crate::data_plane_support::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_continued_fetched_and_deleted_on_its_own_backend_from_any_proxy() {
    let f = Fleet::start(
        (0..3)
            .map(|i| BackendSpec::new(&format!("oa-{i}"), "openai", "gpt", ""))
            .collect(),
        2,
    );
    let mut owners = std::collections::BTreeSet::new();
    for n in 0..6 {
        let before = f.ok_counts();
        let res = f
            .post_openai(
                0,
                "responses",
                &json!({"model": "gpt", "input": format!("conversation {n}")}),
                &[],
            )
            .await;
        assert_eq!(res.status(), 200, "{}", f.logs());
        let created: Value = res.json().await.expect("JSON");
        let id = created["id"].as_str().expect("an id").to_owned();
        let owner = f.served_by(&before);
        owners.insert(owner);

        let before = f.ok_counts();
        let res = f
            .post_openai(
                1,
                "responses",
                &json!({"model": "gpt", "input": "go on", "previous_response_id": id}),
                &[],
            )
            .await;
        let status = res.status();
        let text = res.text().await.expect("body");
        assert_eq!(
            status,
            200,
            "continuation {n} of {id}: {text}\n{}",
            f.logs()
        );
        assert_eq!(
            f.served_by(&before),
            owner,
            "continuation {n} left its backend"
        );
        let next: Value = serde_json::from_str(&text).expect("JSON");
        let next_id = next["id"].as_str().expect("an id").to_owned();

        for (proxy, rid) in [(1, &id), (0, &next_id)] {
            let before = f.ok_counts();
            let res = f
                .http
                .get(format!("{}/v1/responses/{rid}", f.proxies[proxy].url()))
                .bearer_auth(&f.key)
                .send()
                .await
                .expect("sent");
            let status = res.status();
            let got: Value = res.json().await.expect("JSON");
            assert_eq!(
                status,
                200,
                "GET {rid} via proxy {proxy}: {got}\n{}",
                f.logs()
            );
            assert_eq!(got["id"], rid.as_str());
            assert_eq!(f.served_by(&before), owner, "GET {rid} via proxy {proxy}");
        }
        let before = f.ok_counts();
        let res = f
            .http
            .delete(format!("{}/v1/responses/{id}", f.proxies[1].url()))
            .bearer_auth(&f.key)
            .send()
            .await
            .expect("sent");
        let status = res.status();
        let got: Value = res.json().await.expect("JSON");
        assert_eq!(status, 200, "DELETE {id}: {got}");
        assert_eq!(
            got,
            json!({"id": id, "object": "response", "deleted": true})
        );
        assert_eq!(f.served_by(&before), owner, "DELETE {id}");
    }
    println!("responses were stored on backends {owners:?}");
}
