//! Fuzzes the sans-IO request parser: it must never panic, `check` and `parse` must agree,
//! a parsed request must parse again identically from exactly its own bytes, and pipelined
//! parsing must always make progress; `parse_head` sees the same head as `parse` (with no
//! body) and sees one whenever `check` says only the body is missing.
#![no_main]

use ether_http::{check, error_response, parse, parse_head, Limits, Progress};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::default(), Limits::test_min()] {
        let mut rest = data;
        // bounded: every successful parse consumes at least one byte
        while !rest.is_empty() {
            let checked = check(rest, &limits);
            match parse(rest, &limits) {
                Ok(Some((req, used))) => {
                    assert!(used > 0 && used <= rest.len());
                    assert_eq!(checked, Ok(Progress::Complete { total: used }));
                    let head = parse_head(rest, &limits).expect("a parsed request has a head").expect("complete");
                    assert_eq!((&head.method, &head.path, &head.query), (&req.method, &req.path, &req.query));
                    assert!(head.headers().eq(req.headers()) && head.body.is_empty());
                    let again = parse(&rest[..used], &limits);
                    assert_eq!(again, Ok(Some((req.clone(), used))));
                    assert!(req.body.len() <= limits.body_bytes_max);
                    let _ = req.path_segments().count();
                    let _ = req.query_param("a");
                    let _ = req.bearer_token();
                    let _ = req.is_websocket_upgrade();
                    rest = &rest[used..];
                }
                Ok(None) => {
                    assert!(matches!(
                        checked,
                        Ok(Progress::NeedHead | Progress::NeedBody { .. })
                    ));
                    if let Ok(Progress::NeedBody { .. }) = checked {
                        // only bad target escapes stop a head `check` accepted
                        assert!(!matches!(parse_head(rest, &limits), Ok(None)));
                    }
                    break;
                }
                Err(e) => {
                    // target escapes are the only error parse finds beyond check
                    assert!(checked.is_err() || matches!(e, ether_http::HttpError::Malformed(_)));
                    let mut out = Vec::new();
                    error_response(&e).encode_into(false, &mut out);
                    break;
                }
            }
        }
    }
});
