//! Message kinds and their bodies: the one place a body is judged valid or not.
//!
//! Every entry (REST, terminal `send`) calls [`validate`]; errors name the field path
//! (`body.text`, `body.duration_ms`, …) so a business developer sees what to fix.
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

/// Longest `text` body, in bytes.
pub const TEXT_BYTES_MAX: usize = 16 * 1024;
/// Longest `custom` body (its JSON encoding), in bytes.
pub const CUSTOM_BYTES_MAX: usize = 32 * 1024;
/// Longest url, name or mime string in a media body, in bytes.
pub const MEDIA_STRING_BYTES_MAX: usize = 2048;

/// The kind of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Text,
    Image,
    File,
    Voice,
    Custom,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Text => "text",
            Kind::Image => "image",
            Kind::File => "file",
            Kind::Voice => "voice",
            Kind::Custom => "custom",
        }
    }
}

/// Why a body is not valid, with the JSON path of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct BodyError {
    pub path: String,
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextBody {
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageBody {
    url: String,
    #[allow(dead_code)]
    width: Option<u32>,
    #[allow(dead_code)]
    height: Option<u32>,
    #[allow(dead_code)]
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    url: String,
    name: String,
    #[allow(dead_code)]
    size: Option<u64>,
    mime: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoiceBody {
    url: String,
    #[allow(dead_code)]
    duration_ms: u64,
    #[allow(dead_code)]
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CustomBody {
    data: Value,
}

fn shape<'de, T: Deserialize<'de>>(prefix: &str, body: &'de Value) -> Result<T, BodyError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let inner = e.path().to_string();
        let path = if inner == "." || inner.is_empty() { prefix.to_owned() } else { format!("{prefix}.{inner}") };
        BodyError { path, reason: e.into_inner().to_string() }
    })
}

fn bounded(path: String, s: &str, max: usize) -> Result<(), BodyError> {
    if s.len() > max {
        return Err(BodyError { path, reason: format!("longer than {max} bytes") });
    }
    Ok(())
}

fn url(prefix: &str, s: &str) -> Result<(), BodyError> {
    let path = format!("{prefix}.url");
    bounded(path.clone(), s, MEDIA_STRING_BYTES_MAX)?;
    if s.is_empty() {
        return Err(BodyError { path, reason: "must not be empty".into() });
    }
    Ok(())
}

/// Validates `body` for `kind`. `prefix` is the path of the body in its request (`body`,
/// `messages[3].body`).
pub fn validate(prefix: &str, kind: Kind, body: &Value) -> Result<(), BodyError> {
    if !body.is_object() {
        return Err(BodyError { path: prefix.to_owned(), reason: "must be an object".into() });
    }
    match kind {
        Kind::Text => {
            let b: TextBody = shape(prefix, body)?;
            bounded(format!("{prefix}.text"), &b.text, TEXT_BYTES_MAX)?;
            if b.text.is_empty() {
                return Err(BodyError { path: format!("{prefix}.text"), reason: "must not be empty".into() });
            }
        }
        Kind::Image => {
            let b: ImageBody = shape(prefix, body)?;
            url(prefix, &b.url)?;
        }
        Kind::File => {
            let b: FileBody = shape(prefix, body)?;
            url(prefix, &b.url)?;
            bounded(format!("{prefix}.name"), &b.name, MEDIA_STRING_BYTES_MAX)?;
            if b.name.is_empty() {
                return Err(BodyError { path: format!("{prefix}.name"), reason: "must not be empty".into() });
            }
            if let Some(m) = &b.mime {
                bounded(format!("{prefix}.mime"), m, MEDIA_STRING_BYTES_MAX)?;
            }
        }
        Kind::Voice => {
            let b: VoiceBody = shape(prefix, body)?;
            url(prefix, &b.url)?;
        }
        Kind::Custom => {
            let b: CustomBody = shape(prefix, body)?;
            let len = serde_json::to_vec(&b.data).map(|v| v.len()).unwrap_or(usize::MAX);
            if len > CUSTOM_BYTES_MAX {
                return Err(BodyError {
                    path: format!("{prefix}.data"),
                    reason: format!("longer than {CUSTOM_BYTES_MAX} bytes"),
                });
            }
        }
    }
    Ok(())
}

/// Validates a body given as raw JSON text, as it arrived: the usual valid shapes are checked
/// borrowed, without building a `Value` (no allocation for an unescaped text); anything the
/// fast check does not accept goes through [`validate`], so every error is exactly its error.
///
/// A field given twice is refused (`body.text: duplicate field`): the text is stored and
/// pushed as it came, and where a `Value` keeps only the last of the two (what [`validate`]
/// would judge), a terminal's JSON parser may keep the first, or refuse the message outright.
pub fn validate_raw(prefix: &str, kind: Kind, body: &RawValue) -> Result<(), BodyError> {
    if valid_borrowed(kind, body.get()) {
        return Ok(());
    }
    if let Some(key) = duplicate_key(body.get()) {
        return Err(BodyError { path: format!("{prefix}.{key}"), reason: "duplicate field".into() });
    }
    let value: Value = serde_json::from_str(body.get())
        .map_err(|e| BodyError { path: prefix.to_owned(), reason: format!("invalid JSON: {e}") })?;
    validate(prefix, kind, &value)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TextRef<'a> {
    #[serde(borrow)]
    text: Cow<'a, str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the optional fields are parsed for their types only
struct ImageRef<'a> {
    #[serde(borrow)]
    url: Cow<'a, str>,
    width: Option<u32>,
    height: Option<u32>,
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct FileRef<'a> {
    #[serde(borrow)]
    url: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    size: Option<u64>,
    #[serde(borrow)]
    mime: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct VoiceRef<'a> {
    #[serde(borrow)]
    url: Cow<'a, str>,
    duration_ms: u64,
    size: Option<u64>,
}

/// Whether `json` is (or at least begins as) a JSON object: its first byte past JSON whitespace
/// is `{`. The borrowed fast paths check it first: serde's derived `Deserialize` fills a struct
/// from a JSON array (its fields in order) as well as from an object, so without it `["hi"]`
/// would pass for `{"text":"hi"}`, and a request for its fields in an array. Anything else is
/// left to the slow path, which refuses it with its own error.
pub(crate) fn is_object_text(json: &[u8]) -> bool {
    json.iter().find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r')) == Some(&b'{')
}

/// The first key that appears twice at the top level of `raw`, when it is a JSON object
/// (anything else, valid or not, is `None`: [`validate`] judges it). The derived
/// `Deserialize` of the fast path's shapes refuses such a body already; a `Value` would
/// silently keep the last one.
fn duplicate_key(raw: &str) -> Option<String> {
    struct Keys;

    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Option<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut seen: Vec<String> = Vec::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if seen.contains(&key) {
                    return Ok(Some(key));
                }
                seen.push(key);
            }
            Ok(None)
        }
    }

    struct FirstDuplicate(Option<String>);

    impl<'de> Deserialize<'de> for FirstDuplicate {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(Keys).map(FirstDuplicate)
        }
    }

    if !is_object_text(raw.as_bytes()) {
        return None;
    }
    serde_json::from_str::<FirstDuplicate>(raw).ok().and_then(|d| d.0)
}

/// Whether `raw` is certainly a valid body of `kind` (false means "ask [`validate`]").
fn valid_borrowed(kind: Kind, raw: &str) -> bool {
    if !is_object_text(raw.as_bytes()) {
        return false;
    }
    let url_ok = |u: &str| !u.is_empty() && u.len() <= MEDIA_STRING_BYTES_MAX;
    let string_ok = |s: &str| !s.is_empty() && s.len() <= MEDIA_STRING_BYTES_MAX;
    match kind {
        Kind::Text => {
            serde_json::from_str::<TextRef>(raw).is_ok_and(|b| !b.text.is_empty() && b.text.len() <= TEXT_BYTES_MAX)
        }
        Kind::Image => serde_json::from_str::<ImageRef>(raw).is_ok_and(|b| url_ok(&b.url)),
        Kind::File => serde_json::from_str::<FileRef>(raw).is_ok_and(|b| {
            url_ok(&b.url) && string_ok(&b.name) && b.mime.as_deref().is_none_or(|m| m.len() <= MEDIA_STRING_BYTES_MAX)
        }),
        Kind::Voice => serde_json::from_str::<VoiceRef>(raw).is_ok_and(|b| url_ok(&b.url)),
        // Bounded by its compact re-encoding: always the `Value` path.
        Kind::Custom => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(kind: Kind, body: Value) -> BodyError {
        validate("body", kind, &body).unwrap_err()
    }

    #[test]
    fn valid_bodies() {
        validate("body", Kind::Text, &json!({"text": "hi"})).unwrap();
        validate("body", Kind::Image, &json!({"url": "https://x/y.png", "width": 10, "height": 5})).unwrap();
        validate("body", Kind::File, &json!({"url": "https://x/f", "name": "f.pdf", "mime": "application/pdf"}))
            .unwrap();
        validate("body", Kind::Voice, &json!({"url": "https://x/v", "duration_ms": 1200})).unwrap();
        validate("body", Kind::Custom, &json!({"data": {"any": [1, 2]}})).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(err(Kind::Text, json!({})).path, "body");
        assert!(err(Kind::Text, json!({})).reason.contains("text"));
        assert_eq!(err(Kind::Text, json!({"text": 5})).path, "body.text");
        assert_eq!(err(Kind::Text, json!({"text": ""})).path, "body.text");
        assert_eq!(err(Kind::Text, json!({"text": "x".repeat(TEXT_BYTES_MAX + 1)})).path, "body.text");
        assert_eq!(err(Kind::Voice, json!({"url": "u", "duration_ms": -1})).path, "body.duration_ms");
        assert_eq!(err(Kind::Image, json!({"url": ""})).path, "body.url");
        assert_eq!(err(Kind::File, json!({"url": "u"})).path, "body");
        assert_eq!(err(Kind::Text, json!("hi")).path, "body");
        assert_eq!(err(Kind::Custom, json!({"data": "x".repeat(CUSTOM_BYTES_MAX)})).path, "body.data");
        let e = validate("messages[2].body", Kind::Image, &json!({"url": 1})).unwrap_err();
        assert_eq!(e.path, "messages[2].body.url");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        assert!(err(Kind::Text, json!({"text": "a", "txt": "b"})).reason.contains("txt"));
    }

    fn body_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (0u64..5000).prop_map(Value::from),
            "[a-z\\\"é ]{0,6}".prop_map(Value::from),
            (0usize..3).prop_map(|n| Value::from("x".repeat([0, TEXT_BYTES_MAX, MEDIA_STRING_BYTES_MAX + 1][n]))),
        ];
        let key = prop_oneof![
            Just("text"),
            Just("url"),
            Just("name"),
            Just("mime"),
            Just("width"),
            Just("size"),
            Just("duration_ms"),
            Just("data"),
            Just("other"),
        ];
        let object = proptest::collection::btree_map(key, leaf.clone(), 0..4)
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()));
        // Arrays: of values (`["hi"]` has the fields of a text body in order, `["u", 1, 2, 3]`
        // those of an image), of objects, and of arrays.
        let element = prop_oneof![3 => leaf.clone(), 1 => object.clone()];
        let array = proptest::collection::vec(element, 0..5).prop_map(Value::Array);
        let nested = proptest::collection::vec(array.clone(), 1..3).prop_map(Value::Array);
        prop_oneof![
            4 => object,
            1 => leaf,
            2 => array,
            1 => nested,
            1 => fields_in_order(),
        ]
    }

    /// Arrays holding a valid body's fields in order: what a derived `Deserialize` would take
    /// for the body itself.
    fn fields_in_order() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        prop_oneof![
            "[a-z]{1,6}".prop_map(|t| json!([t])),
            ("[a-z]{1,6}", proptest::option::of(0u32..9)).prop_map(|(u, n)| json!([u, n, n, n])),
            ("[a-z]{1,6}", "[a-z]{1,6}").prop_map(|(u, n)| json!([u, n, null, null])),
            ("[a-z]{1,6}", 0u64..9).prop_map(|(u, d)| json!([u, d, null])),
            "[a-z]{1,6}".prop_map(|t| json!([[t]])),
        ]
    }

    proptest::proptest! {
        /// The borrowed fast path never changes a verdict or an error.
        #[test]
        fn raw_validation_agrees_with_value_validation(body in body_value(), k in 0usize..5) {
            let kind = [Kind::Text, Kind::Image, Kind::File, Kind::Voice, Kind::Custom][k];
            let raw = serde_json::value::to_raw_value(&body).unwrap();
            proptest::prop_assert_eq!(validate_raw("body", kind, &raw), validate("body", kind, &body));
        }
    }

    #[test]
    fn raw_validation_accepts_the_usual_shapes() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        validate_raw("body", Kind::Text, &raw(r#"{"text": "hi \"there\""}"#)).unwrap();
        validate_raw("body", Kind::File, &raw(r#"{"url":"u","name":"n","mime":"m","size":3}"#)).unwrap();
        let e = validate_raw("body", Kind::Text, &raw(r#"{"text":""}"#)).unwrap_err();
        assert_eq!(e.path, "body.text");
    }

    /// A field given twice is refused where the body is kept as the text it came as: a
    /// `Value` keeps the last (`validate` would pass `{"text":5,"text":"hi"}`), but that text
    /// is what terminals get, and their parsers may keep the first or refuse it.
    #[test]
    fn raw_validation_refuses_duplicate_fields() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        let long = "x".repeat(TEXT_BYTES_MAX + 1);
        for (kind, body, path) in [
            (Kind::Text, r#"{"text":5,"text":"hi"}"#.to_owned(), "body.text"),
            (Kind::Text, format!(r#"{{"text":"{long}","text":"hi"}}"#), "body.text"),
            (Kind::Text, r#"{"text":"hi","text":"hi"}"#.to_owned(), "body.text"),
            (Kind::Image, r#"{"url":"u","width":1,"width":-1}"#.to_owned(), "body.width"),
            (Kind::File, r#"{"url":"u","name":"","name":"n"}"#.to_owned(), "body.name"),
            (Kind::Voice, r#"{"url":"","duration_ms":1,"url":"u"}"#.to_owned(), "body.url"),
            (Kind::Custom, format!(r#"{{"data":"{}","data":1}}"#, "x".repeat(CUSTOM_BYTES_MAX)), "body.data"),
        ] {
            let e = validate_raw("body", kind, &raw(&body)).unwrap_err();
            assert_eq!((e.path.as_str(), e.reason.as_str()), (path, "duplicate field"), "{kind:?}");
        }
        // Nested objects are the data's own business; and a body with no repeat is unchanged.
        validate_raw("body", Kind::Custom, &raw(r#"{"data":{"a":1,"a":2}}"#)).unwrap();
        validate_raw("body", Kind::Custom, &raw(r#"{"data":{"text":1},"text":2}"#)).unwrap_err();
        validate_raw("body", Kind::Text, &raw(r#"{"text":"a\u0062"}"#)).unwrap();
    }

    /// A body is an object on the fast path too: serde's derived `Deserialize` would read an
    /// array as the struct's fields in order.
    #[test]
    fn raw_validation_refuses_arrays_like_validate() {
        let raw = |s: &str| RawValue::from_string(s.to_owned()).unwrap();
        for (kind, body) in [
            (Kind::Text, r#"["hi"]"#),
            (Kind::Text, r#" ["hi"]"#),
            (Kind::Text, r#"[["hi"]]"#),
            (Kind::Image, r#"["https://x/y.png", 1, 2, 3]"#),
            (Kind::File, r#"["u", "n", null, null]"#),
            (Kind::Voice, r#"["u", 1200, null]"#),
            (Kind::Custom, r#"[{"a": 1}]"#),
        ] {
            let e = validate_raw("body", kind, &raw(body)).unwrap_err();
            assert_eq!(e, BodyError { path: "body".into(), reason: "must be an object".into() }, "{body}");
            let value: Value = serde_json::from_str(body).unwrap();
            assert_eq!(Err(e), validate("body", kind, &value));
        }
        validate_raw("body", Kind::Text, &raw(" \n{\"text\": \"hi\"}")).unwrap();
    }
}
