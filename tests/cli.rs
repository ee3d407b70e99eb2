//! The command line as operators use it: the node's settings belong to the node alone.

use std::process::Command;

#[test]
fn doctor_ignores_the_nodes_settings_in_the_environment() {
    let output = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
        // A token whose payload is {"sub":"u"}: the doctor reads `sub` without verifying.
        .args(["doctor", "http://127.0.0.1:9/events", "--token", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln"])
        .env("SSE_LISTEN", "garbage")
        .env("SSE_HEARTBEAT_INTERVAL", "not-a-duration")
        .output()
        .expect("run sse-fanout doctor");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Before, clap refused `SSE_LISTEN` here ("invalid value 'garbage' for '--listen'").
    assert!(!stderr.contains("invalid value") && !stderr.contains("Usage:"), "stderr: {stderr}");
    // Nothing listens on port 9: the doctor itself ran, and failed to reach it.
    assert!(!output.status.success(), "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn the_node_still_reads_its_settings_without_a_subcommand() {
    let output = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
        .env_clear()
        .env("SSE_LISTEN", "garbage")
        .output()
        .expect("run sse-fanout");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "a bad setting is a usage error: {stderr}");
    assert!(stderr.contains("--listen") || stderr.contains("SSE_LISTEN"), "the error names the setting: {stderr}");
}

#[test]
fn a_key_file_that_cannot_be_read_or_used_is_a_usage_error() {
    let dir = std::env::temp_dir().join(format!("sse-fanout-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let not_a_key = dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "-----BEGIN NOTHING-----\n").expect("write");
    let missing = dir.join("missing.pem");
    for (path, says) in [(&missing, "cannot read"), (&not_a_key, "not an RSA or EC")] {
        let output = Command::new(env!("CARGO_BIN_EXE_sse-fanout"))
            .env_clear()
            .env("SSE_LISTEN", "127.0.0.1:0")
            .env("SSE_JWT_PUBLIC_KEY", path)
            .output()
            .expect("run sse-fanout");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{}: a bad key is a usage error: {stderr}", path.display());
        assert!(stderr.contains("SSE_JWT_PUBLIC_KEY") && stderr.contains(says), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
