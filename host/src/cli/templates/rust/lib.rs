//! {{name}}: a logq reducer. It folds events by the default rules (the logq README's
//! "Event rules") and lets you change every answer they render.
//!
//! Build and check it: `logq reducer build` (writes `reducer.wasm`). Swap it in:
//! `curl -X PUT -H "Authorization: Bearer $TOKEN" --data-binary @reducer.wasm \
//!   "http://127.0.0.1:8080/admin/reducer?mode=replay"`.
//!
//! Rules of your own instead of the defaults: implement `logq_reducer_sdk::Reducer`
//! (your state type, which entity an event changes, how, and the answer) and export
//! it with `logq_reducer_sdk::export_reducer!`.

use logq_reducer_sdk::{Answer, Tweak};

/// Your change to the default rules' answers.
#[derive(Default)]
pub struct MyReducer;

impl Tweak for MyReducer {
    /// Change a user's answer here: `answer.set(name, value)` adds or replaces a
    /// member, `answer.remove(name)` drops one, `answer.get_str(name)` reads one.
    fn user(&self, answer: &mut Answer) {
        let _ = answer;
    }

    /// Change an organization's answer here.
    fn organization(&self, answer: &mut Answer) {
        let _ = answer;
    }
}

logq_reducer_sdk::export_tweak!(MyReducer);
