//! The control API under `/_mock/`: scripting and reading the record over
//! HTTP, for mocks running as a separate process.
//!
//! | route | body | effect |
//! |---|---|---|
//! | `POST /_mock/script` | action or `[action…]` | queue one-shot actions |
//! | `POST /_mock/always` | action or `null` | set / clear the persistent action |
//! | `POST /_mock/rules` | rule (appends) or `[rule…]` (replaces) | header rules |
//! | `POST /_mock/models` | `{"status":503}`, `"hang"`, `"close"` or `null` | how `GET /v1/models` fails ([`ModelsFault`](super::action::ModelsFault)) |
//! | `GET /_mock/requests[?since=SEQ]` | | the record (after `SEQ`) |
//! | `GET /_mock/totals` | | [`Totals`](super::Totals) |
//! | `POST /_mock/reset` | | clear script, rules, record, totals, prompt cache, stored responses |

use super::action::{Action, ModelsFault, Rule};
use super::body::MockBody;
use super::server::Shared;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<MockBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, &json!({"error": e.to_string()})),
    };
    let result = route(
        shared,
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &body,
    );
    match result {
        Ok(value) => reply(StatusCode::OK, &value),
        Err((status, message)) => reply(status, &json!({"error": message})),
    }
}

type Routed = Result<Value, (StatusCode, String)>;

fn route(shared: &Shared, method: &Method, path: &str, query: Option<&str>, body: &[u8]) -> Routed {
    match (method, path) {
        (&Method::POST, "/_mock/script") => {
            let actions: Vec<Action> = one_or_many(body)?.0;
            shared.script.push(actions);
            Ok(json!({"pending": shared.script.pending()}))
        }
        (&Method::POST, "/_mock/always") => {
            let action: Option<Action> = parse(body)?;
            shared.script.set_always(action);
            Ok(json!({"ok": true}))
        }
        (&Method::POST, "/_mock/models") => {
            let fault: Option<ModelsFault> = parse(body)?;
            *shared.models_fault.lock() = fault;
            Ok(json!({"ok": true}))
        }
        (&Method::POST, "/_mock/rules") => {
            let (rules, many): (Vec<Rule>, bool) = one_or_many(body)?;
            if many {
                shared.script.set_rules(rules);
            } else {
                rules.into_iter().for_each(|r| shared.script.add_rule(r));
            }
            Ok(json!({"ok": true}))
        }
        (&Method::GET, "/_mock/requests") => {
            let since = query
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("since=")))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            let records: Vec<_> = shared
                .recorder
                .requests()
                .into_iter()
                .filter(|r| r.seq > since)
                .collect();
            serde_json::to_value(records).map_err(internal)
        }
        (&Method::GET, "/_mock/totals") => {
            let mut totals = shared.recorder.totals();
            totals.script_pending = shared.script.pending() as u64;
            serde_json::to_value(totals).map_err(internal)
        }
        (&Method::POST, "/_mock/reset") => {
            shared.reset();
            Ok(json!({"ok": true}))
        }
        _ => Err((
            StatusCode::NOT_FOUND,
            format!("unknown control route {method} {path}"),
        )),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, (StatusCode, String)> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        b"null".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))
}

/// A JSON object or an array of them; the flag says which it was.
fn one_or_many<T: DeserializeOwned>(body: &[u8]) -> Result<(Vec<T>, bool), (StatusCode, String)> {
    match parse::<Value>(body)? {
        Value::Array(items) => items
            .into_iter()
            .map(serde_json::from_value)
            .collect::<Result<_, _>>()
            .map(|v| (v, true))
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string())),
        one => serde_json::from_value(one)
            .map(|v| (vec![v], false))
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string())),
    }
}

fn internal(e: serde_json::Error) -> (StatusCode, String) {
    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

fn reply(status: StatusCode, value: &Value) -> Response<MockBody> {
    let mut resp = Response::new(MockBody::unrecorded(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
