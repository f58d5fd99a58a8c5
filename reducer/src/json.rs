//! A small validating JSON reader for what events are: flat objects whose interesting
//! members are strings. One pass, no recursion (nesting depth costs heap, never stack),
//! strings borrowed from the record unless they have escapes.
//!
//! It replaced `serde_json` in the reducer: the profile (callgrind, `bench/`) showed
//! serde's derived decoding at about 5,000 instructions per 230-byte event, most of
//! the fold. This reader accepts exactly RFC 8259 JSON; everything else is an error
//! with the byte position.

use std::borrow::Cow;

/// A member's value, as far as events care.
#[derive(Debug, PartialEq, Eq)]
pub enum Value<'a> {
    /// A string, unescaped.
    Str(Cow<'a, str>),
    /// `null`.
    Null,
    /// Anything else (validated and skipped); names its JSON type.
    Other(&'static str),
}

/// Reads `text` as one JSON object and calls `member` for each of its members, in
/// order. A value that is not a string or null is validated, skipped and passed as
/// [`Value::Other`].
///
/// # Errors
/// `invalid JSON: ...` when `text` is not JSON, `wrong field type: ...` when it is not
/// an object, or the error `member` returned (the first one; the rest of the object is
/// then not read).
pub fn object<'a>(
    text: &'a str,
    mut member: impl FnMut(&str, Value<'a>) -> Result<(), String>,
) -> Result<(), String> {
    let mut p = Parser::new(text);
    p.ws();
    match p.peek() {
        Some(b'{') => {}
        Some(_) => {
            let kind = p.skip_value().map_err(invalid)?;
            p.end().map_err(invalid)?;
            return Err(not_an_object(kind));
        }
        None => return Err(invalid(p.error("expected a value"))),
    }
    p.members(&mut member, false).map_err(invalid)??;
    p.end().map_err(invalid)
}

fn not_an_object(kind: &str) -> String {
    format!("wrong field type: expected a JSON object, found {kind}")
}

/// A JSON array of objects, read element by element in one pass: each byte is scanned
/// and validated once (before, the array was validated whole and each element read
/// again).
pub struct Objects<'a> {
    p: Parser<'a>,
    done: bool,
}

impl<'a> Objects<'a> {
    /// Starts reading `text`, which must open a JSON array.
    ///
    /// # Errors
    /// A message with the byte position when `text` does not start with `[`.
    pub fn new(text: &'a str) -> Result<Self, String> {
        let mut p = Parser::new(text);
        p.ws();
        p.expect(b'[')?;
        p.ws();
        let done = p.eat(b']');
        if done {
            p.end()?;
        }
        Ok(Self { p, done })
    }

    /// Reads the next element, calling `member` for each member when it is an object
    /// (as [`object`] does). `None` after the last element; `Some(Err(reason))` for an
    /// element that is not an object or whose `member` call failed (the element is
    /// still validated to its end, so the next one can be read).
    ///
    /// # Errors
    /// A message with the byte position when the array is not JSON: then nothing
    /// read from it counts.
    pub fn next_object(
        &mut self,
        mut member: impl FnMut(&str, Value<'a>) -> Result<(), String>,
    ) -> Result<Option<Result<(), String>>, String> {
        if self.done {
            return Ok(None);
        }
        let p = &mut self.p;
        p.ws();
        let read = if p.peek() == Some(b'{') {
            p.members(&mut member, true)?
        } else {
            Err(not_an_object(p.skip_value()?))
        };
        p.ws();
        match p.next() {
            Some(b',') => {}
            Some(b']') => {
                p.end()?;
                self.done = true;
            }
            _ => return Err(p.error_before("expected `,` or `]`")),
        }
        Ok(Some(read))
    }
}

/// Reads `text` as exactly one JSON string literal (quotes included), unescaped.
///
/// # Errors
/// When `text` is anything else.
pub fn string_literal(text: &str) -> Result<Cow<'_, str>, String> {
    let mut p = Parser::new(text);
    let s = p.string()?;
    if p.pos == text.len() {
        Ok(s)
    } else {
        Err(p.error("trailing characters"))
    }
}

/// Splits a JSON array into the text of its elements, validating all of it: how arrays
/// were read before [`Objects`], kept as the tests' reference.
#[cfg(test)]
fn array_items(text: &str) -> Result<Vec<&str>, String> {
    let mut p = Parser::new(text);
    p.ws();
    p.expect(b'[')?;
    let mut items = Vec::new();
    p.ws();
    if p.eat(b']') {
        p.end()?;
        return Ok(items);
    }
    loop {
        p.ws();
        let start = p.pos;
        p.skip_value()?;
        items.push(&text[start..p.pos]);
        p.ws();
        match p.next() {
            Some(b',') => {}
            Some(b']') => {
                p.end()?;
                return Ok(items);
            }
            _ => return Err(p.error_before("expected `,` or `]`")),
        }
    }
}

/// The end of the run of string bytes from `at` that need no attention: the position
/// of the first `"`, `\\` or control character (or the end). Sixteen bytes per step
/// with wasm SIMD in a wasm32 build, then eight per step in a `u64`.
pub(crate) fn plain_run(b: &[u8], at: usize) -> usize {
    #[cfg(target_arch = "wasm32")]
    let at = plain_run_simd128(b, at);
    plain_run_swar(b, at)
}

/// [`plain_run`] over whole 16-byte chunks: returns the position of the first special
/// byte, or where the last whole chunk ends. Only this function uses `simd128` (which
/// wasmtime runs): built for the whole crate, LLVM's other vectorizing did not pay.
#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128")]
fn plain_run_simd128(b: &[u8], mut at: usize) -> usize {
    use core::arch::wasm32::{u8x16_bitmask, u8x16_eq, u8x16_lt, u8x16_splat, u64x2, v128_or};
    let (quote, backslash, space) = (u8x16_splat(b'"'), u8x16_splat(b'\\'), u8x16_splat(0x20));
    let word = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
    while let Some(chunk) = b.get(at..at + 16) {
        // One unaligned `v128.load` once optimized (checked in the module's text).
        let v = u64x2(word(&chunk[..8]), word(&chunk[8..]));
        let hits = v128_or(
            v128_or(u8x16_eq(v, quote), u8x16_eq(v, backslash)),
            u8x16_lt(v, space),
        );
        let mask = u8x16_bitmask(hits);
        if mask != 0 {
            return at + mask.trailing_zeros() as usize;
        }
        at += 16;
    }
    at
}

/// [`plain_run`] eight bytes per step in a `u64` (SWAR), then byte by byte.
fn plain_run_swar(b: &[u8], mut at: usize) -> usize {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Sets the high bit of the lowest byte below `n` (and maybe of bytes above it,
    // which the lowest-bit search ignores); bytes >= 0x80 never match.
    let below = |w: u64, n: u64| w.wrapping_sub(ONES * n) & !w & HIGH;
    while let Some(chunk) = b.get(at..at + 8) {
        let w = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        let hits = below(w ^ (ONES * u64::from(b'"')), 1)
            | below(w ^ (ONES * u64::from(b'\\')), 1)
            | below(w, 0x20);
        if hits != 0 {
            return at + (hits.trailing_zeros() / 8) as usize;
        }
        at += 8;
    }
    while b
        .get(at)
        .is_some_and(|&c| c != b'"' && c != b'\\' && c >= 0x20)
    {
        at += 1;
    }
    at
}

fn invalid(e: String) -> String {
    format!("invalid JSON: {e}")
}

struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    pos: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            b: text.as_bytes(),
            pos: 0,
        }
    }

    fn error(&self, what: &str) -> String {
        if self.pos >= self.b.len() {
            format!("{what}, found the end of the input at byte {}", self.pos)
        } else {
            format!("{what} at byte {}", self.pos)
        }
    }

    /// For errors found after consuming the offending byte.
    fn error_before(&mut self, what: &str) -> String {
        self.pos = self.pos.saturating_sub(1);
        self.error(what)
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.pos += 1;
        c
    }

    fn eat(&mut self, c: u8) -> bool {
        let yes = self.peek() == Some(c);
        self.pos += usize::from(yes);
        yes
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.error(&format!("expected `{}`", char::from(c))))
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Only whitespace may follow the value.
    fn end(&mut self) -> Result<(), String> {
        self.ws();
        if self.pos >= self.b.len() {
            Ok(())
        } else {
            Err(self.error("trailing characters"))
        }
    }

    fn literal(&mut self, word: &str) -> Result<(), String> {
        if self.b[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(())
        } else {
            Err(self.error("expected a value"))
        }
    }

    /// A string at `pos` (which holds `"`), unescaped.
    fn string(&mut self) -> Result<Cow<'a, str>, String> {
        self.expect(b'"')?;
        let start = self.pos;
        // Fast path: no escapes, borrowed.
        self.pos = plain_run(self.b, self.pos);
        match self.peek() {
            Some(b'"') => {
                self.pos += 1;
                return Ok(Cow::Borrowed(&self.text[start..self.pos - 1]));
            }
            Some(b'\\') => {}
            Some(_) => return Err(self.error("control character in a string")),
            None => return Err(self.error("unterminated string")),
        }
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.text[start..self.pos]);
        loop {
            let run = self.pos;
            self.pos = plain_run(self.b, self.pos);
            out.push_str(&self.text[run..self.pos]);
            match self.next() {
                Some(b'"') => return Ok(Cow::Owned(out)),
                Some(b'\\') => out.push(self.escape()?),
                Some(_) => return Err(self.error_before("control character in a string")),
                None => return Err(self.error("unterminated string")),
            }
        }
    }

    /// The character of the escape after a backslash.
    fn escape(&mut self) -> Result<char, String> {
        let c = match self.next() {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let high = self.hex4()?;
                let code = if (0xD800..0xDC00).contains(&high) {
                    if !(self.eat(b'\\') && self.eat(b'u')) {
                        return Err(self.error("lone leading surrogate in a \\u escape"));
                    }
                    let low = self.hex4()?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(self.error("invalid low surrogate in a \\u escape"));
                    }
                    0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                } else {
                    high
                };
                return char::from_u32(code)
                    .ok_or_else(|| self.error("lone trailing surrogate in a \\u escape"));
            }
            _ => return Err(self.error_before("invalid escape")),
        };
        Ok(c)
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0;
        for _ in 0..4 {
            let d = self
                .peek()
                .and_then(|c| char::from(c).to_digit(16))
                .ok_or_else(|| self.error("invalid \\u escape"))?;
            v = v * 16 + d;
            self.pos += 1;
        }
        Ok(v)
    }

    fn number(&mut self) -> Result<(), String> {
        self.eat(b'-');
        let digits = |p: &mut Self| {
            let start = p.pos;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
            p.pos - start
        };
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => {
                digits(self);
            }
            _ => return Err(self.error("invalid number")),
        }
        if self.eat(b'.') && digits(self) == 0 {
            return Err(self.error("invalid number"));
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if digits(self) == 0 {
                return Err(self.error("invalid number"));
            }
        }
        Ok(())
    }

    /// Reads the object at `pos` (which holds `{`) to its `}`, calling `member` for
    /// each member. The outer error is the JSON's; the inner one is `member`'s first:
    /// after it, the rest of the object is validated without calls when `validate_rest`,
    /// else not read.
    fn members(
        &mut self,
        member: &mut impl FnMut(&str, Value<'a>) -> Result<(), String>,
        validate_rest: bool,
    ) -> Result<Result<(), String>, String> {
        self.expect(b'{')?;
        self.ws();
        if self.eat(b'}') {
            return Ok(Ok(()));
        }
        let mut failed = Ok(());
        loop {
            self.ws();
            let key = self.string()?;
            self.ws();
            self.expect(b':')?;
            self.ws();
            let value = match self.peek() {
                Some(b'"') => Value::Str(self.string()?),
                Some(b'n') => {
                    self.literal("null")?;
                    Value::Null
                }
                _ => Value::Other(self.skip_value()?),
            };
            if failed.is_ok() {
                failed = member(&key, value);
                if failed.is_err() && !validate_rest {
                    return Ok(failed);
                }
            }
            self.ws();
            match self.next() {
                Some(b',') => {}
                Some(b'}') => return Ok(failed),
                _ => return Err(self.error_before("expected `,` or `}`")),
            }
        }
    }

    /// Validates and skips one value of any depth; names its type. Iterative: the
    /// open containers live in a heap stack, so nesting depth cannot overflow.
    fn skip_value(&mut self) -> Result<&'static str, String> {
        let kind = match self.peek() {
            Some(b'{') => "an object",
            Some(b'[') => "an array",
            Some(b'"') => "a string",
            Some(b't' | b'f') => "a boolean",
            Some(b'n') => "null",
            _ => "a number",
        };
        let mut open: Vec<u8> = Vec::new();
        loop {
            // A value starts here.
            self.ws();
            match self.peek() {
                Some(b'{') => {
                    self.pos += 1;
                    self.ws();
                    if !self.eat(b'}') {
                        open.push(b'}');
                        self.member_key()?;
                        continue;
                    }
                }
                Some(b'[') => {
                    self.pos += 1;
                    self.ws();
                    if !self.eat(b']') {
                        open.push(b']');
                        continue;
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(b't') => self.literal("true")?,
                Some(b'f') => self.literal("false")?,
                Some(b'n') => self.literal("null")?,
                Some(b'-' | b'0'..=b'9') => self.number()?,
                _ => return Err(self.error("expected a value")),
            }
            // After a value: close containers until one wants another value.
            loop {
                let Some(&close) = open.last() else {
                    return Ok(kind);
                };
                self.ws();
                match self.next() {
                    Some(b',') => {
                        if close == b'}' {
                            self.ws();
                            self.member_key()?;
                        }
                        break;
                    }
                    Some(c) if c == close => {
                        open.pop();
                    }
                    _ => {
                        return Err(self.error_before(if close == b'}' {
                            "expected `,` or `}`"
                        } else {
                            "expected `,` or `]`"
                        }));
                    }
                }
            }
        }
    }

    /// `"key":` inside an object being skipped.
    fn member_key(&mut self) -> Result<(), String> {
        self.string()?;
        self.ws();
        self.expect(b':')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(text: &str) -> Result<Vec<(String, Value<'_>)>, String> {
        let mut out = Vec::new();
        object(text, |k, v| {
            out.push((k.to_string(), v));
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn reads_strings_nulls_and_skips_the_rest() {
        let got = members(
            r#" { "a" : "x" , "b":null, "c":[1,{"d":[true,false,null,-1.5e+3]}],"e\u0041":"q\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00" } "#,
        )
        .unwrap();
        assert_eq!(got[0], ("a".into(), Value::Str(Cow::Borrowed("x"))));
        assert_eq!(got[1], ("b".into(), Value::Null));
        assert_eq!(got[2], ("c".into(), Value::Other("an array")));
        assert_eq!(
            got[3],
            (
                "eA".into(),
                Value::Str(Cow::Owned("q\"\\/\u{8}\u{c}\n\r\té😀".into()))
            )
        );
        assert!(members("{}").unwrap().is_empty());
    }

    #[test]
    fn agrees_with_serde_json_on_what_is_json() {
        let cases = [
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "{\"a\":1,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":-}",
            "{\"a\":1e}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\\u12\"}",
            "{\"a\":\"\u{1}\"}",
            "{\"a\":\"unterminated}",
            "{\"a\":[1,2}",
            "{\"a\":{\"b\" 1}}",
            "{} {}",
            "{\"a\":[]} x",
            "{'a':1}",
            "{\"a\":NaN}",
            "{\"a\":\"\\ud800\"}",
            "{\"a\":\"\\udc00\"}",
            "{\"a\":[1,[2,[3]],{\"b\":[{}]}],\"c\":-0.0e-0}",
            "{\"a\":\"\\ud83d\\ude00\"}",
            " {\"a\" :\t\"b\" }\n",
        ];
        for text in cases {
            let ours = members(text).is_ok();
            let serde = serde_json::from_str::<serde_json::Value>(text).is_ok();
            assert_eq!(ours, serde, "{text:?}");
        }
    }

    #[test]
    fn non_objects_are_wrong_types_and_depth_is_free() {
        for (text, kind) in [
            ("\"s\"", "a string"),
            ("42", "a number"),
            ("[1]", "an array"),
            ("true", "a boolean"),
            ("null", "null"),
        ] {
            let e = members(text).unwrap_err();
            assert!(e.starts_with("wrong field type") && e.contains(kind), "{e}");
        }
        let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert_eq!(array_items(&deep).unwrap().len(), 1);
        let broken = format!("{}{}", "[".repeat(1_000_000), "]".repeat(999_999));
        assert!(array_items(&broken).is_err());
    }

    #[test]
    fn plain_runs_stop_at_the_first_special_byte() {
        for text in [
            "",
            "abc",
            "abcdefgh\"",
            "abcdefghijklmnop\\x",
            "ab\u{1}",
            "é€😀abcdefgh\u{1f}",
            "abcdefg\"abcdefg\"",
        ] {
            let b = text.as_bytes();
            let want = b
                .iter()
                .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                .unwrap_or(b.len());
            for from in 0..=want {
                assert_eq!(plain_run(b, from), want, "{text:?} from {from}");
            }
        }
    }

    /// What reading `text` as an array of objects gives, element by element: the
    /// members (a member named `x` is refused, to see refusals inside elements), or
    /// the array's error.
    type Read = Result<Vec<Result<Vec<(String, String)>, String>>, String>;

    /// A `member` callback that keeps what it is given in `got`, refusing `x`.
    fn recorder(
        got: &mut Vec<(String, String)>,
    ) -> impl FnMut(&str, Value<'_>) -> Result<(), String> + '_ {
        |k, v| {
            if k == "x" {
                return Err("member x".into());
            }
            got.push((k.to_string(), format!("{v:?}")));
            Ok(())
        }
    }

    fn one_pass(text: &str) -> Read {
        let mut items = Objects::new(text)?;
        let mut out = Vec::new();
        loop {
            let mut got = Vec::new();
            match items.next_object(recorder(&mut got))? {
                None => return Ok(out),
                Some(read) => out.push(read.map(|()| got)),
            }
        }
    }

    /// How arrays were read before: validated whole, then each element again.
    fn two_passes(text: &str) -> Read {
        Ok(array_items(text)?
            .into_iter()
            .map(|item| {
                let mut got = Vec::new();
                object(item, recorder(&mut got)).map(|()| got)
            })
            .collect())
    }

    #[test]
    fn objects_read_arrays_in_one_pass_as_two_passes_did() {
        for text in [
            "[]",
            " [ ] ",
            "[{}]",
            r#"[{"a":"1"},{"b":null,"c":[1,{"d":2}]}]"#,
            r#"[{"a":"1"},42,"s",[{}],{"x":"no","y":"after the refusal"}]"#,
            r#"[{"x":1,"a":"2"}, {"a":"3"}] "#,
            r#"[{"a":"1"},{"x":"2",]"#,
            r#"[{"a":"1"},{"x":"2","b":tru}]"#,
            r#"[{"a":"1"} {"b":"2"}]"#,
            r#"[{"a":"1"},]"#,
            r#"[{"a":"1"}] x"#,
            r#"[{"a":"1"}"#,
            "[",
            "[1,",
        ] {
            assert_eq!(one_pass(text), two_passes(text), "{text:?}");
        }
        // A refused member does not stop the element being validated to its end.
        assert!(one_pass(r#"[{"x":"refused","b":"broken}]"#).is_err());
    }

    proptest::proptest! {
        /// Arrays of events with random edits: the one-pass reader gives what the two
        /// passes gave, element by element and error by error, and calls the array JSON
        /// exactly when serde_json does.
        #[test]
        fn objects_agree_with_two_passes_and_serde_json(
            elements in proptest::collection::vec(proptest::sample::select(vec![
                r#"{"id":"u1","event_type":"User Created","x":"refused","n":[1,{"k":null}]}"#,
                r#"{ "a" : "b\"\u00e9" , "c" : -1.5e3 , "d" : true }"#,
                r#"{}"#, "42", r#""s""#, "[{}]", "null",
            ]), 0..5),
            edits in proptest::collection::vec(
                (0usize..400, proptest::sample::select(b"{}[],:\"x 1n".to_vec())), 0..3),
            removals in proptest::collection::vec(0usize..400, 0..2),
        ) {
            let mut text = format!("[{}]", elements.join(",")).into_bytes();
            for (at, c) in edits {
                let at = at % (text.len() + 1);
                text.insert(at, c);
            }
            for at in removals {
                if !text.is_empty() {
                    let at = at % text.len();
                    text.remove(at);
                }
            }
            let Ok(text) = String::from_utf8(text) else { return Ok(()) };
            let ours = one_pass(&text);
            proptest::prop_assert_eq!(&ours, &two_passes(&text), "{:?}", text);
            if text.trim_start().starts_with('[') {
                let serde = serde_json::from_str::<serde_json::Value>(&text).is_ok();
                proptest::prop_assert_eq!(ours.is_ok(), serde, "{:?}", text);
            }
        }
    }

    #[test]
    fn array_items_are_the_element_texts() {
        assert_eq!(
            array_items(" [ {\"a\":1} , 2,\"x\" ] ").unwrap(),
            vec!["{\"a\":1}", "2", "\"x\""]
        );
        assert_eq!(array_items("[]").unwrap(), Vec::<&str>::new());
        assert!(array_items("[1,]").is_err());
        assert!(array_items("[1").is_err());
    }
}
