//! KV over UCX between real processes: the transfer itself (two processes,
//! TCP and shared memory, bytes checked), the whole cluster (same greedy
//! text as over QUIC), corruption caught by the checksum and retried, and
//! what happens when the library is missing.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap_or("")
}

#[test]
fn two_processes_move_kv_blocks_over_tcp_and_shared_memory_and_the_bytes_match() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // `bench kv` fails if the receiving process's bytes differ from what was sent.
    let out = Command::new(EXE)
        .args([
            "bench",
            "kv",
            "--transports",
            "tcp,sm,quic",
            "--tokens",
            "64,300",
            "--chunk",
            "64",
        ])
        .args(["--iters", "2", "--rounds", "1", "--no-perftest"])
        .output()
        .expect("bench kv runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "tcp put, 1 block each 64",
        "tcp am, 1 block/message 300",
        "tcp am, 64-token chunks 300",
        "tcp am, 1 block/msg, peer-failure 300",
        "tcp am, 64-token chunks, peer-failure 64",
        "sm write into the mapped pool, 1 block each 300",
        "sm put, 1 block each 300",
        "sm am, 64-token chunks 300",
        "sm am, 1 block/message 64",
        "quic link 300",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn the_cluster_over_ucx_answers_exactly_as_over_quic() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let want = generate(LONG, 30);
    // Two stages and three ranks: each block lands as several runs per rank.
    // Over UCX on one host the stages write decode's pools themselves
    // (shared memory); with `UCX_TLS=tcp` they send active messages.
    for (t, tls, path) in [
        ("ucx", None, "ucx-direct"),
        ("ucx", Some("tcp"), "ucx-am"),
        ("quic", None, "quic"),
    ] {
        match tls {
            Some(v) => std::env::set_var("UCX_TLS", v),
            None => std::env::remove_var("UCX_TLS"),
        }
        let c = Cluster::start(&["--kv-transport", t, "--pp", "2", "--tp", "3"]);
        std::env::remove_var("UCX_TLS");
        for _ in 0..2 {
            let (status, v) = c.chat(&greedy(LONG, 30));
            assert_eq!(status, 200, "{v}");
            assert_eq!(content(&v), want, "over {t}");
            assert!(v["tandem"]["kv_bytes"].as_u64().unwrap_or(0) > 0, "{v}");
            // The second request is a prefix-cache hit on decode: nothing moves.
            if v["tandem"]["prefilled_tokens"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(v["tandem"]["kv_transport"], t, "{v}");
            }
        }
        // Right the first time: no transfer was refused and retried (a
        // retry would hide a transport that lands bytes late or wrong).
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert_eq!(c.metric("tandem_kv_retries", "d0"), Some(0.0), "over {t}");
        assert_eq!(
            c.metric("tandem_kv_checksum_failures", "d0"),
            Some(0.0),
            "over {t}"
        );
        // Every block took the path this link should.
        for p in ["quic", "ucx-direct", "ucx-am"] {
            let n = c
                .metric(
                    "tandem_kv_blocks_landed",
                    &format!("node=\"d0\",path=\"{p}\""),
                )
                .unwrap_or(-1.0);
            if p == path {
                assert!(n > 0.0, "over {t} {tls:?}: {n} blocks by {p}");
            } else {
                assert_eq!(n, 0.0, "over {t} {tls:?}: blocks by {p}");
            }
        }
    }
}

#[test]
fn corrupted_kv_is_caught_by_the_checksum_and_prefilled_again() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let want = generate(LONG, 20);
    for t in ["ucx", "quic"] {
        std::env::set_var("TANDEM_FAULT_CORRUPT_KV", "1");
        let c = Cluster::start(&["--kv-transport", t]);
        std::env::remove_var("TANDEM_FAULT_CORRUPT_KV");
        let (status, v) = c.chat(&greedy(LONG, 20));
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            content(&v),
            want,
            "over {t}: the client sees the correct text"
        );
        // The gateway learns the count from the next heartbeat.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let failures = loop {
            let f = c.metric("tandem_kv_checksum_failures", "d0").unwrap_or(0.0);
            if f >= 1.0 || std::time::Instant::now() > deadline {
                break f;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert!(
            failures >= 1.0,
            "over {t}: {failures} checksum failures counted"
        );
        // The failed attempt's blocks come back once its stage confirmed it
        // stopped writing them (over UCX's shared memory the stage put into
        // them).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let used = loop {
            let u = c.metric("tandem_kv_blocks_used", "d0").unwrap_or(-1.0);
            if u == 0.0 || std::time::Instant::now() > deadline {
                break u;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        assert_eq!(used, 0.0, "over {t}: blocks still held after the answer");
        // Freed by the stage's confirmation (time frees nothing).
        assert_eq!(
            c.metric("tandem_kv_blocks_quarantined", "d0"),
            Some(0.0),
            "over {t}"
        );
        assert_eq!(
            c.metric("tandem_kv_quarantined_attempts", "d0"),
            Some(0.0),
            "over {t}"
        );
    }
}

#[test]
fn without_the_library_auto_falls_back_to_quic_and_ucx_refuses_to_start() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("TANDEM_UCX_LIB", "/nonexistent/libucp.so.0");
    let c = Cluster::start(&["--kv-transport", "auto"]);
    let (status, v) = c.chat(&greedy(SHORT, 8));
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tandem"]["kv_transport"], "quic", "{v}");
    drop(c);
    let out = Command::new(EXE)
        .args([
            "serve",
            "--port",
            "0",
            "--kv-transport",
            "ucx",
            "--local-prefill-max",
            "0",
        ])
        .output()
        .expect("serve runs");
    std::env::remove_var("TANDEM_UCX_LIB");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve must not start: {err}");
    assert!(
        err.contains("kv_transport is \"ucx\"") && err.contains("/nonexistent/libucp.so.0"),
        "a clear error: {err}"
    );
}
