//! [`Answer`]: a JSON object that keeps its members in order.

use std::fmt::Write as _;

use serde_json::Value;

/// The JSON object `GET` answers for an entity, members in the order they were set
/// (the host adds the user's `organization` member itself).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Answer {
    members: Vec<(String, Value)>,
}

impl Answer {
    /// An empty object.
    pub fn new() -> Self {
        Self::default()
    }

    /// The object with `name` set to `value` (builder style).
    #[must_use]
    pub fn with(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.set(name, value);
        self
    }

    /// Sets `name` to `value`: in place if it is there, else at the end.
    pub fn set(&mut self, name: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.members.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value,
            None => self.members.push((name.to_owned(), value)),
        }
    }

    /// Removes `name`; its value, if it was there.
    pub fn remove(&mut self, name: &str) -> Option<Value> {
        let at = self.members.iter().position(|(n, _)| n == name)?;
        Some(self.members.remove(at).1)
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// The value of `name` when it is a string.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(Value::as_str)
    }

    /// The members in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.members.iter().map(|(n, v)| (n.as_str(), v))
    }

    /// The object as JSON text, members in order.
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(32 * self.members.len() + 2);
        out.push('{');
        for (i, (name, value)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{value}", Value::from(name.as_str()));
        }
        out.push('}');
        out
    }

    /// Parses a JSON object, keeping its members' order.
    ///
    /// # Errors
    /// When `text` is not a JSON object.
    pub fn parse(text: &str) -> Result<Self, String> {
        let members: Ordered = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Ok(Self { members: members.0 })
    }
}

impl From<serde_json::Map<String, Value>> for Answer {
    fn from(map: serde_json::Map<String, Value>) -> Self {
        Self {
            members: map.into_iter().collect(),
        }
    }
}

/// The members of a JSON object in document order.
struct Ordered(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Ordered, A::Error> {
                let mut members = Vec::new();
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Ordered(members))
            }
        }
        d.deserialize_map(Visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_order_through_edits_and_text() {
        let mut a = Answer::parse(r#"{"id":"7","user_email":"A@B.C","n":1}"#).unwrap();
        a.set("user_email", "a@b.c");
        a.set("display_name", "Seven");
        assert_eq!(a.remove("n"), Some(Value::from(1)));
        assert_eq!(a.remove("missing"), None);
        assert_eq!(
            a.to_json(),
            r#"{"id":"7","user_email":"a@b.c","display_name":"Seven"}"#
        );
        assert_eq!(a.get_str("id"), Some("7"));
        let odd = Answer::new().with("quote\"d", "x\ny");
        assert_eq!(odd.to_json(), r#"{"quote\"d":"x\ny"}"#);
        assert!(Answer::parse("[1]").is_err());
    }
}
