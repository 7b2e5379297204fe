//! `tandem generate` as a user runs it: streaming text, layouts, sampling
//! flags, stop strings, and clear errors for bad input.

use std::process::Command;

fn tandem(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["--threads", "2"])
        .args(args)
        .output()
        .expect("tandem runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const Q: &str = "What is the capital of France?";

#[test]
fn composed_layouts_print_the_same_text() {
    let (ok, base, err) = tandem(&["generate", "--chat", Q, "--max-tokens", "24"]);
    assert!(ok, "{err}");
    assert!(
        base.contains("Paris") || base.contains("France"),
        "a relevant answer: {base:?}"
    );
    for layout in [["--pp", "3", "--tp", "1"], ["--pp", "2", "--tp", "3"]] {
        let mut args = vec!["generate", "--chat", Q, "--max-tokens", "24"];
        args.extend(layout);
        let (ok, text, err) = tandem(&args);
        assert!(ok, "{err}");
        assert_eq!(text, base, "{layout:?}");
    }
}

#[test]
fn stop_strings_and_token_limits_end_the_text() {
    let (ok, full, err) = tandem(&["generate", "--chat", Q, "--max-tokens", "40"]);
    assert!(ok, "{err}");
    // Stop at a word from the middle of the free-running answer.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 4, "{full:?}");
    let stop = words[words.len() / 2];
    let (ok, text, err) = tandem(&[
        "generate",
        "--chat",
        Q,
        "--max-tokens",
        "40",
        "--stop",
        stop,
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        text,
        format!(
            "{}\n",
            &full[..full.find(stop).expect("stop word is in the text")]
        ),
        "text ends right before {stop:?}"
    );
    let (ok, text, err) = tandem(&["generate", "--chat", Q, "--max-tokens", "3", "--verbose"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("finish: Length") && err.contains("3 tokens generated"),
        "{err}"
    );
    assert!(!text.trim().is_empty());
}

#[test]
fn a_seed_repeats_a_sampled_answer() {
    let args = [
        "generate",
        "--chat",
        "Tell me a story.",
        "--max-tokens",
        "20",
        "--temperature",
        "0.9",
        "--top-k",
        "40",
        "--top-p",
        "0.95",
        "--seed",
        "7",
    ];
    let (ok, a, err) = tandem(&args);
    assert!(ok, "{err}");
    let (_, b, _) = tandem(&args);
    assert_eq!(a, b);
    let mut other = args.to_vec();
    let last = other.len() - 1;
    other[last] = "8";
    let (_, c, _) = tandem(&other);
    assert_ne!(a, c, "another seed samples another answer");
}

#[test]
fn bad_input_gets_a_clear_message() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["generate", "--chat", "hi", "--tp", "2"],
            "valid values: [1, 3]",
        ),
        (&["generate", "--chat", "hi", "--pp", "31"], "30 layers"),
        (
            &["generate", "--chat", "hi", "--temperature=-1"],
            "temperature must be >= 0",
        ),
        (
            &["generate", "--chat", "hi", "--kv-dtype", "int3"],
            "--kv-dtype",
        ),
        (
            &[
                "generate",
                "--model",
                "/nonexistent/model.gguf",
                "--chat",
                "hi",
            ],
            "/nonexistent/model.gguf",
        ),
        (&["generate"], "--prompt"),
    ];
    for (args, want) in cases {
        let (ok, _, err) = tandem(args);
        assert!(!ok, "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn half_precision_kv_and_small_blocks_work() {
    let (ok, text, err) = tandem(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--kv-dtype",
        "bf16",
        "--block-size",
        "4",
    ]);
    assert!(ok, "{err}");
    assert!(text.contains("Paris"), "{text:?}");
}

/// `--device cuda` where there is no driver or GPU (CI never has one) ends
/// with a message naming what is missing, not a panic; and the emulated
/// GPU path prints what the CPU prints.
#[test]
fn a_gpu_device_without_a_gpu_is_a_clear_error_and_the_emulated_gpu_answers_like_the_cpu() {
    let has_driver = std::path::Path::new("/proc/driver/nvidia").exists();
    if !has_driver {
        let (ok, _, err) = tandem(&[
            "generate",
            "--chat",
            Q,
            "--max-tokens",
            "4",
            "--device",
            "cuda",
        ]);
        assert!(!ok, "generating on a missing GPU succeeded");
        assert!(err.contains("error: GPU:"), "{err}");
        assert!(
            err.contains("driver") || err.contains("no GPU") || err.contains("libcuda"),
            "{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let (ok, _, err) = tandem(&["generate", "--chat", Q, "--device", "tpu"]);
    assert!(!ok && err.contains("unknown device"), "{err}");
    let (ok, cpu, err) = tandem(&[
        "generate",
        "--chat",
        Q,
        "--max-tokens",
        "6",
        "--gpu-dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    let (ok, emu, err) = tandem(&[
        "generate",
        "--chat",
        Q,
        "--max-tokens",
        "6",
        "--device",
        "emu",
        "--gpu-dtype",
        "f32",
    ]);
    assert!(ok, "{err}");
    assert_eq!(emu, cpu);
}
