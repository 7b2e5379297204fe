//! Each role on its own host: `deploy/netns/cluster.sh` gives every node a
//! network namespace and address on a bridge and starts it with the per-role
//! scripts. A chat goes through the gateway; then the decode node's host is
//! cut off, and the gateway must answer 503 promptly instead of hanging.
//! Needs root and `ip netns`; without them the test says so and returns.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const EXE: &str = env!("CARGO_BIN_EXE_tandem");
const SUBNET: &str = "10.77.0";

fn script(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/netns/cluster.sh"
        ))
        .args(args)
        .env("TANDEM_BIN", EXE)
        .env("DIR", dir)
        .env("SUBNET", SUBNET)
        .env("PP", "2")
        .env("TP", "3")
        .env("TANDEM_THREADS", "1")
        .output()
        .expect("bash runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn post(path: &str, body: &Value, timeout: Duration) -> std::io::Result<(u16, String)> {
    let addr = format!("{SUBNET}.1:8000").parse().expect("addr");
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let b = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )?;
    let mut r = String::new();
    s.read_to_string(&mut r)?;
    let (head, body) = r.split_once("\r\n\r\n").unwrap_or((&r, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_string()))
}

fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return false;
    }
    let probe = "tdm-probe";
    let ok = Command::new("ip")
        .args(["netns", "add", probe])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", probe]).status();
    }
    ok
}

#[test]
fn each_role_on_its_own_host_and_a_lost_decode_host_gives_503() {
    if !netns_available() {
        eprintln!("SKIPPED: needs root and `ip netns` to give each node its own host");
        return;
    }
    let dir = std::env::temp_dir().join(format!("tandem-netns-test-{}", std::process::id()));
    let (ok, out) = script(&["up"], &dir);
    if !ok {
        let _ = script(&["down"], &dir);
        panic!("cluster.sh up failed:\n{out}");
    }
    let result = std::panic::catch_unwind(|| {
        let q = "What is the capital of France?";
        let want = Command::new(EXE)
            .args([
                "generate",
                "--chat",
                q,
                "--max-tokens",
                "24",
                "--chunk",
                "256",
            ])
            .output()
            .expect("generate");
        let want = String::from_utf8(want.stdout).expect("utf-8");
        let body = json!({
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": q}],
            "temperature": 0,
            "max_tokens": 24,
        });
        let (status, text) =
            post("/v1/chat/completions", &body, Duration::from_secs(120)).expect("chat");
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(
            v["choices"][0]["message"]["content"]
                .as_str()
                .map(|s| format!("{s}\n")),
            Some(want)
        );
        // Every node answered from its own address.
        let health = Command::new("curl")
            .args(["-s", &format!("http://{SUBNET}.1:8000/health")])
            .output()
            .expect("curl");
        let health: Value = serde_json::from_slice(&health.stdout).expect("health JSON");
        assert_eq!(
            health["nodes"].as_array().map(Vec::len),
            Some(3),
            "{health}"
        );

        let (ok, out) = script(&["stop-host", "d0"], &dir);
        assert!(ok, "{out}");
        let cut = Instant::now();
        // Requests keep getting an answer (never a hang) and turn into 503s
        // once the loss is noticed.
        let mut first_503 = None;
        while cut.elapsed() < Duration::from_secs(15) {
            let t = Instant::now();
            let (status, text) = post("/v1/chat/completions", &body, Duration::from_secs(10))
                .expect("an answer, not a hang");
            assert!(t.elapsed() < Duration::from_secs(10));
            if status == 503 {
                let v: Value = serde_json::from_str(&text).expect("JSON");
                assert_eq!(v["error"]["code"], json!("no_live_node"), "{v}");
                first_503 = Some(cut.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let detected = first_503.expect("503 within 15 s of losing the decode host");
        eprintln!("decode host lost: the gateway answered 503 after {detected:?}");
    });
    let (ok, out) = script(&["down"], &dir);
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(ok, "cluster.sh down failed:\n{out}");
}
