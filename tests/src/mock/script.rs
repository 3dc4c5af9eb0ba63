//! The script: a FIFO of one-shot actions, persistent header rules and an
//! optional "always" action, consulted once per request.

use super::action::{Action, Rule};
use http::HeaderMap;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

/// Scripted behaviour shared by all connections.
///
/// The hot path only reads `armed`: a benchmark that scripts nothing never
/// takes the lock.
#[derive(Debug, Default)]
pub(crate) struct Script {
    armed: AtomicBool,
    state: Mutex<ScriptState>,
}

#[derive(Debug, Default)]
struct ScriptState {
    queue: VecDeque<Action>,
    rules: Vec<Rule>,
    always: Option<Action>,
}

impl ScriptState {
    fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.rules.is_empty() && self.always.is_none()
    }
}

impl Script {
    /// Picks the action for one request, consuming it when it is one-shot.
    /// Precedence: the first queued action for this model, then the first
    /// matching header rule, then the "always" action.
    pub(crate) fn next(&self, model: Option<&str>, headers: &HeaderMap) -> Option<Action> {
        if !self.armed.load(Ordering::Acquire) {
            return None;
        }
        let mut state = self.state.lock();
        if let Some(i) = state.queue.iter().position(|a| a.applies_to(model)) {
            let action = state.queue.remove(i);
            self.rearm(&state);
            return action;
        }
        let by_rule = state.rules.iter().find(|rule| {
            let (name, value) = &rule.match_header;
            rule.action.applies_to(model)
                && headers
                    .get_all(name.as_str())
                    .iter()
                    .any(|v| v.as_bytes() == value.as_bytes())
        });
        if let Some(rule) = by_rule {
            return Some(rule.action.clone());
        }
        state
            .always
            .as_ref()
            .filter(|a| a.applies_to(model))
            .cloned()
    }

    pub(crate) fn push(&self, actions: impl IntoIterator<Item = Action>) {
        let mut state = self.state.lock();
        state.queue.extend(actions);
        self.rearm(&state);
    }

    pub(crate) fn set_always(&self, action: Option<Action>) {
        let mut state = self.state.lock();
        state.always = action;
        self.rearm(&state);
    }

    pub(crate) fn add_rule(&self, rule: Rule) {
        let mut state = self.state.lock();
        state.rules.push(rule);
        self.rearm(&state);
    }

    pub(crate) fn set_rules(&self, rules: Vec<Rule>) {
        let mut state = self.state.lock();
        state.rules = rules;
        self.rearm(&state);
    }

    /// Queued one-shot actions not consumed yet.
    pub(crate) fn pending(&self) -> usize {
        self.state.lock().queue.len()
    }

    pub(crate) fn clear(&self) {
        let mut state = self.state.lock();
        *state = ScriptState::default();
        self.rearm(&state);
    }

    fn rearm(&self, state: &ScriptState) {
        self.armed.store(!state.is_empty(), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, http::HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn queued_actions_are_consumed_in_order_and_by_model() {
        let script = Script::default();
        script.push([
            Action::status(429).for_model("b"),
            Action::status(500),
            Action::reply("x"),
        ]);
        let h = HeaderMap::new();
        assert_eq!(script.next(Some("a"), &h), Some(Action::status(500)));
        assert_eq!(
            script.next(Some("b"), &h),
            Some(Action::status(429).for_model("b"))
        );
        assert_eq!(script.next(Some("b"), &h), Some(Action::reply("x")));
        assert_eq!(script.next(Some("b"), &h), None);
        assert!(!script.armed.load(Ordering::Acquire));
    }

    #[test]
    fn rules_beat_always_and_queue_beats_rules() {
        let script = Script::default();
        script.set_always(Some(Action::reply("always")));
        script.add_rule(Rule::header("X-Agent", "b", Action::reply("rule")));
        let b = headers(&[("x-agent", "b")]);
        let a = headers(&[("x-agent", "a")]);
        assert_eq!(script.next(None, &a), Some(Action::reply("always")));
        assert_eq!(script.next(None, &b), Some(Action::reply("rule")));
        script.push([Action::status(500)]);
        assert_eq!(script.next(None, &b), Some(Action::status(500)));
        assert_eq!(script.next(None, &b), Some(Action::reply("rule")));
        script.clear();
        assert_eq!(script.next(None, &b), None);
    }

    #[test]
    fn rule_json_is_flat() {
        let rule: Rule = serde_json::from_str(
            r#"{"match_header":["X-Claw-Agent-Id","agent-b"],"reply":"ALERT: disk full"}"#,
        )
        .expect("valid rule");
        assert_eq!(
            rule,
            Rule::header(
                "x-claw-agent-id",
                "agent-b",
                Action::reply("ALERT: disk full")
            )
        );
        let back = serde_json::to_value(&rule).expect("serializable");
        assert_eq!(back["match_header"][1], "agent-b");
        assert_eq!(back["reply"], "ALERT: disk full");
        assert!(serde_json::from_str::<Rule>(r#"{"match_header":["a","b"],"stauts":1}"#).is_err());
    }
}
