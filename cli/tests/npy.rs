//! `.npy` files: round trips of every dtype, headers as NumPy writes them (versions 1.0, 2.0
//! and 3.0), a typed error naming the file for each way a file can be wrong, and activation
//! folders of `.npy` files.

mod common;

use common::{f32_bytes, handmade_npy as handmade};
use rotq_cli::activations::{read_activations, write_npy_folder};
use rotq_cli::eval::Synthetic;
use rotq_cli::npy::{encode, parse, read3, write, NpyDtype, NpyError};
use rotq_cli::Error;
use std::path::Path;

#[test]
fn every_dtype_round_trips() {
    let values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) * 0.3).collect();
    for dtype in [NpyDtype::F32, NpyDtype::F16, NpyDtype::F64] {
        let bytes = encode(&[2, 3, 4], &values, dtype).unwrap();
        assert_eq!(
            (bytes.len() - 24 * dtype.size()) % 64,
            0,
            "{dtype}: aligned header"
        );
        let a = parse(&bytes).unwrap();
        assert_eq!((a.shape.as_slice(), a.dtype), (&[2usize, 3, 4][..], dtype));
        let want: Vec<f32> = match dtype {
            NpyDtype::F16 => values
                .iter()
                .map(|v| half::f16::from_f32(*v).to_f32())
                .collect(),
            _ => values.clone(),
        };
        assert_eq!(a.data, want, "{dtype}");
    }
    // 1-D and 0-D shapes as NumPy writes them.
    let a = parse(&encode(&[3], &[1.0, 2.0, 3.0], NpyDtype::F32).unwrap()).unwrap();
    assert_eq!(a.shape, vec![3]);
    let a = parse(&encode(&[], &[7.0], NpyDtype::F32).unwrap()).unwrap();
    assert_eq!((a.shape.len(), a.data[0]), (0, 7.0));
}

#[test]
fn headers_as_numpy_writes_them_parse() {
    let v = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    for major in [1, 2, 3] {
        let file = handmade(
            major,
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            &v,
        );
        let a = parse(&file).unwrap();
        assert_eq!((a.shape, a.data[5]), (vec![2, 3], 6.0), "version {major}");
    }
    // Keys in another order, double quotes, Python 2's long suffix, no trailing comma.
    let file = handmade(
        1,
        "{\"shape\": (2L, 3L), \"fortran_order\": False, \"descr\": \"<f4\"}",
        &v,
    );
    assert_eq!(parse(&file).unwrap().shape, vec![2, 3]);
}

/// Writes `bytes` as `name` in `dir` and returns the error `read3` gives, checking it names the
/// file.
fn read_error(dir: &Path, name: &str, bytes: &[u8]) -> NpyError {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    match read3(&path) {
        Err(Error::Npy { path: p, source }) => {
            assert_eq!(p, path);
            let message = Error::Npy {
                path: p,
                source: source.clone(),
            }
            .to_string();
            assert!(message.contains(name), "{message}");
            source
        }
        other => panic!("{name}: {other:?}"),
    }
}

#[test]
fn bad_files_are_typed_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = encode(&[2, 1, 4], &[0.5; 8], NpyDtype::F32).unwrap();
    let header = good.len() - 32;

    assert_eq!(
        read_error(d, "zip.npy", b"PK\x03\x04...."),
        NpyError::NotNpy
    );
    assert!(matches!(
        read_error(d, "short-header.npy", &good[..header - 5]),
        NpyError::Truncated { .. }
    ));
    match read_error(d, "short-values.npy", &good[..good.len() - 1]) {
        NpyError::Truncated { needed, found, .. } => {
            assert_eq!((needed, found), (good.len(), good.len() - 1))
        }
        e => panic!("{e:?}"),
    }
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4]);
    assert!(matches!(
        read_error(d, "long.npy", &long),
        NpyError::ShapeMismatch {
            expected: 32,
            found: 36,
            ..
        }
    ));
    for (name, descr) in [("int.npy", "<i4"), ("big.npy", ">f4"), ("byte.npy", "|u1")] {
        let file = handmade(
            1,
            &format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 1, 4), }}"),
            &[0; 32],
        );
        assert_eq!(
            read_error(d, name, &file),
            NpyError::UnsupportedDtype(descr.into())
        );
    }
    let record = handmade(
        1,
        "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2, 1, 4), }",
        &[0; 32],
    );
    assert!(matches!(
        read_error(d, "record.npy", &record),
        NpyError::UnsupportedDtype(_)
    ));
    let fortran = handmade(
        1,
        "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 1, 4), }",
        &[0; 32],
    );
    assert_eq!(
        read_error(d, "fortran.npy", &fortran),
        NpyError::FortranOrder
    );
    let flat = encode(&[8], &[0.5; 8], NpyDtype::F32).unwrap();
    assert_eq!(
        read_error(d, "flat.npy", &flat),
        NpyError::Rank {
            shape: vec![8],
            want: 3
        }
    );
    let no_shape = handmade(1, "{'descr': '<f4', 'fortran_order': False, }", &[]);
    assert!(matches!(
        read_error(d, "no-shape.npy", &no_shape),
        NpyError::BadHeader(_)
    ));
    let mut v4 = good.clone();
    v4[6] = 4;
    assert_eq!(
        read_error(d, "v4.npy", &v4),
        NpyError::UnsupportedVersion { major: 4, minor: 0 }
    );
    // A header length far beyond the file.
    let mut huge = good.clone();
    huge[8] = 0xff;
    huge[9] = 0xff;
    assert!(matches!(
        read_error(d, "huge.npy", &huge),
        NpyError::Truncated { .. }
    ));
    // Nothing written for data that does not fit its shape.
    assert!(write(&d.join("w.npy"), &[3, 1, 1], &[1.0], NpyDtype::F32).is_err());
    assert!(!d.join("w.npy").exists());
}

fn layer(seed: u64) -> rotq_cli::eval::Activations {
    Synthetic {
        n_kv: 40,
        n_q: 3,
        h_kv: 2,
        group: 2,
        d: 32,
        seed,
        ..Default::default()
    }
    .generate()
}

#[test]
fn activation_folders_read_back_and_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let layers = [layer(1), layer(2)];
    write_npy_folder(dir.path(), &layers, "layers.{layer}.{t}", NpyDtype::F32).unwrap();
    let read = read_activations(dir.path(), "layers.{layer}.{t}").unwrap();
    assert_eq!(read.len(), 2);
    for (a, b) in layers.iter().zip(&read) {
        assert_eq!((&a.q, &a.k, &a.v), (&b.q, &b.k, &b.v));
        assert_eq!(b.params.pos_offset, 37);
    }
    // Nested folders through the template.
    let nested = dir.path().join("nested");
    write_npy_folder(&nested, &layers[..1], "{layer}/{t}", NpyDtype::F16).unwrap();
    assert_eq!(read_activations(&nested, "{layer}/{t}").unwrap().len(), 1);

    // A layer missing one file.
    std::fs::remove_file(dir.path().join("layers.1.v.npy")).unwrap();
    let e = read_activations(dir.path(), "layers.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.1.v.npy"), "{e}");
    // K of another head dimension than Q: the message names the files.
    let k = dir.path().join("layers.0.k.npy");
    write(&k, &[40, 2, 64], &vec![0.5; 40 * 2 * 64], NpyDtype::F32).unwrap();
    let e = read_activations(dir.path(), "layers.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("do not fit") && e.contains("layers.0.k.npy"),
        "{e}"
    );
    // A corrupt file: the error is the file's.
    std::fs::write(&k, b"\x93NUMPY\x01\x00").unwrap();
    let e = read_activations(dir.path(), "layers.{layer}.{t}").unwrap_err();
    assert!(
        matches!(&e, Error::Npy { path, source: NpyError::Truncated { .. } } if path == &k),
        "{e}"
    );
    // An empty folder.
    let empty = tempfile::tempdir().unwrap();
    let e = read_activations(empty.path(), "layers.{layer}.{t}")
        .unwrap_err()
        .to_string();
    assert!(e.contains("layers.0.q.npy"), "{e}");
}

/// Parses `bytes` on another thread and returns its result; a parse still running after a
/// minute fails the test (a guard against a parser that backtracks exponentially, not a
/// timing assertion: a correct parser answers in microseconds).
fn parse_guarded(bytes: Vec<u8>) -> Result<rotq_cli::npy::NpyArray, NpyError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(parse(&bytes)));
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the parser did not finish a 200-byte header")
}

#[test]
fn deeply_nested_headers_are_refused_without_backtracking() {
    // A PEG grammar for Python literals without memoization (the one the `.npy` crates use)
    // parses each nesting level twice: 22 levels took 26 s, 64 would take millennia.
    let depth = 64;
    let open = |c: &str| c.repeat(depth);
    let cases = [
        format!(
            "{{'descr': {}{}, 'fortran_order': False, 'shape': (2,), }}",
            open("["),
            open("]")
        ),
        format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': {}2{}, }}",
            open("("),
            open(",)")
        ),
        format!(
            "{{'descr': '<f4', 'fortran_order': {}1{}, 'shape': (2,), }}",
            open("{1: "),
            open("}")
        ),
    ];
    for (i, header) in cases.iter().enumerate() {
        let e = parse_guarded(handmade(1, header, &f32_bytes(&[1.0, 2.0]))).unwrap_err();
        match i {
            0 => assert!(matches!(e, NpyError::UnsupportedDtype(_)), "{e:?}"),
            _ => assert!(matches!(e, NpyError::BadHeader(_)), "{i}: {e:?}"),
        }
    }
}

#[test]
fn absurd_shapes_are_refused_before_allocating() {
    let header = |shape: &str| {
        handmade(
            2,
            &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"),
            &f32_bytes(&[1.0; 4]),
        )
    };
    // Element counts that overflow: typed errors, never a panic (not even with overflow checks).
    for shape in [
        "(4294967296, 4294967296, 2)",
        "(18446744073709551616,)",
        "(4611686018427387904,)",
    ] {
        match parse(&header(shape)) {
            Err(NpyError::BadHeader(m)) => assert!(
                m.contains("overflow") || m.contains("dimension"),
                "{shape}: {m}"
            ),
            other => panic!("{shape}: {other:?}"),
        }
    }
    // A count that fits but is far beyond the file: truncated, checked before any value is read.
    match parse(&header("(1000000000, 1000, 64)")) {
        Err(NpyError::Truncated { needed, found, .. }) => {
            assert_eq!(needed, 128 + 4 * 64_000_000_000_000);
            assert_eq!(found, 128 + 16);
        }
        other => panic!("{other:?}"),
    }
}
