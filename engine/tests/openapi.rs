//! The OpenAPI document of the api port (`docs/openapi.json`, API.md section 3) against a live
//! node: the document is well-formed and self-consistent; every documented route answers a
//! minimal valid request built from the document's own examples with its documented success,
//! and its documented errors (401, 405, 400, 404, 403, 409, 413) where they can be provoked;
//! the answers of the main calls carry every required property with the documented JSON type;
//! undocumented paths answer 404.
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};

use serde_json::{json, Value};
use support::*;

const DOC: &str = include_str!("../../docs/openapi.json");

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

/// Follows `$ref`s (local JSON pointers) until a schema, response or parameter that is not one.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    for _ in 0..32 {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let pointer = r.strip_prefix('#').unwrap_or_else(|| panic!("$ref {r} is not local"));
                v = doc.pointer(pointer).unwrap_or_else(|| panic!("$ref {r} does not resolve"));
            }
            None => return v,
        }
    }
    panic!("$ref cycle at {v}")
}

/// Every `$ref` string anywhere in `v`.
fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x.as_str()) {
                    ("$ref", Some(r)) => out.push(r),
                    _ => refs(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

/// Checks `v` against `schema`, collecting every violation with its JSON path: `allOf`, `oneOf`
/// (exactly one), `type` (object, array, string, integer, number, boolean), `nullable`, `enum`,
/// `required`, `properties`, `additionalProperties`, `items`, and the numeric and length bounds.
fn conforms(doc: &Value, schema: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    let s = resolve(doc, schema);
    for sub in s.get("allOf").and_then(Value::as_array).into_iter().flatten() {
        conforms(doc, sub, v, at, errs);
    }
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let matching = one
            .iter()
            .filter(|sub| {
                let mut e = Vec::new();
                conforms(doc, sub, v, at, &mut e);
                e.is_empty()
            })
            .count();
        if matching != 1 {
            errs.push(format!("{at}: matches {matching} of the oneOf schemas instead of exactly one: {v}"));
        }
    }
    if v.is_null() {
        if let Some(t) = s.get("type") {
            if s.get("nullable") != Some(&Value::Bool(true)) {
                errs.push(format!("{at}: null where the schema says {t}"));
            }
        }
        return;
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            other => {
                errs.push(format!("{at}: the schema has an unknown type {other:?}"));
                return;
            }
        };
        if !ok {
            errs.push(format!("{at}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array) {
        if !allowed.contains(v) {
            errs.push(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let Some(n) = v.as_f64() {
        if s.get("minimum").and_then(Value::as_f64).is_some_and(|min| n < min) {
            errs.push(format!("{at}: {v} is below the minimum {}", s["minimum"]));
        }
        if s.get("maximum").and_then(Value::as_f64).is_some_and(|max| n > max) {
            errs.push(format!("{at}: {v} is above the maximum {}", s["maximum"]));
        }
    }
    if let Some(text) = v.as_str() {
        let chars = text.chars().count() as u64;
        if s.get("minLength").and_then(Value::as_u64).is_some_and(|min| chars < min) {
            errs.push(format!("{at}: {v} is shorter than {}", s["minLength"]));
        }
        if s.get("maxLength").and_then(Value::as_u64).is_some_and(|max| chars > max) {
            errs.push(format!("{at}: {v} is longer than {}", s["maxLength"]));
        }
    }
    if let Some(obj) = v.as_object() {
        for name in s.get("required").and_then(Value::as_array).into_iter().flatten() {
            let name = name.as_str().expect("required names are strings");
            if !obj.contains_key(name) {
                errs.push(format!("{at}: missing the required property {name:?} in {v}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in obj {
            let here = format!("{at}.{k}");
            match (props.and_then(|p| p.get(k)), s.get("additionalProperties")) {
                (Some(p), _) => conforms(doc, p, x, &here, errs),
                (None, Some(Value::Bool(false))) => errs.push(format!("{here}: not a documented property")),
                (None, Some(extra @ Value::Object(_))) => conforms(doc, extra, x, &here, errs),
                (None, _) => {}
            }
        }
    }
    if let Some(items) = v.as_array() {
        if s.get("maxItems").and_then(Value::as_u64).is_some_and(|max| items.len() as u64 > max) {
            errs.push(format!("{at}: more than {} items", s["maxItems"]));
        }
        if let Some(item) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                conforms(doc, item, x, &format!("{at}[{i}]"), errs);
            }
        }
    }
}

/// One documented operation.
struct Op<'a> {
    method: String,
    path: String,
    spec: &'a Value,
    params: Vec<&'a Value>,
}

impl<'a> Op<'a> {
    fn id(&self) -> &str {
        self.spec["operationId"].as_str().unwrap_or("?")
    }

    fn name(&self) -> String {
        format!("{} {} ({})", self.method, self.path, self.id())
    }

    fn statuses(&self) -> BTreeSet<u16> {
        let responses = self.spec["responses"].as_object().expect("responses");
        responses.keys().map(|k| k.parse().unwrap_or_else(|_| panic!("{}: status {k:?}", self.name()))).collect()
    }

    fn documents(&self, status: u16) -> bool {
        self.statuses().contains(&status)
    }

    /// The documented success: its status and response schema.
    fn success(&self, doc: &'a Value) -> (u16, &'a Value) {
        let ok: Vec<u16> = self.statuses().into_iter().filter(|s| (200..300).contains(s)).collect();
        assert_eq!(ok.len(), 1, "{}: exactly one documented success", self.name());
        (ok[0], self.response_schema(doc, ok[0]))
    }

    fn response_schema(&self, doc: &'a Value, status: u16) -> &'a Value {
        let spec: &'a Value = self.spec;
        let response = resolve(doc, &spec["responses"][status.to_string()]);
        let schema = &response["content"]["application/json"]["schema"];
        assert!(schema.is_object(), "{}: {status} has no application/json schema", self.name());
        schema
    }

    /// The example request body, if the operation takes one.
    fn example_body(&self) -> Option<&'a Value> {
        self.spec.get("requestBody").map(|b| &b["content"]["application/json"]["example"])
    }

    /// The path with each `{param}` replaced, plus every query parameter that has an example.
    fn url(&self, path_values: &BTreeMap<String, String>, with_query: bool) -> String {
        let mut url = self.path.clone();
        for p in &self.params {
            if p["in"] == "path" {
                let name = p["name"].as_str().expect("name");
                let value = path_values.get(name).cloned().unwrap_or_else(|| example_text(&p["example"]));
                url = url.replace(&format!("{{{name}}}"), &value);
            }
        }
        let query: Vec<String> = self
            .params
            .iter()
            .filter(|p| with_query && p["in"] == "query" && p.get("example").is_some())
            .map(|p| format!("{}={}", p["name"].as_str().expect("name"), example_text(&p["example"])))
            .collect();
        if !query.is_empty() {
            url = format!("{url}?{}", query.join("&"));
        }
        url
    }
}

fn example_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => panic!("a path or query parameter without an example"),
        other => other.to_string(),
    }
}

fn operations(doc: &Value) -> Vec<Op<'_>> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let shared: Vec<&Value> =
            item.get("parameters").and_then(Value::as_array).into_iter().flatten().map(|p| resolve(doc, p)).collect();
        for (method, spec) in item.as_object().expect("path item") {
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let mut params = shared.clone();
            params.extend(
                spec.get("parameters").and_then(Value::as_array).into_iter().flatten().map(|p| resolve(doc, p)),
            );
            ops.push(Op { method: method.to_uppercase(), path: path.clone(), spec, params });
        }
    }
    ops
}

fn op_by_id<'a>(ops: &'a [Op<'a>], id: &str) -> &'a Op<'a> {
    ops.iter().find(|o| o.id() == id).unwrap_or_else(|| panic!("no operation {id} in the document"))
}

/// Whether `path` (no query) matches one of the document's path templates.
fn documented(doc: &Value, path: &str) -> bool {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    doc["paths"].as_object().expect("paths").keys().any(|template| {
        let t: Vec<&str> = template.split('/').filter(|s| !s.is_empty()).collect();
        t.len() == segments.len()
            && t.iter().zip(&segments).all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
    })
}

fn parse_body(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {:?}", String::from_utf8_lossy(body)))
    }
}

fn call(node: &TestNode, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let r = node.gateway().request(method, path, bytes.as_deref()).expect("api port answers");
    (r.status, parse_body(&r.body))
}

/// Records where `value` breaks the success schema of `op`, or where its status is not the
/// documented success.
fn check_success(doc: &Value, op: &Op, answer: &(u16, Value), failures: &mut Vec<String>) {
    let (status, schema) = op.success(doc);
    if answer.0 != status {
        failures.push(format!("{}: answered {} instead of the documented {status}: {}", op.name(), answer.0, answer.1));
        return;
    }
    let mut errs = Vec::new();
    conforms(doc, schema, &answer.1, "$", &mut errs);
    failures.extend(errs.into_iter().map(|e| format!("{}: {status} answer: {e}", op.name())));
}

/// Records where an error answer is undocumented for `op`, not `expected`, or not the envelope.
fn check_error(doc: &Value, op: &Op, answer: &(u16, Value), expected: (u16, &str), failures: &mut Vec<String>) {
    let (status, body) = answer;
    if !op.documents(*status) {
        failures.push(format!("{}: answered the undocumented status {status}: {body}", op.name()));
        return;
    }
    if (*status, body["error"]["code"].as_str().unwrap_or("")) != expected {
        failures.push(format!("{}: expected {expected:?}, got {status} {body}", op.name()));
        return;
    }
    let mut errs = Vec::new();
    conforms(doc, op.response_schema(doc, *status), body, "$", &mut errs);
    failures.extend(errs.into_iter().map(|e| format!("{}: {status} answer: {e}", op.name())));
}

fn assert_none(failures: Vec<String>) {
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn document_is_well_formed() {
    let doc = doc();
    let mut failures = Vec::new();
    let version = doc["openapi"].as_str().unwrap_or("");
    if !version.starts_with("3.0.") {
        failures.push(format!("openapi is {version:?}, not 3.0.x"));
    }
    for key in ["title", "version", "description"] {
        if !doc["info"][key].is_string() {
            failures.push(format!("info.{key} is missing"));
        }
    }
    let mut all_refs = Vec::new();
    refs(&doc, &mut all_refs);
    for r in all_refs {
        match r.strip_prefix('#') {
            Some(pointer) if doc.pointer(pointer).is_some() => {}
            _ => failures.push(format!("$ref {r} does not resolve inside the document")),
        }
    }
    let bearer: BTreeSet<&str> = doc["components"]["securitySchemes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, s)| s["type"] == "http" && s["scheme"].as_str().is_some_and(|x| x.eq_ignore_ascii_case("bearer")))
        .map(|(name, _)| name.as_str())
        .collect();
    if bearer.is_empty() {
        failures.push("no http bearer security scheme".into());
    }
    let ops = operations(&doc);
    assert!(ops.len() >= 17, "only {} operations documented", ops.len());
    let mut ids = BTreeSet::new();
    for op in &ops {
        let name = op.name();
        match op.spec["operationId"].as_str() {
            Some(id) if ids.insert(id.to_owned()) => {}
            Some(id) => failures.push(format!("{name}: operationId {id} is not unique")),
            None => failures.push(format!("{name}: no operationId")),
        }
        for key in ["summary", "description"] {
            if op.spec[key].as_str().is_none_or(str::is_empty) {
                failures.push(format!("{name}: no {key}"));
            }
        }
        // Security: the operation's own, else the document's; it must require the bearer.
        let security = op.spec.get("security").unwrap_or(&doc["security"]);
        let requires_bearer = security.as_array().is_some_and(|reqs| {
            !reqs.is_empty()
                && reqs.iter().all(|r| r.as_object().is_some_and(|r| r.keys().any(|k| bearer.contains(k.as_str()))))
        });
        if !requires_bearer {
            failures.push(format!("{name}: does not require the bearer security"));
        }
        // Responses: one success, the errors every route can answer, all shaped as documented.
        if op.spec["responses"].as_object().is_none_or(|r| r.is_empty()) {
            failures.push(format!("{name}: no responses"));
            continue;
        }
        let statuses = op.statuses();
        if statuses.iter().filter(|s| (200..300).contains(*s)).count() != 1 {
            failures.push(format!("{name}: not exactly one documented success status: {statuses:?}"));
        }
        for must in [400, 401, 405] {
            if !statuses.contains(&must) {
                failures.push(format!("{name}: {must} is not documented"));
            }
        }
        for status in &statuses {
            let response = resolve(&doc, &op.spec["responses"][status.to_string()]);
            if !response["description"].is_string() {
                failures.push(format!("{name}: {status} has no description"));
            }
            let media = &response["content"]["application/json"];
            let schema = resolve(&doc, &media["schema"]);
            if !schema.is_object() {
                failures.push(format!("{name}: {status} has no application/json schema"));
                continue;
            }
            if *status >= 400 && schema != resolve(&doc, &json!({"$ref": "#/components/schemas/Error"})) {
                failures.push(format!("{name}: {status} is not the error envelope"));
            }
            if let Some(example) = media.get("example") {
                let mut errs = Vec::new();
                conforms(&doc, schema, example, "example", &mut errs);
                failures.extend(errs.into_iter().map(|e| format!("{name}: {status} {e}")));
            }
        }
        // Parameters: every `{name}` of the path declared, required, with an example.
        let in_path: BTreeSet<&str> =
            op.path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        let declared: BTreeSet<&str> =
            op.params.iter().filter(|p| p["in"] == "path").filter_map(|p| p["name"].as_str()).collect();
        if in_path != declared {
            failures.push(format!("{name}: path parameters {in_path:?} but declared {declared:?}"));
        }
        for p in &op.params {
            let pname = format!("{name} parameter {}", p["name"]);
            if p["in"] == "path" && (p["required"] != true || p.get("example").is_none()) {
                failures.push(format!("{pname}: a path parameter must be required and have an example"));
            }
            if let Some(example) = p.get("example") {
                let mut errs = Vec::new();
                conforms(&doc, &p["schema"], example, "example", &mut errs);
                failures.extend(errs.into_iter().map(|e| format!("{pname}: {e}")));
            }
        }
        // Request body: an example that conforms to its schema; 413 and 400 documented.
        if let Some(body) = op.spec.get("requestBody") {
            let media = &body["content"]["application/json"];
            match media.get("example") {
                Some(example) => {
                    let mut errs = Vec::new();
                    conforms(&doc, &media["schema"], example, "example", &mut errs);
                    failures.extend(errs.into_iter().map(|e| format!("{name}: request {e}")));
                }
                None => failures.push(format!("{name}: the request body has no example")),
            }
            if !statuses.contains(&413) {
                failures.push(format!("{name}: takes a body but 413 is not documented"));
            }
        }
    }
    // Every kind has its body schema under the `kind` discriminator.
    let content = &doc["components"]["schemas"]["MessageContent"];
    let mapping: BTreeSet<&str> =
        content["discriminator"]["mapping"].as_object().into_iter().flatten().map(|(k, _)| k.as_str()).collect();
    if content["discriminator"]["propertyName"] != "kind"
        || mapping != BTreeSet::from(["text", "image", "file", "voice", "custom"])
    {
        failures.push(format!("MessageContent is not discriminated by kind over the five kinds: {content}"));
    }
    assert_none(failures);
}

/// The schema checker itself: it must catch what it claims to catch.
#[test]
fn schema_checker_catches_violations() {
    let doc = doc();
    let schema = json!({"$ref": "#/components/schemas/SendMessageRequest"});
    let check = |v: Value| {
        let mut errs = Vec::new();
        conforms(&doc, &schema, &v, "$", &mut errs);
        errs
    };
    assert_eq!(check(json!({"from": "a", "to": "b", "kind": "text", "body": {"text": "hi"}})), Vec::<String>::new());
    assert!(!check(json!({"from": "a", "kind": "text", "body": {"text": "hi"}})).is_empty(), "required");
    assert!(!check(json!({"from": "a", "to": "b", "kind": "text", "body": {"text": 5}})).is_empty(), "type");
    assert!(!check(json!({"from": "a", "to": "b", "kind": "gif", "body": {}})).is_empty(), "oneOf");
    assert!(!check(json!({"from": "a", "to": "b", "kind": "voice", "body": {"url": "u"}})).is_empty(), "per kind");
    assert!(!check(json!({"from": "a", "to": "b", "kind": "text", "body": {"text": "a", "x": 1}})).is_empty());
    let page = json!({"$ref": "#/components/schemas/MemberPage"});
    let mut errs = Vec::new();
    conforms(&doc, &page, &json!({"members": ["a"], "next_cursor": null}), "$", &mut errs);
    conforms(&doc, &page, &json!({"members": ["a"], "next_cursor": "7"}), "$", &mut errs);
    assert_eq!(errs, Vec::<String>::new(), "nullable");
    conforms(&doc, &page, &json!({"members": [1], "next_cursor": 7}), "$", &mut errs);
    assert_eq!(errs.len(), 2, "{errs:?}");
}

/// Every documented route answers its example request with its documented success; without the
/// key with 401; with a method it does not document with 405; with broken JSON with 400; with a
/// body over the limit with 413.
#[test]
fn every_documented_route_answers_as_documented() {
    let doc = doc();
    let node = TestNode::start();
    let mut ops = operations(&doc);
    // Creations first (the group the other routes name), then reads, then deletions, the
    // group itself last.
    ops.sort_by_key(|o| {
        let rank = match (o.method.as_str(), o.path.as_str()) {
            ("POST", "/v1/groups") => 0,
            ("POST", _) => 1,
            ("DELETE", _) => 3,
            _ => 2,
        };
        (rank, std::cmp::Reverse(if rank == 3 { o.path.len() } else { 0 }))
    });
    assert_eq!(ops[0].id(), "createGroup");
    let mut failures = Vec::new();
    let mut path_values = BTreeMap::new();
    for op in &ops {
        // Success, with and without the example query parameters.
        let with_query: &[bool] = if op.params.iter().any(|p| p["in"] == "query") { &[false, true] } else { &[false] };
        for &q in with_query {
            let url = op.url(&path_values, q);
            let answer = call(&node, &op.method, &url, op.example_body());
            if matches!(answer.0, 404 | 405) || !op.documents(answer.0) {
                failures.push(format!("{}: {url} answered {} {}", op.name(), answer.0, answer.1));
                continue;
            }
            check_success(&doc, op, &answer, &mut failures);
            // A message id for the routes that name one.
            if op.id() == "sendGroupMessage" {
                if let Some(id) = answer.1["id"].as_str() {
                    path_values.insert("id".to_owned(), id.to_owned());
                }
            }
        }
        let url = op.url(&path_values, false);
        // Without the API key.
        let stranger = ether_sdk::GatewayClient::new(format!("http://{}", node.ports.api), "not-the-key");
        let bytes = op.example_body().map(|b| b.to_string().into_bytes());
        let r = stranger.request(&op.method, &url, bytes.as_deref()).expect("answer");
        check_error(&doc, op, &(r.status, parse_body(&r.body)), (401, "unauthorized"), &mut failures);
        // Broken JSON.
        if op.spec.get("requestBody").is_some() {
            let r = node.gateway().request(&op.method, &url, Some(b"{\"from\":")).expect("answer");
            check_error(&doc, op, &(r.status, parse_body(&r.body)), (400, "invalid_json"), &mut failures);
        }
        // Too large: refused from the Content-Length, before the body is read.
        if op.documents(413) {
            let head = format!(
                "{} {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                op.method,
                node.api_key,
                node.config.limits.http_body_bytes_max + 1
            );
            let mut s = std::net::TcpStream::connect(node.ports.api).expect("connect");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            s.write_all(head.as_bytes()).expect("write");
            let mut raw = Vec::new();
            let _ = s.read_to_end(&mut raw);
            let text = String::from_utf8_lossy(&raw);
            let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map_or(Value::Null, |(_, b)| parse_body(b.as_bytes()));
            check_error(&doc, op, &(status, body), (413, "payload_too_large"), &mut failures);
        }
    }
    // Methods a path does not document: 405, documented on every operation of that path.
    let by_path: BTreeMap<&str, Vec<&Op>> = ops.iter().fold(BTreeMap::new(), |mut m, o| {
        m.entry(o.path.as_str()).or_default().push(o);
        m
    });
    for (path, path_ops) in &by_path {
        let url = path_ops[0].url(&path_values, false);
        for method in ["GET", "POST", "PUT", "PATCH", "DELETE"] {
            if path_ops.iter().any(|o| o.method == method) {
                continue;
            }
            let answer = call(&node, method, &url, None);
            for op in path_ops {
                check_error(&doc, op, &answer, (405, "method_not_allowed"), &mut failures);
            }
            if answer.0 != 405 {
                failures.push(format!("{method} {path}: answered {} instead of 405", answer.0));
            }
        }
    }
    assert_none(failures);
}

/// The documented 400, 403, 404 and 409 answers happen where the document says.
#[test]
fn documented_errors_happen() {
    let doc = doc();
    let ops = operations(&doc);
    let node = TestNode::start();
    let mut failures = Vec::new();
    let create = op_by_id(&ops, "createGroup");
    let created = call(&node, "POST", "/v1/groups", create.example_body());
    check_success(&doc, create, &created, &mut failures);
    let gid = created.1["id"].as_str().expect("group id").to_owned();
    // 409: the same id again.
    let again = call(&node, "POST", "/v1/groups", create.example_body());
    check_error(&doc, create, &again, (409, "conflict"), &mut failures);
    // 404: every group route on a group that does not exist.
    let missing = BTreeMap::from([("gid".to_owned(), "no-such-group".to_owned()), ("id".to_owned(), "1".to_owned())]);
    for op in ops.iter().filter(|o| o.params.iter().any(|p| p["name"] == "gid")) {
        let answer = call(&node, &op.method, &op.url(&missing, false), op.example_body());
        check_error(&doc, op, &answer, (404, "not_found"), &mut failures);
    }
    let history = op_by_id(&ops, "userHistory");
    let answer = call(&node, "GET", "/v1/users/bob/messages?chat=g:no-such-group", None);
    check_error(&doc, history, &answer, (404, "not_found"), &mut failures);
    // 404: a message of another group (or none) has no read count here.
    let reads = op_by_id(&ops, "groupMessageReads");
    let answer = call(&node, "GET", &format!("/v1/groups/{gid}/messages/12345/reads"), None);
    check_error(&doc, reads, &answer, (404, "not_found"), &mut failures);
    // 400: a message id that is not one.
    let answer = call(&node, "GET", &format!("/v1/groups/{gid}/messages/x/reads"), None);
    check_error(&doc, reads, &answer, (400, "invalid_body"), &mut failures);
    // 403: a non-member sends to the group or reads it through their history. (A user the
    // node has never seen reads an empty page instead, as documented; make this one known.)
    let hello = json!({"from": "alice", "to": "stranger", "kind": "text", "body": {"text": "hi"}});
    check_success(
        &doc,
        op_by_id(&ops, "sendMessage"),
        &call(&node, "POST", "/v1/messages", Some(&hello)),
        &mut failures,
    );
    let send = op_by_id(&ops, "sendGroupMessage");
    let stranger_msg = json!({"from": "stranger", "kind": "text", "body": {"text": "let me in"}});
    let answer = call(&node, "POST", &format!("/v1/groups/{gid}/messages"), Some(&stranger_msg));
    check_error(&doc, send, &answer, (403, "forbidden"), &mut failures);
    let answer = call(&node, "GET", &format!("/v1/users/stranger/messages?chat=g:{gid}"), None);
    check_error(&doc, history, &answer, (403, "forbidden"), &mut failures);
    // 400 invalid_body: a bad id in the path, a bad query, a body of the wrong shape.
    let bad_id = BTreeMap::from([
        ("uid".to_owned(), "not%20an%20id".to_owned()),
        ("gid".to_owned(), "not%20an%20id".to_owned()),
        ("id".to_owned(), "x".to_owned()),
    ]);
    for op in ops.iter().filter(|o| o.params.iter().any(|p| p["in"] == "path")) {
        let answer = call(&node, &op.method, &op.url(&bad_id, false), op.example_body());
        check_error(&doc, op, &answer, (400, "invalid_body"), &mut failures);
    }
    for (id, url) in [
        ("userHistory", "/v1/users/bob/messages?limit=0".to_owned()),
        ("userHistory", "/v1/users/bob/messages?chat=bob".to_owned()),
        ("groupHistory", format!("/v1/groups/{gid}/messages?before_seq=-1")),
        ("listMembers", format!("/v1/groups/{gid}/members?limit=1001")),
    ] {
        let op = op_by_id(&ops, id);
        check_error(&doc, op, &call(&node, "GET", &url, None), (400, "invalid_body"), &mut failures);
    }
    for (id, url, body) in [
        ("sendMessage", "/v1/messages", json!({"from": "a", "to": "b", "kind": "voice", "body": {"url": "u"}})),
        (
            "sendMessage",
            "/v1/messages",
            json!({"from": "a", "to": "b", "kind": "text", "body": {"text": "x"}, "extra": 1}),
        ),
        ("sendBatch", "/v1/messages/batch", json!({"messages": vec![json!({}); 1001]})),
        ("broadcast", "/v1/broadcast", json!({"kind": "custom", "body": {}})),
        ("createToken", "/v1/tokens", json!({"user": "bob", "ttl_s": 0})),
        ("kickUser", "/v1/users/bob/kick", json!({"reason": "r".repeat(257)})),
        ("createGroup", "/v1/groups", json!({"name": "", "owner": "alice"})),
        ("sendGroupMessage", "/v1/groups/team/messages", json!({"kind": "text", "body": {"text": ""}})),
    ] {
        let op = op_by_id(&ops, id);
        check_error(&doc, op, &call(&node, "POST", url, Some(&body)), (400, "invalid_body"), &mut failures);
    }
    assert_none(failures);
}

/// The answers of the main calls, with real data in them (an online terminal, stored
/// messages, unread counts, a read position), carry every required property with its type;
/// idempotency and pagination behave as described.
#[test]
fn main_answers_match_their_schemas() {
    let doc = doc();
    let ops = operations(&doc);
    let node = TestNode::start();
    let mut failures = Vec::new();
    let mut check = |id: &str, method: &str, path: &str, body: Option<Value>| -> Value {
        let op = op_by_id(&ops, id);
        assert_eq!(op.method, method, "{id}");
        let answer = call(&node, method, path, body.as_ref());
        check_success(&doc, op, &answer, &mut failures);
        answer.1
    };
    let mut bob = node.terminal("bob", "phone");
    let msg = json!({"from": "alice", "to": "bob", "kind": "text", "body": {"text": "hello bob"}, "cid": "c-1"});
    let sent = check("sendMessage", "POST", "/v1/messages", Some(msg.clone()));
    let again = check("sendMessage", "POST", "/v1/messages", Some(msg));
    assert_eq!(sent, again, "a repeated cid answers the first result");
    assert_eq!(next_msg(&mut bob).id, sent["id"].as_str().unwrap());
    let batch = check(
        "sendBatch",
        "POST",
        "/v1/messages/batch",
        Some(json!({"messages": [
            {"from": "alice", "to": "bob", "kind": "image", "body": {"url": "https://x/y.png", "width": 4, "height": 3}},
            {"from": "alice", "to": "bob", "kind": "text", "body": {"text": ""}},
            {"from": "alice", "to": "bob", "kind": "voice", "body": {"url": "https://x/v", "duration_ms": 900}},
        ]})),
    );
    let results = batch["results"].as_array().expect("results");
    assert_eq!(results.len(), 3);
    assert!(
        results[0]["id"].is_string() && results[1]["error"]["code"] == "invalid_body" && results[2]["id"].is_string()
    );
    let presence = check("userPresence", "GET", "/v1/users/bob/presence", None);
    assert_eq!((presence["online"].as_bool(), presence["terminals"].as_array().map(Vec::len)), (Some(true), Some(1)));
    check("createToken", "POST", "/v1/tokens", Some(json!({"user": "bob", "ttl_s": 60, "device": "phone"})));
    check("broadcast", "POST", "/v1/broadcast", Some(json!({"kind": "custom", "body": {"data": null}})));
    let group = json!({"id": "crew", "name": "Crew", "owner": "alice", "members": ["bob", "cy", "dee"]});
    assert_eq!(check("createGroup", "POST", "/v1/groups", Some(group))["id"], "crew");
    let mut ids = Vec::new();
    for i in 0..3 {
        let text = json!({"from": "alice", "kind": "text", "body": {"text": format!("hi {i}")}});
        let sent = check("sendGroupMessage", "POST", "/v1/groups/crew/messages", Some(text));
        assert_eq!(sent["seq"].as_u64(), Some(i + 1));
        ids.push(sent["id"].as_str().expect("id").to_owned());
    }
    let g = check("getGroup", "GET", "/v1/groups/crew", None);
    assert_eq!((g["member_count"].as_u64(), g["seq"].as_u64()), (Some(4), Some(3)));
    // Members, page by page until `next_cursor` is null.
    let mut members = Vec::new();
    let mut url = "/v1/groups/crew/members?limit=3".to_owned();
    loop {
        let page = check("listMembers", "GET", &url, None);
        members.extend(page["members"].as_array().expect("members").iter().map(|m| m.to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => url = format!("/v1/groups/crew/members?limit=3&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(members.len(), 4);
    check("addMembers", "POST", "/v1/groups/crew/members", Some(json!({"members": ["eve"]})));
    check("userGroups", "GET", "/v1/users/bob/groups", None);
    // Bob reads the group up to seq 2, through his terminal.
    bob.send_frame(&ether_proto::ClientFrame::Read { chat: "g:crew".into(), seq: 2 }).expect("read");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let reads = check("groupMessageReads", "GET", &format!("/v1/groups/crew/messages/{}/reads", ids[1]), None);
    // Bob, carol and dave got it; eve was added after it was posted.
    assert_eq!((reads["read"].as_u64(), reads["members"].as_u64()), (Some(1), Some(3)));
    let unread = check("userUnread", "GET", "/v1/users/bob/unread", None);
    assert_eq!(unread["chats"]["g:crew"].as_u64(), Some(1), "{unread}");
    assert!(unread["chats"]["u:alice"].as_u64().is_some_and(|n| n >= 3), "{unread}");
    let history = check("userHistory", "GET", "/v1/users/bob/messages?chat=u:alice", None);
    let kinds: Vec<&str> =
        history["messages"].as_array().expect("messages").iter().filter_map(|m| m["kind"].as_str()).collect();
    assert_eq!(kinds, ["voice", "image", "text"], "newest first");
    // Pagination as documented: newest first, `before_seq` goes back, `after_seq` alone forward.
    let page = check("groupHistory", "GET", "/v1/groups/crew/messages?limit=2", None);
    let seqs = |p: &Value| -> Vec<u64> {
        p["messages"].as_array().expect("messages").iter().filter_map(|m| m["seq"].as_u64()).collect()
    };
    assert_eq!((seqs(&page), page["more"].as_bool()), (vec![3, 2], Some(true)));
    assert_eq!(page["scanned_to"].as_u64(), Some(2), "where the next page starts: {page}");
    let page = check("groupHistory", "GET", "/v1/groups/crew/messages?limit=2&before_seq=2", None);
    assert_eq!((seqs(&page), page["more"].as_bool()), (vec![1], Some(false)));
    let page = check("groupHistory", "GET", "/v1/groups/crew/messages?limit=2&after_seq=0", None);
    assert_eq!((seqs(&page), page["more"].as_bool()), (vec![1, 2], Some(true)));
    assert_eq!(page["scanned_to"].as_u64(), Some(2), "{page}");
    let page = check("groupHistory", "GET", "/v1/groups/crew/messages?limit=2&after_seq=2", None);
    assert_eq!((seqs(&page), page["more"].as_bool()), (vec![3], Some(false)));
    assert_eq!(check("kickUser", "POST", "/v1/users/bob/kick", None)["kicked"].as_u64(), Some(1));
    check("removeMember", "DELETE", "/v1/groups/crew/members/bob", None);
    check("dissolveGroup", "DELETE", "/v1/groups/crew", None);
    assert_none(failures);
}

/// Paths the document does not name answer 404 `not_found`, not 405: below every documented
/// path, beside them, and outside `/v1`.
#[test]
fn undocumented_paths_answer_404() {
    let doc = doc();
    let node = TestNode::start();
    call(&node, "POST", "/v1/groups", Some(&json!({"id": "team", "name": "Team", "owner": "alice"})));
    let ops = operations(&doc);
    let values = BTreeMap::from([("id".to_owned(), "1".to_owned())]);
    let mut candidates: BTreeSet<String> =
        ["/", "/v1", "/v2/messages", "/v1/nope", "/v1/users/bob", "/v1/users", "/v1/messages/x/y"]
            .map(String::from)
            .into();
    for op in &ops {
        candidates.insert(format!("{}/undocumented", op.url(&values, false)));
    }
    let mut failures = Vec::new();
    for path in candidates.iter().filter(|p| !documented(&doc, p)) {
        for method in ["GET", "POST", "DELETE"] {
            let (status, body) = call(&node, method, path, None);
            if (status, body["error"]["code"].as_str()) != (404, Some("not_found")) {
                failures.push(format!("{method} {path}: expected 404 not_found, got {status} {body}"));
            }
        }
    }
    assert_none(failures);
}
