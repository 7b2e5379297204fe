use super::*;
use tandem_model::Arch;

fn smollm() -> ModelConfig {
    ModelConfig {
        name: "smollm".into(),
        arch: Arch::Llama,
        n_layers: 30,
        hidden: 576,
        n_heads: 9,
        n_kv_heads: 3,
        head_dim: 64,
        intermediate: 1536,
        vocab_size: 49152,
        context_length: 8192,
        rope_theta: 100000.0,
        rms_eps: 1e-5,
        rope_neox: false,
        qkv_bias: false,
        qk_norm: false,
        moe: None,
    }
}

const GOOD: &str = r#"
[cluster]
name = "demo"
[gateway]
http = "127.0.0.1:8000"
quic = "127.0.0.1:7000"
[[prefill]]
name = "p0"
stages = [ { name = "s0", addr = "127.0.0.1:7101" }, { name = "s1", addr = "127.0.0.1:7102" } ]
[[decode]]
name = "d0"
addr = "127.0.0.1:7201"
tp = 3
"#;

/// GOOD with explicit layer ranges for its two stages (`None`: leave a stage without).
fn with_layers(s0: Option<[usize; 2]>, s1: Option<[usize; 2]>) -> String {
    let mut t = GOOD.to_string();
    for (addr, l) in [("127.0.0.1:7101", s0), ("127.0.0.1:7102", s1)] {
        if let Some([a, b]) = l {
            t = t.replace(
                &format!(r#"addr = "{addr}" }}"#),
                &format!(r#"addr = "{addr}", layers = [{a}, {b}] }}"#),
            );
        }
    }
    t
}

fn check(text: &str) -> std::result::Result<Cluster, String> {
    let p = Path::new("cluster.toml");
    ClusterFile::parse(text, p)
        .and_then(|f| f.validate(&smollm(), p))
        .map_err(|e| e.to_string())
}

#[test]
fn a_good_file_validates_and_splits_layers_evenly() {
    let c = check(GOOD).expect("valid");
    assert_eq!(
        c.pipelines[0]
            .stages
            .iter()
            .map(|s| s.2.clone())
            .collect::<Vec<_>>(),
        vec![0..15, 15..30]
    );
    assert_eq!(c.file.decode[0].max_batch, 32, "defaults are filled in");
    assert_eq!(c.file.transport.kind, TransportKind::Auto);
}

#[test]
fn mistakes_get_messages_that_say_what_to_change() {
    let cases: Vec<(String, &str)> = vec![
        (
            GOOD.replace("tp = 3", "tp = 2"),
            "tp = 2 does not divide the model's 3 KV heads; use one of [1, 3]",
        ),
        (
            GOOD.replace(r#"addr = "127.0.0.1:7102""#, r#"addr = "127.0.0.1:7101""#),
            "address 127.0.0.1:7101 is used twice",
        ),
        (
            GOOD.replace(r#"name = "s1""#, r#"name = "d0""#),
            "the name 'd0' is used twice",
        ),
        (
            with_layers(Some([0, 10]), Some([12, 30])),
            "layers 10..12 are missing",
        ),
        (
            with_layers(Some([0, 16]), Some([15, 30])),
            "layers 15..16 repeat",
        ),
        (
            with_layers(Some([0, 15]), Some([15, 28])),
            "28..30 are missing",
        ),
        (
            with_layers(Some([0, 15]), None),
            "for every stage or for none",
        ),
        (
            GOOD.replace(
                "[[decode]]\nname = \"d0\"\naddr = \"127.0.0.1:7201\"\ntp = 3\n",
                "",
            ),
            "no [[decode]] group",
        ),
        (
            GOOD.replace("tp = 3", "tp = 3\nkv_blocks = 0"),
            "kv_blocks must be at least 1",
        ),
        (
            GOOD.replace("name = \"demo\"", "name = \"demo\"\nkv_dtype = \"f8\""),
            "kv_dtype 'f8'",
        ),
        (
            GOOD.replace("tp = 3", "tp = 3\ncolour = \"blue\""),
            "unknown field `colour`",
        ),
        (
            GOOD.replace("127.0.0.1:8000", "not-an-address"),
            "is not host:port",
        ),
        (
            format!("{GOOD}\n[transport]\nkind = \"carrier-pigeon\"\n"),
            "carrier-pigeon",
        ),
        (
            format!("{GOOD}\n[transport]\nkind = \"ucx\"\n"),
            "no UCX transport yet",
        ),
    ];
    for (text, want) in cases {
        let err = check(&text)
            .err()
            .unwrap_or_else(|| panic!("should fail with {want:?}"));
        assert!(err.contains(want), "expected {want:?} in: {err}");
    }
}
