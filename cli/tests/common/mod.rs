//! What the CLI's test files share: running the built `rotq`, reading what it printed, the
//! one-line error checks, raw f32 bytes, and `prlimit` for the memory and CPU-time limits.

// Each test file uses some of these, none uses all.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Runs the built `rotq` with `args`.
pub fn rotq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rotq"))
        .args(args)
        .output()
        .expect("the rotq binary runs")
}

/// Runs rotq and asserts that it succeeded.
pub fn rotq_ok(args: &[&str]) -> Output {
    let out = rotq(args);
    assert_ok(&out, &format!("{args:?}"));
    out
}

/// Runs rotq with `stdin` as its standard input; returns its output.
pub fn rotq_with_stdin(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rotq"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the rotq binary runs");
    let mut pipe = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // A thread writes while the output is read: neither pipe can fill up and block.
    let writer = std::thread::spawn(move || {
        // rotq may stop reading early (an error); a broken pipe is then expected.
        let _ = pipe.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

/// A path as an argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// What rotq printed on standard error.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn assert_ok(out: &Output, what: &str) {
    assert!(out.status.success(), "{what}: {}", stderr(out));
}

/// A failure with one line on stderr that starts with `error` (rotq's own errors, exit status
/// 1, and clap's, exit status 2).
pub fn assert_one_line_error(out: &Output, what: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{what}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
    assert!(err.starts_with("error"), "{what}: {err}");
}

/// A failure of rotq's own: exit status 1, one line on stderr that starts with `error: ` (not a
/// panic, not an abort, not a usage error).
pub fn assert_one_line_failure(out: &Output, what: &str) {
    assert_one_line_error(out, what);
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {err}");
    assert!(err.starts_with("error: "), "{what}: {err}");
}

/// Values as raw little-endian f32 bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Raw little-endian f32 bytes as values.
pub fn from_f32_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A `.npy` file with a hand-written header, as NumPy writes it (version `major`.0, padded to 64).
pub fn handmade_npy(major: u8, header: &str, values: &[u8]) -> Vec<u8> {
    let len_bytes = if major == 1 { 2 } else { 4 };
    let mut h = header.to_string();
    let unpadded = 6 + 2 + len_bytes + h.len() + 1;
    h.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    h.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(values);
    out
}

/// `prlimit` (util-linux), if this machine has it.
pub fn prlimit() -> Option<&'static str> {
    let ok = Command::new("prlimit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("prlimit")
}

/// A small synthetic layer for the eval tests: 96 cached tokens, 4 queries, 2 KV heads of 64
/// values with 2 query heads each, from `seed`.
pub fn small_layer(seed: u64) -> rotq_cli::eval::Activations {
    rotq_cli::eval::Synthetic {
        n_kv: 96,
        n_q: 4,
        h_kv: 2,
        group: 2,
        d: 64,
        seed,
        ..Default::default()
    }
    .generate()
}
