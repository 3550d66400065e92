//! The file commands stream: bounded memory whatever the file size, `-` for standard input and
//! output, outputs that are the input refused, devices and FIFOs written directly (never
//! replaced), sizes checked before reading, and errors that name the user's paths. `eval`
//! refuses sizes it cannot hold before allocating them.

mod common;

use common::{
    assert_ok, assert_one_line_failure, f32_bytes, from_f32_bytes, prlimit, rotq, rotq_with_stdin,
    s, stderr,
};
use rotq::{KvFormat, RotationSpec};
use rotq_testkit::data::Rows;
use std::path::Path;
use std::process::{Command, Stdio};

/// The files in `dir`, by name (to see that nothing, not even a temporary, was left).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// What `rotq rotate` must write: every row rotated in f64, rounded to f32.
fn rotated(values: &[f32], spec: RotationSpec, dim: usize, inverse: bool) -> Vec<f32> {
    let rotation = spec.build(dim).unwrap().unwrap();
    let mut data: Vec<f64> = values.iter().map(|v| f64::from(*v)).collect();
    rotation.rotate_rows(&mut data, inverse).unwrap();
    data.iter().map(|v| *v as f32).collect()
}

/// Files of several 4 MiB chunks, whose rows do not line up with the chunks (96 values), give
/// the bytes of the whole-buffer conversion, for every format and through `-` both ways.
#[test]
fn large_files_and_standard_streams_give_the_whole_buffer_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("input");
    let (dim, rows) = (96, 30_001); // 11.5 MB: three chunks and a bit
    let values = Rows::stress().f32s(dim * rows, 21);
    std::fs::write(&x, f32_bytes(&values)).unwrap();
    for format in KvFormat::ALL {
        let q = dir.path().join(format!("x.{format}"));
        if format.check_row_len(dim).is_err() {
            // vLLM's keys take powers of two: refused before anything is written.
            let a = ["quantize", "--format", format.name(), "--row-len", "96"];
            let out = rotq(&[&a[..], &["--input", s(&x), "--output", s(&q)]].concat());
            assert!(!out.status.success() && !q.exists(), "{format}");
            continue;
        }
        let want = format.quantize_rows(&values, dim).unwrap();
        let args = |input: &str, output: &str| {
            let v = ["quantize", "--format", format.name(), "--row-len", "96"];
            let mut v: Vec<String> = v.iter().map(|a| a.to_string()).collect();
            v.extend([
                "--input".into(),
                input.into(),
                "--output".into(),
                output.into(),
            ]);
            v
        };
        let run = |a: Vec<String>, stdin: Option<&[u8]>| {
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            match stdin {
                Some(bytes) => rotq_with_stdin(&a, bytes),
                None => rotq(&a),
            }
        };
        let out = run(args(s(&x), s(&q)), None);
        assert_ok(&out, format.name());
        assert!(std::fs::read(&q).unwrap() == want, "{format}: file to file");
        let out = run(args("-", "-"), Some(&f32_bytes(&values)));
        assert_ok(&out, format.name());
        assert!(out.stdout == want, "{format}: standard input to output");
        assert!(stderr(&out).contains("standard output"), "{}", stderr(&out));
        // Back through dequantize, standard input to a file.
        let y = dir.path().join(format!("y.{format}"));
        let a = ["dequantize", "--format", format.name(), "--row-len", "96"];
        let out = rotq_with_stdin(
            &[&a[..], &["--input", "-", "--output", s(&y)]].concat(),
            &want,
        );
        assert_ok(&out, format.name());
        // Bit for bit (a QJL row whose norm overflows f16 decodes to NaN).
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let back = from_f32_bytes(&std::fs::read(&y).unwrap());
        assert!(
            bits(&back) == bits(&format.dequantize_rows(&want, dim).unwrap()),
            "{format}: dequantize"
        );
    }
    for (rotation, spec) in [
        ("randomized:7", RotationSpec::Randomized(7)),
        ("block:32", RotationSpec::Block(32)),
    ] {
        for inverse in [false, true] {
            let mut a = vec!["rotate", "--rotation", rotation, "--dim", "96"];
            if inverse {
                a.push("--inverse");
            }
            let out = rotq(&[&a[..], &["--input", s(&x), "--output", "-"]].concat());
            assert_ok(&out, rotation);
            let want = rotated(&values, spec, dim, inverse);
            assert!(from_f32_bytes(&out.stdout) == want, "{rotation} {inverse}");
        }
    }
}

/// The input itself, by whatever path, is refused with a one-line error and left as it was:
/// the same path, `./x`, an absolute path through `..`, a symlink, a hard link, and standard
/// output appended to the input or standard input read from the output.
#[test]
fn an_output_that_is_the_input_is_refused_and_the_input_kept() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    let original = f32_bytes(&Rows::outliers().f32s(32 * 4, 3));
    std::fs::write(&x, &original).unwrap();
    let mut others = vec![
        x.clone(),
        dir.path().join(".").join("x.f32"),
        dir.path()
            .join("..")
            .join(dir.path().file_name().unwrap())
            .join("x.f32"),
    ];
    #[cfg(unix)]
    {
        let link = dir.path().join("link.f32");
        std::os::unix::fs::symlink("x.f32", &link).unwrap();
        others.push(link);
    }
    let hard = dir.path().join("hard.f32");
    if std::fs::hard_link(&x, &hard).is_ok() {
        others.push(hard);
    }
    let before = names(dir.path());
    let commands = [
        vec!["quantize", "--format", "q8_0", "--row-len", "32"],
        vec!["dequantize", "--format", "f32", "--row-len", "32"],
        vec!["rotate", "--rotation", "hadamard", "--dim", "32"],
    ];
    for command in &commands {
        for other in &others {
            let args = [&command[..], &["--input", s(&x), "--output", s(other)]].concat();
            let out = rotq(&args);
            assert_one_line_failure(&out, &format!("{args:?}"));
            assert!(stderr(&out).contains("same file"), "{}", stderr(&out));
            assert!(stderr(&out).contains(s(other)), "{}", stderr(&out));
            // And the other way round: the other path as input, `x` as output.
            let args = [&command[..], &["--input", s(other), "--output", s(&x)]].concat();
            assert_one_line_failure(&rotq(&args), &format!("{args:?}"));
            assert_eq!(std::fs::read(&x).unwrap(), original, "{args:?}");
            assert_eq!(names(dir.path()), before, "{args:?}");
        }
        // Standard output appended to the input.
        let append = std::fs::OpenOptions::new().append(true).open(&x).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_rotq"))
            .args([&command[..], &["--input", s(&x), "--output", "-"]].concat())
            .stdout(append)
            .output()
            .unwrap();
        assert_one_line_failure(&out, "standard output appended to the input");
        // Standard input read from the output.
        let out = Command::new(env!("CARGO_BIN_EXE_rotq"))
            .args([&command[..], &["--input", "-", "--output", s(&x)]].concat())
            .stdin(std::fs::File::open(&x).unwrap())
            .output()
            .unwrap();
        assert_one_line_failure(&out, "standard input read from the output");
        assert_eq!(std::fs::read(&x).unwrap(), original, "{command:?}");
        assert_eq!(names(dir.path()), before, "{command:?}");
    }
}

/// A character device (a copy of `/dev/null`) and a FIFO are written directly: the right bytes
/// arrive, and they stay what they were (never replaced by a regular file). A folder is refused.
#[cfg(unix)]
#[test]
fn devices_and_fifos_are_written_directly_and_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    let values = Rows::outliers().f32s(64 * 8, 4);
    std::fs::write(&x, f32_bytes(&values)).unwrap();
    let quantize = |output: &Path| {
        let a = [
            "quantize",
            "--format",
            "q4_0",
            "--row-len",
            "64",
            "--input",
            s(&x),
        ];
        rotq(&[&a[..], &["--output", s(output)]].concat())
    };
    match null_device(dir.path()) {
        Ok(null) => {
            assert_ok(&quantize(&null), &null.display().to_string());
            let m = std::fs::symlink_metadata(&null).unwrap();
            assert!(
                m.file_type().is_char_device(),
                "{} was replaced",
                null.display()
            );
        }
        Err(why) => eprintln!("skipped the character device: {why}"),
    }
    let fifo = dir.path().join("fifo");
    match Command::new("mkfifo").arg(&fifo).status() {
        Ok(st) if st.success() => {
            // The reader opens the FIFO while rotq writes into it.
            let reader = {
                let fifo = fifo.clone();
                std::thread::spawn(move || std::fs::read(fifo).unwrap())
            };
            assert_ok(&quantize(&fifo), "FIFO");
            let got = reader.join().unwrap();
            assert!(
                got == KvFormat::Q4_0.quantize_rows(&values, 64).unwrap(),
                "FIFO bytes"
            );
            let m = std::fs::symlink_metadata(&fifo).unwrap();
            assert!(m.file_type().is_fifo(), "the FIFO was replaced");
        }
        _ => eprintln!("skipped the FIFO: no mkfifo here"),
    }
    let out = quantize(dir.path());
    assert_one_line_failure(&out, "a folder");
    assert!(stderr(&out).contains("folder"), "{}", stderr(&out));
}

/// A character device that discards what is written, safe to write through the CLI: a private
/// copy of `/dev/null` (device 1, 3) in `dir` where this process may make one (as root), so
/// that a regression that replaces its output replaces the copy, not the system's `/dev/null`;
/// else `/dev/null` itself, when this process cannot create files in `/dev` (a regression
/// then fails to create its temporary there instead of replacing `/dev/null`).
#[cfg(unix)]
fn null_device(dir: &Path) -> Result<std::path::PathBuf, String> {
    let copy = dir.join("null");
    let made = Command::new("mknod")
        .arg(&copy)
        .args(["c", "1", "3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if made && std::fs::OpenOptions::new().write(true).open(&copy).is_ok() {
        return Ok(copy);
    }
    let _ = std::fs::remove_file(&copy);
    if tempfile::tempfile_in("/dev").is_ok() {
        return Err("/dev is writable here and no private device could be made".into());
    }
    match std::fs::metadata("/dev/null") {
        Ok(_) => Ok("/dev/null".into()),
        Err(e) => Err(format!("no /dev/null ({e})")),
    }
}

/// Input that is not whole rows: from a file, refused before anything is read (the file is
/// 1 TiB and sparse, and rotq runs under a CPU-time limit of a few seconds that reading it
/// would exceed); from standard input, found at the end: a file output is not written (no
/// temporary left either), and standard output is reported incomplete.
#[test]
fn input_that_is_not_whole_rows_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (big, out_path) = (dir.path().join("big.f32"), dir.path().join("out"));
    let file = std::fs::File::create(&big).unwrap();
    let size = (1u64 << 40) + 4;
    match (file.set_len(size), prlimit()) {
        (Ok(()), Some(prlimit)) => {
            let out = Command::new(prlimit)
                .args(["--cpu=5", "--", env!("CARGO_BIN_EXE_rotq"), "quantize"])
                .args(["--format", "q8_0", "--row-len", "32", "--input", s(&big)])
                .args(["--output", s(&out_path)])
                .output()
                .unwrap();
            assert_one_line_failure(&out, "1 TiB + 4 bytes");
            let err = stderr(&out);
            assert!(
                err.contains(&format!("{size} bytes are not a whole")),
                "{err}"
            );
        }
        (Err(e), _) => eprintln!("skipped the 1 TiB file: {e}"),
        (_, None) => eprintln!("skipped the 1 TiB file: no prlimit here"),
    }
    drop(file);
    std::fs::remove_file(&big).unwrap();
    // 100 rows of 32 values and 3 values more, through standard input.
    let partial = f32_bytes(&Rows::uniform(2.0).f32s(32 * 100 + 3, 5));
    let q = [
        "quantize",
        "--format",
        "q8_0",
        "--row-len",
        "32",
        "--input",
        "-",
    ];
    let out = rotq_with_stdin(&[&q[..], &["--output", s(&out_path)]].concat(), &partial);
    assert_one_line_failure(&out, "standard input to a file");
    assert!(stderr(&out).contains("standard input"), "{}", stderr(&out));
    assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    let out = rotq_with_stdin(&[&q[..], &["--output", "-"]].concat(), &partial);
    assert_one_line_failure(&out, "standard input to standard output");
    assert!(stderr(&out).contains("incomplete"), "{}", stderr(&out));
    // Nothing at all on standard input: no rows.
    let out = rotq_with_stdin(&[&q[..], &["--output", "-"]].concat(), &[]);
    assert_one_line_failure(&out, "empty standard input");
}

/// A 3 GiB input quantizes within a 128 MiB address-space limit: memory does not grow with
/// the input. The input is seeded values (never zeros), generated chunk by chunk into rotq's
/// standard input while its standard output is read back: the output has the size of every
/// row quantized, and sampled chunks (the first two, one in the middle, the last) are the
/// oracle's bytes for the same values. Standard error has the summary line only (no progress
/// bar when it is not a terminal).
#[test]
fn a_multi_gib_input_quantizes_in_bounded_memory() {
    use std::io::{Read, Write};
    let Some(prlimit) = prlimit() else {
        eprintln!("skipped: no prlimit here");
        return;
    };
    let format = KvFormat::Q4_0;
    // 768 chunks of 4 MiB of f32 values: 3 GiB, written as they are drawn.
    let (chunk_values, chunks) = (1usize << 20, 768u64);
    let values = move |c: u64| Rows::outliers().f32s(chunk_values, 1000 + c);
    let size = chunks * chunk_values as u64 * 4;
    let limit = 128u64 << 20;
    let mut child = Command::new(prlimit)
        .arg(format!("--as={limit}"))
        .args(["--", env!("CARGO_BIN_EXE_rotq"), "quantize", "--format"])
        .args([
            format.name(),
            "--row-len",
            "128",
            "--input",
            "-",
            "--output",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for c in 0..chunks {
            // rotq stopping early is reported below by its status.
            if stdin.write_all(&f32_bytes(&values(c))).is_err() {
                return;
            }
        }
    });
    let mut stderr_pipe = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        stderr_pipe.read_to_string(&mut text).unwrap();
        text
    });
    // The output, chunk by chunk (each input chunk is whole rows, so whole output blocks).
    let mut stdout = child.stdout.take().unwrap();
    let chunk_out = chunk_values / 128 * format.row_bytes(128).unwrap();
    let (mut buf, mut total) = (vec![0u8; chunk_out], 0u64);
    let sampled = [0, 1, chunks / 2, chunks - 1];
    for c in 0..chunks {
        if stdout.read_exact(&mut buf).is_err() {
            break;
        }
        total += chunk_out as u64;
        if sampled.contains(&c) {
            let want = format.quantize_rows(&values(c), 128).unwrap();
            assert!(buf == want, "chunk {c} differs from the oracle's bytes");
        }
    }
    total += stdout.read_to_end(&mut Vec::new()).unwrap() as u64;
    writer.join().unwrap();
    let status = child.wait().unwrap();
    let err = errors.join().unwrap();
    assert!(
        status.success(),
        "3 GiB under a 128 MiB address-space limit: {err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    let rows = size / (128 * 4);
    assert_eq!(total, rows * 4 * 18);
    assert!(err.contains(&format!("quantized {rows} rows")), "{err}");
}

/// A failure after bytes went to standard output or a FIFO (here: the reader goes away after
/// a few bytes, so a write mid-stream fails) is a one-line error that says the output is
/// incomplete; the bytes that did arrive are the right ones.
#[cfg(unix)]
#[test]
fn a_failure_mid_stream_says_a_direct_output_is_incomplete() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    // 12 MB: three chunks of input, 3.2 MB of output, far more than a pipe holds.
    let values = Rows::outliers().f32s(32 * 100_000, 8);
    std::fs::write(&x, f32_bytes(&values)).unwrap();
    let want = KvFormat::Q8_0.quantize_rows(&values, 32).unwrap();
    let args = |output: &str| {
        let a = ["quantize", "--format", "q8_0", "--row-len", "32"];
        let mut v: Vec<String> = a.iter().map(|a| a.to_string()).collect();
        v.extend([
            "--input".into(),
            s(&x).into(),
            "--output".into(),
            output.into(),
        ]);
        v
    };
    // Reads the first 1000 bytes of `from`, then closes it.
    let read_prefix = |mut from: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut prefix = vec![0u8; 1000];
            from.read_exact(&mut prefix).unwrap();
            prefix
        })
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_rotq"))
        .args(args("-"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let reader = read_prefix(Box::new(child.stdout.take().unwrap()));
    let prefix = reader.join().unwrap();
    let out = child.wait_with_output().unwrap();
    assert_one_line_failure(&out, "standard output closed early");
    let err = stderr(&out);
    assert!(
        err.contains("what was written to standard output is incomplete"),
        "{err}"
    );
    assert!(
        prefix == want[..1000],
        "the bytes written before the failure"
    );

    let fifo = dir.path().join("fifo");
    match Command::new("mkfifo").arg(&fifo).status() {
        Ok(st) if st.success() => {
            let opened = {
                let fifo = fifo.clone();
                std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
            };
            let child = Command::new(env!("CARGO_BIN_EXE_rotq"))
                .args(args(s(&fifo)))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let reader = read_prefix(Box::new(opened.join().unwrap()));
            let prefix = reader.join().unwrap();
            let out = child.wait_with_output().unwrap();
            assert_one_line_failure(&out, "a FIFO closed early");
            let err = stderr(&out);
            let note = format!("what was written to {} is incomplete", s(&fifo));
            assert!(err.contains(&note), "{err}");
            assert!(
                prefix == want[..1000],
                "the bytes written before the failure"
            );
        }
        _ => eprintln!("skipped the FIFO: no mkfifo here"),
    }
}

/// A new output file gets the permissions `File::create` would give it, 0666 less the umask
/// (0600 under umask 077, 0664 under 002); a file that is replaced keeps its permissions.
#[cfg(unix)]
#[test]
fn outputs_honour_the_umask_and_keep_replaced_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    std::fs::write(&x, f32_bytes(&Rows::outliers().f32s(32 * 4, 9))).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    // rotq in a child process with `umask` set by the shell that execs it.
    let quantize_with_umask = |umask: &str, output: &Path| {
        let out = Command::new("sh")
            .args(["-c", &format!("umask {umask} && exec \"$0\" \"$@\"")])
            .arg(env!("CARGO_BIN_EXE_rotq"))
            .args(["quantize", "--format", "q8_0", "--row-len", "32"])
            .args(["--input", s(&x), "--output", s(output)])
            .output()
            .unwrap();
        assert_ok(&out, &format!("umask {umask}"));
    };
    for (umask, want) in [("077", "600"), ("002", "664"), ("022", "644")] {
        let new = dir.path().join(format!("new-{umask}"));
        quantize_with_umask(umask, &new);
        assert_eq!(
            format!("{:o}", mode(&new)),
            want,
            "a new file under umask {umask}"
        );
    }
    let replaced = dir.path().join("replaced");
    std::fs::write(&replaced, b"old").unwrap();
    std::fs::set_permissions(&replaced, std::fs::Permissions::from_mode(0o640)).unwrap();
    quantize_with_umask("077", &replaced);
    assert_eq!(format!("{:o}", mode(&replaced)), "640", "a replaced file");
    assert_ne!(std::fs::read(&replaced).unwrap(), b"old");
}

/// Errors name the paths the user gave, never rotq's temporary files.
#[test]
fn errors_name_the_users_paths() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("x.f32");
    std::fs::write(&x, f32_bytes(&Rows::uniform(1.0).f32s(64, 6))).unwrap();
    let nowhere = dir.path().join("no").join("such").join("out.bin");
    let a = [
        "quantize",
        "--format",
        "q8_0",
        "--row-len",
        "32",
        "--input",
        s(&x),
    ];
    let out = rotq(&[&a[..], &["--output", s(&nowhere)]].concat());
    assert_one_line_failure(&out, "an output in a missing folder");
    let err = stderr(&out);
    assert!(err.contains(s(&nowhere)), "{err}");
    assert!(!err.contains(".rotq-"), "{err}");
    let out = rotq(
        &["quantize", "--format", "q8_0", "--row-len", "32"]
            .into_iter()
            .chain(["--input", s(dir.path()), "--output", "-"])
            .collect::<Vec<_>>(),
    );
    assert_one_line_failure(&out, "a folder as input");
}

/// `eval --synthetic` with more tokens than memory can hold (or than 64 bits can count) is a
/// one-line error naming the memory needed, before anything is allocated (not a panic or an
/// allocation abort).
#[test]
fn eval_refuses_sizes_it_cannot_hold() {
    for (tokens, needs) in [("18446744073709551615", "EiB"), ("100000000", "TiB")] {
        let out = rotq(&["eval", "--synthetic", "--tokens", tokens]);
        assert_one_line_failure(&out, tokens);
        let err = stderr(&out);
        assert!(err.contains(needs) && err.contains("memory"), "{err}");
        assert!(err.contains(&format!("--tokens {tokens}")), "{err}");
    }
}
