//! The default rules, with e-mail addresses masked in every user's answer: the first
//! letter and the domain stay (`snake@outerheaven.com` answers `s***@outerheaven.com`).

use logq_reducer_sdk::{Answer, Tweak};

/// Masks `user_email`.
#[derive(Default)]
pub struct MaskEmails;

impl Tweak for MaskEmails {
    fn user(&self, answer: &mut Answer) {
        if let Some(email) = answer.get_str("user_email") {
            let masked = mask(email);
            answer.set("user_email", masked);
        }
    }
}

/// `snake@outerheaven.com` -> `s***@outerheaven.com` (the local part's first letter
/// and the domain); without an `@`, `***`.
pub fn mask(email: &str) -> String {
    match email.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".to_owned(),
    }
}

logq_reducer_sdk::export_tweak!(MaskEmails);

#[cfg(test)]
mod tests {
    use super::*;
    use logq_reducer_sdk::native::{Model, Native};
    use logq_reducer_sdk::{Defaults, Kind, Record, Source};

    #[test]
    fn answers_carry_masked_emails_and_everything_else_as_the_default_rules_say() {
        let created = br#"{"id":"1","event_type":"User Created","username":"Snake","user_email":"snake@outerheaven.com","received_at":"2021-01-01 00:00:00"}"#;
        let mut model = Model::new();
        model
            .apply(
                &Native::<Defaults<MaskEmails>>::default(),
                &Record::sequence([(Source::Users, &created[..])]),
            )
            .unwrap();
        let answer: logq_reducer_sdk::Value = logq_reducer_sdk::serde_json::from_str(
            model.get(Kind::User, "1").unwrap().view().unwrap(),
        )
        .unwrap();
        assert_eq!(answer["user_email"], "s***@outerheaven.com");
        assert_eq!(answer["username"], "Snake");
        assert_eq!(mask("ü@x"), "ü***@x");
        assert_eq!(mask("no-at-sign"), "***");
        assert_eq!(mask("@x"), "***@x");
    }
}
