//! The default rules, with two members of its own in every user's answer:
//!
//! - `display_name`: the username, else the e-mail address's local part, else the id;
//! - `is_admin`: whether `user_type` is `"Admin"`.

use logq_reducer_sdk::{Answer, Tweak};

/// Adds `display_name` and `is_admin`.
#[derive(Default)]
pub struct DisplayName;

impl Tweak for DisplayName {
    fn user(&self, answer: &mut Answer) {
        let name = display_name(
            answer.get_str("username"),
            answer.get_str("user_email"),
            answer.get_str("id").unwrap_or_default(),
        );
        let admin = answer.get_str("user_type") == Some("Admin");
        answer.set("display_name", name);
        answer.set("is_admin", admin);
    }
}

/// The username, else the e-mail address's local part, else the id.
pub fn display_name(username: Option<&str>, email: Option<&str>, id: &str) -> String {
    username
        .filter(|u| !u.is_empty())
        .or_else(|| {
            email
                .and_then(|e| e.split_once('@'))
                .map(|(local, _)| local)
        })
        .unwrap_or(id)
        .to_owned()
}

logq_reducer_sdk::export_tweak!(DisplayName);

#[cfg(test)]
mod tests {
    use super::*;
    use logq_reducer_sdk::native::{Model, Native};
    use logq_reducer_sdk::{Defaults, Kind, Record, Source, Value, serde_json};

    fn answer(events: &[&[u8]], id: &str) -> Value {
        let mut model = Model::new();
        let records = Record::sequence(events.iter().map(|e| (Source::Users, *e)));
        model
            .apply(&Native::<Defaults<DisplayName>>::default(), &records)
            .unwrap();
        serde_json::from_str(model.get(Kind::User, id).unwrap().view().unwrap()).unwrap()
    }

    #[test]
    fn display_name_falls_back_from_username_to_email_to_id() {
        let a = answer(
            &[br#"{"id":"1","event_type":"User Created","username":"Snake","user_type":"Admin","received_at":"2021-01-01 00:00:00"}"#],
            "1",
        );
        assert_eq!(
            (a["display_name"].as_str(), a["is_admin"].as_bool()),
            (Some("Snake"), Some(true))
        );
        let b = answer(
            &[br#"{"id":"2","event_type":"User Created","user_email":"otacon@philanthropy.org","received_at":"2021-01-01 00:00:00"}"#],
            "2",
        );
        assert_eq!(
            (b["display_name"].as_str(), b["is_admin"].as_bool()),
            (Some("otacon"), Some(false))
        );
        assert_eq!(display_name(None, None, "3"), "3");
        assert_eq!(display_name(Some(""), Some("x@y"), "3"), "x");
    }
}
