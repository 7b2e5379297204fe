//! The official `openai` Python client against `tandem serve`: chat,
//! completions, structured outputs (`parse` with a Pydantic model and a
//! JSON schema), tool calls and error classes, as its users write them
//! (`tests/clients/openai_flows.py`).
//!
//! The client runs from the interpreter in `TANDEM_OPENAI_PYTHON` (CI
//! makes a venv with `openai` and `pydantic` and sets it), else from
//! `python3` when it has both. Without either the test says so and
//! passes, unless `TANDEM_REQUIRE_OPENAI` is set (as in CI).

mod common;

use std::process::Command;

use common::*;

fn python() -> Option<String> {
    let candidates = std::env::var("TANDEM_OPENAI_PYTHON")
        .ok()
        .into_iter()
        .chain(["python3".to_string()]);
    for p in candidates {
        let ok = Command::new(&p)
            .args(["-c", "import openai, pydantic"])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(p);
        }
    }
    None
}

#[test]
fn the_openai_python_client_flows_work() {
    let Some(py) = python() else {
        assert!(
            std::env::var_os("TANDEM_REQUIRE_OPENAI").is_none(),
            "TANDEM_REQUIRE_OPENAI is set and no interpreter has openai and pydantic \
             (set TANDEM_OPENAI_PYTHON)"
        );
        eprintln!("no Python with openai and pydantic; skipping (set TANDEM_OPENAI_PYTHON)");
        return;
    };
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/openai_flows.py");
    let out = Command::new(&py)
        .args([script, &format!("http://127.0.0.1:{}/v1", c.port), MODEL])
        .output()
        .expect("the client runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all flows passed"), "{stdout}");
}
