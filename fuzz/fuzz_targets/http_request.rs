//! Whatever body a client posts to `/v1/chat/completions` or
//! `/v1/completions`, parsing and validating it gives a request or an
//! OpenAI error with a 4xx status: no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_gateway::api;

const LIMITS: api::Limits = api::Limits {
    context: 2048,
    vocab: 1000,
};

fuzz_target!(|data: &[u8]| {
    let d = api::Defaults::default();
    match api::parse_chat(data).and_then(|r| api::validate_chat(r, "m", &d, LIMITS)) {
        Ok(_) => {}
        Err(e) => assert!((400..500).contains(&e.status()), "{e:?} is not a 4xx"),
    }
    match api::parse_completion(data).and_then(|r| api::validate_completion(r, "m", &d, LIMITS)) {
        Ok(_) => {}
        Err(e) => assert!((400..500).contains(&e.status()), "{e:?} is not a 4xx"),
    }
});
