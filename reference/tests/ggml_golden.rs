//! The oracle's ggml formats reproduce the C reference quantizers byte for byte, and the C
//! dequantizers value for value (see tests/data/ggml/README.md for where the bytes came from).

use rotq_reference::KvFormat;
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    std::env::var_os("ROTQ_GOLDEN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/ggml"),
        PathBuf::from,
    )
}

fn read_f32(path: &PathBuf) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const GOLDEN: [KvFormat; 7] = [
    KvFormat::Q8_0,
    KvFormat::Q4_0,
    KvFormat::Q4_1,
    KvFormat::Q5_0,
    KvFormat::Q5_1,
    KvFormat::Iq4Nl,
    KvFormat::Q6_0,
];

#[test]
fn quantized_bytes_equal_the_c_reference() {
    let dir = data_dir();
    let input = read_f32(&dir.join("input.f32"));
    assert!(
        input.len() >= 128 * 90,
        "the golden input is unexpectedly small"
    );
    for format in GOLDEN {
        let expected = std::fs::read(dir.join(format!("{format}.bin"))).unwrap();
        let ours = format.quantize_row(&input).unwrap();
        assert_eq!(ours.len(), expected.len(), "{format}: length");
        let bb = format.block_bytes();
        for (i, (a, b)) in ours.chunks(bb).zip(expected.chunks(bb)).enumerate() {
            assert_eq!(
                a,
                b,
                "{format}: block {i} differs; input {:?}",
                &input[i * 32..i * 32 + 32]
            );
        }
    }
}

#[test]
fn dequantized_values_equal_the_c_reference() {
    let dir = data_dir();
    for format in GOLDEN {
        let bytes = std::fs::read(dir.join(format!("{format}.bin"))).unwrap();
        let expected = read_f32(&dir.join(format!("{format}.deq.f32")));
        let ours = format.dequantize_row(&bytes).unwrap();
        assert_eq!(ours.len(), expected.len());
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{format}: value {i}: ours {a:e}, C {b:e}"
            );
        }
    }
}

/// Hand-checked blocks that pin the rules the golden file exercises in bulk.
#[test]
fn known_blocks() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let zeros = [0.0f32; 32];
    // All-zero blocks: d = −0.0 (0x8000) for the max/−k formats, +0 for the others; iq4_nl
    // stores code 8 (the codebook value nearest 0).
    assert_eq!(
        KvFormat::Q4_0.quantize_row(&zeros).unwrap(),
        hex("008088888888888888888888888888888888")
    );
    assert_eq!(KvFormat::Q8_0.quantize_row(&zeros).unwrap(), vec![0u8; 34]);
    assert_eq!(
        KvFormat::Iq4Nl.quantize_row(&zeros).unwrap(),
        hex("000088888888888888888888888888888888")
    );
    assert_eq!(
        KvFormat::Q6_0.quantize_row(&zeros).unwrap(),
        hex("0080aaaaaaaaaaaaaaaa00000000000000000000000000000000")
    );
    // One negative outlier among 0.5s.
    let mut outlier = [0.5f32; 32];
    outlier[5] = -3.0;
    assert_eq!(
        KvFormat::Q4_0.quantize_row(&outlier).unwrap(),
        hex("003699999999999099999999999999999999")
    );
    assert_eq!(
        KvFormat::Q6_0.quantize_row(&outlier).unwrap(),
        hex("022eaaaaaaaaaaa8aaaa55555555555055555555555555555555")
    );
    assert_eq!(
        KvFormat::Iq4Nl.quantize_row(&outlier).unwrap(),
        hex("c4a666666666666f66666666666666666666")
    );
    // A ramp −2 … 1.875 in steps of 1/8.
    let ramp: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.125).collect();
    assert_eq!(
        KvFormat::Q8_0.quantize_row(&ramp).unwrap(),
        hex("082481899199a1a9b1b9c0c8d0d8e0e8f0f8000810182028303840474f575f676f77")
    );
    assert_eq!(
        KvFormat::Q5_1.quantize_row(&ramp).unwrap(),
        hex("003000c00000ffff00112233445566778899aabbccddeeff")
    );
}
