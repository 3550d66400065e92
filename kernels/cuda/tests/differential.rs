//! The CUDA kernels against the oracle. Every test needs a GPU; where there is none each
//! prints `skipped: no CUDA device` and passes.

mod common;

use common::{device, download, upload, Elem, ROWS};
use half::{bf16, f16};
use proptest::prelude::*;
use rotq_cuda::{CacheTarget, CudaCodec, CudaError, CudaRotation, Device, RowConfig};
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::{KvFormat, Rotation};
use rotq_testkit::oracle::assert_matches;
use rotq_testkit::rotations::RotationKind;

/// The GPU rotation of `rows` rows (forward, then inverse) against the oracle.
fn check_rotation<T: Elem>(dev: &Device, r: &Rotation, rows: usize, cfg: RowConfig, seed: u64) {
    let n = r.dim();
    let x = ROWS.f32s(rows * n, seed);
    // The oracle rotates exactly what the GPU holds (the input rounded to T).
    let held: Vec<f64> = x
        .iter()
        .map(|&v| f64::from(T::from_f32(v).to_f32()))
        .collect();
    let mut want = held.clone();
    r.rotate_rows(&mut want, false).unwrap();
    let rot = CudaRotation::new(dev, r).unwrap().with_config(cfg);
    let mut buf = upload::<T>(dev, &x);
    rot.forward(dev, &mut buf).unwrap();
    let got: Vec<f64> = download(dev, &buf).into_iter().map(f64::from).collect();
    let what = format!(
        "forward {r} n={n} rows={rows} {cfg:?} {}",
        std::any::type_name::<T>()
    );
    assert_matches(&got, &want, Op::Rotation, T::PRECISION, &what);
    rot.inverse(dev, &mut buf).unwrap();
    let back: Vec<f64> = download(dev, &buf).into_iter().map(f64::from).collect();
    // Two roundings of T on the way: twice the tolerance.
    let tol = tolerance(Op::Rotation, T::PRECISION);
    let tol2 = rotq_reference::tolerance::Tolerance {
        rel_l2: 2.0 * tol.rel_l2,
        max_abs: 2.0 * tol.max_abs,
    };
    if let Err(m) = tol2.check(&back, &held) {
        panic!("inverse {r:?} n={n} rows={rows} {cfg:?}: {m}");
    }
}

/// Every supported length: powers of two to 2^15, and m·2^k.
fn sizes() -> Vec<usize> {
    let mut v: Vec<usize> = (1..=15).map(|k| 1 << k).collect();
    for m in [12, 20, 28, 40] {
        for k in [0, 1, 3, 5, 7] {
            v.push(m << k);
        }
    }
    // m·2^k large enough for the exchange across warps and the base mixing together.
    v.extend([12 << 9, 20 << 8]);
    v
}

#[test]
fn every_size_rotates_like_the_oracle() {
    let Some(dev) = device() else { return };
    for (i, n) in sizes().into_iter().enumerate() {
        let r = Rotation::hadamard(n).unwrap();
        check_rotation::<f32>(dev, &r, 5, RowConfig::default(), i as u64);
    }
}

#[test]
fn block_and_randomized_rotations() {
    let Some(dev) = device() else { return };
    for (n, b) in [(128, 16), (4096, 64), (256, 256), (96, 32)] {
        check_rotation::<f32>(
            dev,
            &Rotation::block_hadamard(n, b).unwrap(),
            7,
            RowConfig::default(),
            1,
        );
    }
    for n in [64, 128, 4096, 160, 32768] {
        check_rotation::<f16>(
            dev,
            &Rotation::randomized(n, 9).unwrap(),
            3,
            RowConfig::default(),
            2,
        );
    }
}

/// Explicit matrices (a randomized Hadamard written out, so not symmetric: a transposed read
/// shows), forward and inverse, rows of f32, f16 and bf16.
#[test]
fn explicit_matrix_rotations() {
    let Some(dev) = device() else { return };
    for (i, n) in [64usize, 96, 128, 160, 256].into_iter().enumerate() {
        let r = RotationKind::Matrix.build(n, i as u64).unwrap();
        check_rotation::<f32>(dev, &r, 5, RowConfig::default(), i as u64);
        check_rotation::<f16>(dev, &r, 3, RowConfig::default(), i as u64 + 10);
        check_rotation::<bf16>(dev, &r, 2, RowConfig::default(), i as u64 + 20);
    }
}

/// Fused rotate-quantize writes exactly the oracle's quantizer applied to the kernel's own
/// rotated values (the f32 rotation kernel on the same input), for every format.
fn check_quantize(dev: &Device, format: KvFormat, n: usize, r: Option<&Rotation>, seed: u64) {
    check_quantize_with::<f16>(dev, format, n, r, RowConfig::codec_default(), seed);
}

/// [`check_quantize`] for input rows of `T` and a given configuration.
fn check_quantize_with<T: Elem>(
    dev: &Device,
    format: KvFormat,
    n: usize,
    r: Option<&Rotation>,
    cfg: RowConfig,
    seed: u64,
) {
    let (tokens, heads) = (5usize, 3usize);
    let rows = tokens * heads;
    let x = ROWS.f32s(rows * n, seed);
    let codec = CudaCodec::new(dev, format, n, r).unwrap().with_config(cfg);
    let rb = codec.row_bytes();
    let start = 2usize;
    let mut cache = dev
        .stream()
        .alloc_zeros::<u8>((start + tokens + 1) * heads * rb)
        .unwrap();
    let input = upload::<T>(dev, &x);
    codec
        .quantize(
            dev,
            &input,
            &mut cache,
            CacheTarget::contiguous(heads, start),
        )
        .unwrap();
    let got = dev.stream().clone_dtoh(&cache).unwrap();
    // The kernel's rotated values: the input as T holds it, widened, rotated by the f32 kernel.
    let widened: Vec<f32> = x.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let rotated = match r {
        Some(r) => {
            let mut buf = dev.stream().clone_htod(&widened).unwrap();
            CudaRotation::new(dev, r)
                .unwrap()
                .forward(dev, &mut buf)
                .unwrap();
            dev.stream().clone_dtoh(&buf).unwrap()
        }
        None => widened,
    };
    let mut want = vec![0u8; got.len()];
    want[start * heads * rb..(start + tokens) * heads * rb]
        .copy_from_slice(&format.quantize_rows(&rotated, n).unwrap());
    assert!(
        got == want,
        "{format} n={n} rotation={r:?} {cfg:?}: first difference at byte {:?}",
        got.iter().zip(&want).position(|(a, b)| a != b)
    );
    // And the round trip: dequantize with the inverse rotation ≈ the input, within the
    // format's bound (checked loosely: relative L2 below the format's typical error).
    let cache_rows = dev
        .stream()
        .clone_htod(&want[start * heads * rb..(start + tokens) * heads * rb])
        .unwrap();
    let mut out = dev.stream().alloc_zeros::<f32>(rows * n).unwrap();
    codec.dequantize(dev, &cache_rows, &mut out).unwrap();
    let got_back: Vec<f64> = dev
        .stream()
        .clone_dtoh(&out)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let mut oracle: Vec<f64> = format
        .dequantize_rows(&want[start * heads * rb..(start + tokens) * heads * rb], n)
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    if let Some(r) = r {
        r.rotate_rows(&mut oracle, true).unwrap();
    }
    let rotation = r.map_or("none".to_string(), |r| r.to_string());
    let what = format!("dequantize {format} n={n} rotation {rotation}");
    assert_matches(&got_back, &oracle, Op::Rotation, Precision::F32, &what);
}

/// Each format at five (dimension, rotation) pairs: no rotation, Sylvester, randomized m·2^k,
/// block-diagonal and an explicit matrix, then bf16 rows through a matrix. Every case compiles
/// modules of its own (NVRTC, seconds each), so the cases run on threads of their own and the
/// compiles overlap; a failing case fails the test when the scope joins it.
fn check_formats(formats: &[KvFormat]) {
    let Some(dev) = device() else { return };
    std::thread::scope(|s| {
        for (i, &format) in formats.iter().enumerate() {
            let cases = [
                (64usize, None),
                (128, Some(Rotation::hadamard(128).unwrap())),
                (160, Some(Rotation::randomized(160, i as u64).unwrap())),
                (256, Some(Rotation::block_hadamard(256, 64).unwrap())),
                (128, RotationKind::Matrix.build(128, i as u64)),
            ];
            for (n, r) in cases {
                if format.check_row_len(n).is_ok() {
                    let seed = (i * 7 + n) as u64;
                    s.spawn(move || check_quantize(dev, format, n, r.as_ref(), seed));
                }
            }
            // bf16 rows through an explicit matrix (the codec kernel widens them, then applies
            // it).
            if format.check_row_len(64).is_ok() {
                let m = RotationKind::Matrix.build(64, 5);
                let cfg = RowConfig::codec_default();
                s.spawn(move || {
                    check_quantize_with::<bf16>(dev, format, 64, m.as_ref(), cfg, 3 + i as u64)
                });
            }
        }
    });
}

const GGML: [KvFormat; 5] = [
    KvFormat::Q8_0,
    KvFormat::Q4_0,
    KvFormat::Q4_1,
    KvFormat::Q5_0,
    KvFormat::Q5_1,
];
const OTHER: [KvFormat; 4] = [
    KvFormat::Iq4Nl,
    KvFormat::Q6_0,
    KvFormat::Int4,
    KvFormat::Fp8E4m3,
];
const ELEMENT: [KvFormat; 3] = [KvFormat::F32, KvFormat::F16, KvFormat::Bf16];
/// rotq's TurboQuant row formats: MSE and QJL.
const TURBO: [KvFormat; 6] = KvFormat::TURBOQUANT;
/// The parts of vLLM's TurboQuant slots (the codebook keys at powers of two only).
const VLLM: [KvFormat; 5] = KvFormat::VLLM;

#[test]
fn rotate_quantize_and_dequantize_ggml_formats() {
    check_formats(&GGML);
}

#[test]
fn rotate_quantize_and_dequantize_other_formats() {
    check_formats(&OTHER);
}

#[test]
fn rotate_quantize_and_dequantize_element_formats() {
    check_formats(&ELEMENT);
}

#[test]
fn rotate_quantize_and_dequantize_turboquant_formats() {
    check_formats(&TURBO);
}

#[test]
fn rotate_quantize_and_dequantize_vllm_slot_parts() {
    check_formats(&VLLM);
}

/// Rows holding a NaN or an infinity, a zero row and rows of huge and tiny values: the row
/// formats' bytes are the oracle's (vLLM's parts poison non-finite rows; rotq's keep a NaN
/// norm or an infinite scale).
#[test]
fn row_formats_on_edge_rows() {
    let Some(dev) = device() else { return };
    let n = 64;
    let mut x: Vec<f32> = ROWS.f32s(6 * n, 91);
    x[3] = f32::NAN;
    x[n + 5] = f32::INFINITY;
    x[2 * n..3 * n].fill(0.0);
    x[3 * n..4 * n].iter_mut().for_each(|v| *v *= 6.0e4);
    x[4 * n..5 * n].iter_mut().for_each(|v| *v *= 1.0e-6);
    x[5 * n + 7] = f32::NEG_INFINITY;
    for format in TURBO.into_iter().chain(VLLM) {
        let codec = CudaCodec::new(dev, format, n, None).unwrap();
        let rb = codec.row_bytes();
        let input = dev.stream().clone_htod(&x).unwrap();
        let mut cache = dev.stream().alloc_zeros::<u8>(6 * rb).unwrap();
        codec
            .quantize(dev, &input, &mut cache, CacheTarget::contiguous(1, 0))
            .unwrap();
        let got = dev.stream().clone_dtoh(&cache).unwrap();
        let want = format.quantize_rows(&x, n).unwrap();
        assert!(
            got == want,
            "{format}: first difference at byte {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        let mut out = dev.stream().alloc_zeros::<f32>(6 * n).unwrap();
        codec.dequantize(dev, &cache, &mut out).unwrap();
        let back = dev.stream().clone_dtoh(&out).unwrap();
        let oracle = format.dequantize_rows(&want, n).unwrap();
        for (i, (a, b)) in back.iter().zip(&oracle).enumerate() {
            assert!(
                a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                "{format}: value {i}: {a} vs the oracle's {b}"
            );
        }
    }
}

/// Every format of the registry is tested above, and runs on CUDA; vLLM's codebook keys are
/// refused where the CUDA codec cannot take their rows.
#[test]
fn the_format_tests_cover_the_registry() {
    let covered: Vec<KvFormat> = GGML
        .iter()
        .chain(&OTHER)
        .chain(&ELEMENT)
        .chain(&TURBO)
        .chain(&VLLM)
        .copied()
        .collect();
    for f in KvFormat::ALL {
        assert!(covered.contains(&f), "{f}");
        assert!(rotq_cuda::check_format(f, 128).is_ok(), "{f}");
    }
    for (f, d) in [
        (KvFormat::VllmK4, 96),
        (KvFormat::VllmK3, 2048),
        (KvFormat::Tq4Qjl, 2048),
    ] {
        assert!(rotq_cuda::check_format(f, d).is_err(), "{f} at {d}");
    }
    let Some(dev) = device() else { return };
    assert!(CudaCodec::new(dev, KvFormat::VllmK4, 2048, None).is_err());
    assert!(CudaCodec::new(dev, KvFormat::VllmK4, 96, None).is_err());
}

/// Every configuration of the search space writes the same bytes, and large rows (exchange
/// across warps, base mixing) and f32 input quantize exactly too.
#[test]
fn codec_configurations_and_large_rows() {
    let Some(dev) = device() else { return };
    let r = Rotation::hadamard(128).unwrap();
    for (i, cfg) in RowConfig::search_space().into_iter().enumerate() {
        check_quantize_with::<f16>(dev, KvFormat::Q4_0, 128, Some(&r), cfg, i as u64);
    }
    let big = Rotation::hadamard(4096).unwrap();
    check_quantize_with::<f16>(
        dev,
        KvFormat::Q8_0,
        4096,
        Some(&big),
        RowConfig::codec_default(),
        1,
    );
    let m12 = Rotation::randomized(12 << 9, 3).unwrap();
    check_quantize_with::<bf16>(
        dev,
        KvFormat::Iq4Nl,
        12 << 9,
        Some(&m12),
        RowConfig::default(),
        2,
    );
    check_quantize_with::<f32>(
        dev,
        KvFormat::Q8_0,
        128,
        Some(&r),
        RowConfig::codec_default(),
        3,
    );
}

/// Dequantize writes f16 and bf16 rows too, within their tolerance of the oracle.
#[test]
fn dequantize_into_half_types() {
    let Some(dev) = device() else { return };
    fn check<T: Elem>(dev: &Device) {
        let (n, rows) = (128usize, 9usize);
        let r = Rotation::randomized(n, 5).unwrap();
        let codec = CudaCodec::new(dev, KvFormat::Q5_1, n, Some(&r)).unwrap();
        let mut rotated: Vec<f64> = ROWS.f32s(rows * n, 6).into_iter().map(f64::from).collect();
        r.rotate_rows(&mut rotated, false).unwrap();
        let rotated: Vec<f32> = rotated.into_iter().map(|v| v as f32).collect();
        let bytes = KvFormat::Q5_1.quantize_row(&rotated).unwrap();
        let cache = dev.stream().clone_htod(&bytes).unwrap();
        let mut out = dev.stream().alloc_zeros::<T>(rows * n).unwrap();
        codec.dequantize(dev, &cache, &mut out).unwrap();
        let got: Vec<f64> = download(dev, &out).into_iter().map(f64::from).collect();
        let mut want: Vec<f64> = KvFormat::Q5_1
            .dequantize_row(&bytes)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        r.rotate_rows(&mut want, true).unwrap();
        let what = std::any::type_name::<T>();
        assert_matches(&got, &want, Op::Rotation, T::PRECISION, what);
    }
    check::<f16>(dev);
    check::<bf16>(dev);
}

#[test]
fn paged_cache_holds_the_contiguous_rows() {
    let Some(dev) = device() else { return };
    let (n, heads, tokens, page) = (128usize, 2usize, 37usize, 8usize);
    let r = Rotation::hadamard(n).unwrap();
    let codec = CudaCodec::new(dev, KvFormat::Q4_0, n, Some(&r)).unwrap();
    let rb = codec.row_bytes();
    let x = ROWS.f32s(tokens * heads * n, 11);
    let input = upload::<bf16>(dev, &x);
    let start = 3;
    let mut flat = dev
        .stream()
        .alloc_zeros::<u8>((start + tokens) * heads * rb)
        .unwrap();
    codec
        .quantize(
            dev,
            &input,
            &mut flat,
            CacheTarget::contiguous(heads, start),
        )
        .unwrap();
    let n_pages = (start + tokens).div_ceil(page);
    let table: Vec<u32> = (0..n_pages as u32).rev().collect(); // pages in reverse order
    let mut paged = dev
        .stream()
        .alloc_zeros::<u8>((n_pages + 1) * page * heads * rb)
        .unwrap();
    let target = CacheTarget {
        n_heads: heads,
        start_pos: start,
        pages: Some((&table, page)),
    };
    codec.quantize(dev, &input, &mut paged, target).unwrap();
    let (flat_h, paged_h) = (
        dev.stream().clone_dtoh(&flat).unwrap(),
        dev.stream().clone_dtoh(&paged).unwrap(),
    );
    for pos in start..start + tokens {
        let at = ((table[pos / page] as usize * page + pos % page) * heads) * rb;
        assert_eq!(
            &paged_h[at..at + heads * rb],
            &flat_h[pos * heads * rb..(pos + 1) * heads * rb],
            "position {pos}"
        );
    }
    // A table entry outside the cache is refused before anything runs.
    let bad: Vec<u32> = vec![0, 1, 2, 3, 99];
    let target = CacheTarget {
        n_heads: heads,
        start_pos: start,
        pages: Some((&bad, page)),
    };
    assert!(codec.quantize(dev, &input, &mut paged, target).is_err());
}

/// The batch append: each token's rows land in the slot the device mapping names, `-1` skips,
/// every other slot keeps its bytes; a slot outside the pool writes nothing and sets the status
/// bit; an explicit matrix and bf16 rows go the same way.
#[test]
fn batch_append_through_a_device_slot_mapping() {
    let Some(dev) = device() else { return };
    let s = dev.stream();
    let (d, heads, pool_slots) = (128usize, 3usize, 16usize);
    let slots: [i64; 7] = [9, -1, 0, 15, 4, -1, 10];
    for (i, (format, r)) in [
        (KvFormat::Q4_0, Some(Rotation::hadamard(d).unwrap())),
        (KvFormat::Q8_0, None),
        (KvFormat::Tq4, Some(Rotation::randomized(d, 3).unwrap())),
        (KvFormat::Iq4Nl, RotationKind::Matrix.build(d, 4)),
    ]
    .into_iter()
    .enumerate()
    {
        let codec = CudaCodec::new(dev, format, d, r.as_ref()).unwrap();
        let rb = codec.row_bytes();
        let x = ROWS.f32s(slots.len() * heads * d, 70 + i as u64);
        // What the kernels quantize: the rows rotated by the GPU's own rotation.
        let gpu_rotated = |rows: &[f32]| -> Vec<f32> {
            let mut buf = s.clone_htod(rows).unwrap();
            if let Some(r) = &r {
                CudaRotation::new(dev, r)
                    .unwrap()
                    .forward(dev, &mut buf)
                    .unwrap();
            }
            s.clone_dtoh(&buf).unwrap()
        };
        let rotated = gpu_rotated(&x);
        let mut want = vec![0xABu8; pool_slots * heads * rb];
        for (t, &slot) in slots.iter().enumerate() {
            if slot >= 0 {
                let at = slot as usize * heads * rb;
                let rows = &rotated[t * heads * d..(t + 1) * heads * d];
                want[at..at + heads * rb].copy_from_slice(&format.quantize_rows(rows, d).unwrap());
            }
        }
        let mut pool = s
            .clone_htod(&vec![0xABu8; pool_slots * heads * rb])
            .unwrap();
        let dslots = s.clone_htod(&slots).unwrap();
        let mut status = s.alloc_zeros::<u32>(1).unwrap();
        let input = s.clone_htod(&x).unwrap();
        codec
            .quantize_slots(dev, &input, &mut pool, heads, &dslots, Some(&mut status))
            .unwrap();
        let got = s.clone_dtoh(&pool).unwrap();
        assert!(
            got == want,
            "{format}: first difference at byte {:?}",
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
        assert_eq!(s.clone_dtoh(&status).unwrap(), [0]);
        // bf16 rows: the same slots, the oracle on the rows as bf16 holds them.
        let held: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let rotated = gpu_rotated(&held);
        let mut pool = s.alloc_zeros::<u8>(pool_slots * heads * rb).unwrap();
        codec
            .quantize_slots(
                dev,
                &upload::<bf16>(dev, &x),
                &mut pool,
                heads,
                &dslots,
                None,
            )
            .unwrap();
        let got = s.clone_dtoh(&pool).unwrap();
        for (t, &slot) in slots.iter().enumerate() {
            if slot >= 0 {
                let at = slot as usize * heads * rb;
                let rows = &rotated[t * heads * d..(t + 1) * heads * d];
                assert_eq!(
                    got[at..at + heads * rb],
                    format.quantize_rows(rows, d).unwrap()[..],
                    "{format} bf16 token {t}"
                );
            }
        }
    }
    // A slot outside the pool: reported, not written; the others still land.
    let codec = CudaCodec::new(dev, KvFormat::Q8_0, d, None).unwrap();
    let rb = codec.row_bytes();
    let mut pool = s.alloc_zeros::<u8>(pool_slots * heads * rb).unwrap();
    let x = ROWS.f32s(3 * heads * d, 5);
    let input = s.clone_htod(&x).unwrap();
    let mut status = s.alloc_zeros::<u32>(1).unwrap();
    let bad = s.clone_htod(&[2i64, pool_slots as i64, -7]).unwrap();
    codec
        .quantize_slots(dev, &input, &mut pool, heads, &bad, Some(&mut status))
        .unwrap();
    assert_eq!(s.clone_dtoh(&status).unwrap(), [1]);
    let got = s.clone_dtoh(&pool).unwrap();
    let first = KvFormat::Q8_0.quantize_rows(&x[..heads * d], d).unwrap();
    assert_eq!(got[2 * heads * rb..3 * heads * rb], first[..]);
    assert!(got[..2 * heads * rb].iter().all(|&b| b == 0));
    assert!(got[3 * heads * rb..].iter().all(|&b| b == 0));
    // Host-checked shapes: a mapping of another length, rows not whole tokens, a pool not
    // whole slots, an empty status.
    let two = s.clone_htod(&[0i64, 1]).unwrap();
    assert!(codec
        .quantize_slots(dev, &input, &mut pool, heads, &two, None)
        .is_err());
    assert!(codec
        .quantize_slots(dev, &input, &mut pool, 2, &bad, None)
        .is_err());
    let mut ragged = s.alloc_zeros::<u8>(pool_slots * heads * rb - 1).unwrap();
    assert!(codec
        .quantize_slots(dev, &input, &mut ragged, heads, &bad, None)
        .is_err());
    let mut empty = s.null::<u32>().unwrap();
    assert!(codec
        .quantize_slots(dev, &input, &mut pool, heads, &bad, Some(&mut empty))
        .is_err());
}

/// The batch append on caller buffers and a caller stream (`quantize_slots_on`): the bytes of
/// `quantize_slots`, in f16 and f32, also replayed from a CUDA graph captured on a stream of
/// its own with a new slot mapping written between replays; an explicit matrix; the status
/// word; the host-checked refusals (lengths, a pool not whole slots, an empty status).
#[test]
fn batch_append_on_caller_buffers_and_stream() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
    use rotq_cuda::batch::{DeviceBuf, DeviceStream};
    let Some(dev) = device() else { return };
    let s = dev.stream();
    let (d, heads, pool_slots) = (128usize, 2usize, 12usize);
    let slots: [i64; 5] = [7, -1, 0, 11, 3];
    let codec = CudaCodec::new(
        dev,
        KvFormat::Q4_0,
        d,
        Some(&Rotation::hadamard(d).unwrap()),
    )
    .unwrap();
    let rb = codec.row_bytes();
    let x = ROWS.f32s(slots.len() * heads * d, 90);
    let dslots = s.clone_htod(&slots).unwrap();
    fn same<T: Elem>(
        dev: &Device,
        codec: &CudaCodec,
        x: &[f32],
        slots: &cudarc::driver::CudaSlice<i64>,
        heads: usize,
        bytes: usize,
    ) {
        let s = dev.stream();
        let input = upload::<T>(dev, x);
        let mut want = s.clone_htod(&vec![0x5Au8; bytes]).unwrap();
        codec
            .quantize_slots(dev, &input, &mut want, heads, slots, None)
            .unwrap();
        let got = s.clone_htod(&vec![0x5Au8; bytes]).unwrap();
        let status = s.alloc_zeros::<u32>(1).unwrap();
        // SAFETY: the buffers live past the reads below, which synchronise the stream.
        unsafe {
            codec.quantize_slots_on(
                dev,
                &DeviceStream::of(s),
                &DeviceBuf::of(&input),
                &DeviceBuf::of(&got),
                heads,
                &DeviceBuf::of(slots),
                Some(&DeviceBuf::of(&status)),
            )
        }
        .unwrap();
        assert!(
            s.clone_dtoh(&got).unwrap() == s.clone_dtoh(&want).unwrap(),
            "{}",
            std::any::type_name::<T>()
        );
        assert_eq!(s.clone_dtoh(&status).unwrap(), [0]);
    }
    same::<f16>(dev, &codec, &x, &dslots, heads, pool_slots * heads * rb);
    same::<f32>(dev, &codec, &x, &dslots, heads, pool_slots * heads * rb);
    // An explicit matrix (compressed-tensors' random-matrix) runs in the same kernel.
    let matrix = CudaCodec::new(
        dev,
        KvFormat::Q8_0,
        d,
        RotationKind::Matrix.build(d, 4).as_ref(),
    )
    .unwrap();
    let matrix_pool = pool_slots * heads * matrix.row_bytes();
    same::<bf16>(dev, &matrix, &x, &dslots, heads, matrix_pool);

    // Captured once on a stream of its own, replayed with another mapping each time.
    let gs = dev.context().new_stream().unwrap();
    let input = gs.clone_htod(&x).unwrap();
    let pool = gs.alloc_zeros::<u8>(pool_slots * heads * rb).unwrap();
    let mut mapping = gs.clone_htod(&slots).unwrap();
    let status = gs.alloc_zeros::<u32>(1).unwrap();
    let (ib, pb, mb, sb) = (
        DeviceBuf::of(&input),
        DeviceBuf::of(&pool),
        DeviceBuf::of(&mapping),
        DeviceBuf::of(&status),
    );
    let ds = DeviceStream::of(&gs);
    // (The codec's rotation went up on the device's stream; this stream does not wait for it.)
    s.synchronize().unwrap();
    // SAFETY: (this call, the captured one and the refusals below) the buffers live to the end
    // of the test, after the last replay's synchronisation.
    unsafe { codec.quantize_slots_on(dev, &ds, &ib, &pb, heads, &mb, Some(&sb)) }.unwrap(); // compiles
    gs.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .unwrap();
    // SAFETY: as above.
    unsafe { codec.quantize_slots_on(dev, &ds, &ib, &pb, heads, &mb, Some(&sb)) }.unwrap();
    let graph = gs
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    // What each token's rows become: the codec's own quantize of them at one slot.
    let token = |t: usize| -> Vec<u8> {
        let mut one = s.alloc_zeros::<u8>(heads * rb).unwrap();
        let rows = s
            .clone_htod(&x[t * heads * d..(t + 1) * heads * d])
            .unwrap();
        codec
            .quantize(dev, &rows, &mut one, CacheTarget::contiguous(heads, 0))
            .unwrap();
        s.clone_dtoh(&one).unwrap()
    };
    for (i, m) in [[1i64, 2, -1, 5, 9], [10, 11, 6, 0, -1]].iter().enumerate() {
        gs.memcpy_htod(m, &mut mapping).unwrap();
        graph.launch().unwrap();
        gs.synchronize().unwrap();
        let got = gs.clone_dtoh(&pool).unwrap();
        for (t, &slot) in m.iter().enumerate() {
            if slot >= 0 {
                let at = slot as usize * heads * rb;
                assert_eq!(
                    got[at..at + heads * rb],
                    token(t)[..],
                    "replay {i} token {t}"
                );
            }
        }
        assert_eq!(gs.clone_dtoh(&status).unwrap(), [0], "replay {i}");
    }

    // Refusals on the host.
    let (ib, pb, mb) = (
        DeviceBuf::of(&input),
        DeviceBuf::of(&pool),
        DeviceBuf::of(&mapping),
    );
    let two = gs.clone_htod(&[0i64, 1]).unwrap();
    let ragged = gs.alloc_zeros::<u8>(pool_slots * heads * rb - 1).unwrap();
    let empty = gs.alloc_zeros::<u32>(0).unwrap();
    // SAFETY: each is refused before anything is queued.
    let refused = unsafe {
        [
            codec.quantize_slots_on(dev, &ds, &ib, &pb, heads, &DeviceBuf::of(&two), None),
            codec.quantize_slots_on(dev, &ds, &ib, &DeviceBuf::of(&ragged), heads, &mb, None),
            codec.quantize_slots_on(dev, &ds, &ib, &pb, heads, &mb, Some(&DeviceBuf::of(&empty))),
            codec.quantize_slots_on(
                dev,
                &ds,
                &ib,
                &DeviceBuf::<u8>::from_raw(dev, pb.ptr() + 4, pb.len() - heads * rb).unwrap(),
                heads,
                &mb,
                None,
            ),
        ]
    };
    for (i, r) in refused.into_iter().enumerate() {
        assert!(r.is_err(), "case {i}");
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    assert!(matches!(
        Device::open("gpu0"),
        Err(CudaError::BadDeviceName(_))
    ));
    assert!(Device::open("cuda:999").is_err());
    let Some(dev) = device() else { return };
    let r = Rotation::hadamard(128).unwrap();
    let rot = CudaRotation::new(dev, &r).unwrap();
    let mut short = dev.stream().alloc_zeros::<f32>(127).unwrap();
    assert!(rot.forward(dev, &mut short).is_err());
    // An explicit matrix checks its rows too.
    let m = Rotation::matrix(r.to_matrix()).unwrap();
    assert!(CudaRotation::new(dev, &m)
        .unwrap()
        .forward(dev, &mut short)
        .is_err());
    let codec = CudaCodec::new(dev, KvFormat::Q8_0, 128, Some(&r)).unwrap();
    let input = dev.stream().alloc_zeros::<f16>(4 * 128).unwrap();
    let mut small = dev
        .stream()
        .alloc_zeros::<u8>(3 * codec.row_bytes())
        .unwrap();
    assert!(codec
        .quantize(dev, &input, &mut small, CacheTarget::contiguous(4, 0))
        .is_err());
    assert!(codec
        .quantize(dev, &input, &mut small, CacheTarget::contiguous(3, 0))
        .is_err());
    assert!(CudaCodec::new(dev, KvFormat::Q4_0, 100, None).is_err());
    // No new tokens: nothing to do, whatever the target (even past the table's end).
    let none = dev.stream().alloc_zeros::<f16>(0).unwrap();
    let target = CacheTarget {
        n_heads: 8,
        start_pos: 100,
        pages: Some((&[0u32], 16)),
    };
    assert!(codec.quantize(dev, &none, &mut small, target).is_ok());
    // Absurd configurations are clamped, not trusted.
    let huge = RowConfig {
        elems_per_thread: usize::MAX,
        rows_per_block: usize::MAX,
    };
    let mut rows = upload::<f32>(dev, &ROWS.f32s(3 * 128, 1));
    CudaRotation::new(dev, &r)
        .unwrap()
        .with_config(huge)
        .forward(dev, &mut rows)
        .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random sizes, element types, row counts and configurations.
    #[test]
    fn random_shapes_and_configs(
        size in proptest::sample::select(sizes()),
        dtype in 0u8..3,
        rows in 1usize..40,
        cfg in proptest::sample::select(RowConfig::search_space()),
        randomized in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let Some(dev) = device() else { return Ok(()) };
        let r = if randomized { Rotation::randomized(size, seed).unwrap() } else { Rotation::hadamard(size).unwrap() };
        match dtype {
            0 => check_rotation::<f32>(dev, &r, rows, cfg, seed),
            1 => check_rotation::<f16>(dev, &r, rows, cfg, seed),
            _ => check_rotation::<bf16>(dev, &r, rows, cfg, seed),
        }
    }
}

/// The CUDA context shift against the oracle's `shift_cache` on the same cache bytes, for
/// formats, rotations, both RoPE pairings, contiguous and paged caches: each shifted row is
/// within 5% of the oracle's re-quantization error of the exact target (the shifted, rotated
/// dequantized keys), and every row outside the range keeps its bytes.
#[test]
fn context_shift_follows_the_oracle() {
    use rotq_reference::rope::{shift_cache, Rope, RopeVariant};
    let Some(dev) = device() else { return };
    let (d, heads, tokens, start, count) = (128usize, 3usize, 40usize, 7usize, 25usize);
    let dist = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt()
    };
    let to_f64 = |f: KvFormat, b: &[u8]| -> Vec<f64> {
        f.dequantize_rows(b, d)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    for (i, format) in [
        KvFormat::Q8_0,
        KvFormat::Q4_0,
        KvFormat::Iq4Nl,
        KvFormat::F16,
        KvFormat::Tq4,
    ]
    .into_iter()
    .enumerate()
    {
        // None, Hadamard, randomized, and an explicit matrix (in place of the transform).
        for kind in [0u8, 1, 2, 4] {
            let r = RotationKind::nth(kind.into()).build(d, 40 + i as u64);
            let paged = (i + kind as usize) % 2 == 1;
            let rope = Rope {
                freq_base: if paged { 500_000.0 } else { 10_000.0 },
                ..Rope::new(
                    if kind == 1 {
                        RopeVariant::Normal
                    } else {
                        RopeVariant::Neox
                    },
                    if kind == 2 { d / 2 } else { d },
                )
            };
            let delta = -300 + 97 * i as i64;
            let codec = CudaCodec::new(dev, format, d, r.as_ref()).unwrap();
            let rb = codec.row_bytes();
            // A paged cache: pages of 8 tokens in reverse order.
            let page = 8;
            let table: Vec<u32> = (0..tokens.div_ceil(page) as u32).rev().collect();
            let target = |pos: usize| CacheTarget {
                n_heads: heads,
                start_pos: pos,
                pages: paged.then_some((&table[..], page)),
            };
            let slot = |pos: usize| {
                if paged {
                    table[pos / page] as usize * page + pos % page
                } else {
                    pos
                }
            };
            let x = ROWS.f32s(tokens * heads * d, 900 + i as u64 + 10 * kind as u64);
            let mut cache = dev
                .stream()
                .alloc_zeros::<u8>(table.len() * page * heads * rb)
                .unwrap();
            codec
                .quantize(dev, &upload::<f32>(dev, &x), &mut cache, target(0))
                .unwrap();
            let before: Vec<u8> = dev.stream().clone_dtoh(&cache).unwrap();
            codec
                .shift(dev, &mut cache, target(start), count, &rope, delta)
                .unwrap();
            let after: Vec<u8> = dev.stream().clone_dtoh(&cache).unwrap();
            for pos in 0..tokens {
                let span = slot(pos) * heads * rb..(slot(pos) + 1) * heads * rb;
                if !(start..start + count).contains(&pos) {
                    assert_eq!(
                        after[span.clone()],
                        before[span],
                        "{format}: token {pos} changed"
                    );
                    continue;
                }
                let mut oracle = before[span.clone()].to_vec();
                shift_cache(format, &mut oracle, d, r.as_ref(), &rope, delta).unwrap();
                let mut target = to_f64(format, &before[span.clone()]);
                if let Some(r) = &r {
                    r.rotate_rows(&mut target, true).unwrap();
                }
                rope.shift_rows_of(&mut target, d, delta).unwrap();
                if let Some(r) = &r {
                    r.rotate_rows(&mut target, false).unwrap();
                }
                let e_oracle = dist(&to_f64(format, &oracle), &target);
                let e_gpu = dist(&to_f64(format, &after[span]), &target);
                let norm = dist(&target, &vec![0.0; target.len()]);
                assert!(
                    e_gpu <= 1.05 * e_oracle + 1e-6 * norm,
                    "{format}, rotation {kind}, paged {paged}, token {pos}: GPU {e_gpu:e}, oracle {e_oracle:e}"
                );
            }
            // Positions past the cache are refused before any launch.
            assert!(codec
                .shift(dev, &mut cache, target(tokens - 3), 10, &rope, delta)
                .is_err());
            let bad = Rope {
                dims: d + 2,
                ..rope
            };
            assert!(codec
                .shift(dev, &mut cache, target(0), 4, &bad, delta)
                .is_err());
        }
    }
}

#[test]
fn rotate_and_dequantize_on_caller_buffers_and_stream() {
    use rotq_cuda::batch::{DeviceBuf, DeviceStream};
    let Some(dev) = device() else { return };
    let s = dev.stream();
    let ds = DeviceStream::of(s);
    let (d, rows) = (128usize, 9usize);
    let x = ROWS.f32s(rows * d, 91);
    for r in [
        Rotation::hadamard(d).unwrap(),
        Rotation::randomized(d, 5).unwrap(),
        RotationKind::Matrix.build(d, 6).unwrap(),
    ] {
        let rot = CudaRotation::new(dev, &r).unwrap();
        for inverse in [false, true] {
            // The same bytes as the cudarc-buffer call.
            let mut want = upload::<f16>(dev, &x);
            if inverse {
                rot.inverse(dev, &mut want).unwrap();
            } else {
                rot.forward(dev, &mut want).unwrap();
            }
            let got = upload::<f16>(dev, &x);
            // SAFETY: `got` lives past the download below, which synchronises the stream.
            unsafe { rot.rotate_on(dev, &ds, &DeviceBuf::of(&got), inverse, None) }.unwrap();
            assert_eq!(
                download(dev, &got),
                download(dev, &want),
                "{r} inverse={inverse}"
            );
        }
    }
    // An output scale instead of 1/√n: the unnormalized transform, exact on integers.
    let ints: Vec<f32> = (0..rows * d)
        .map(|i| ((i * 7919) % 17) as f32 - 8.0)
        .collect();
    let mut want: Vec<f64> = ints.iter().map(|&v| f64::from(v)).collect();
    Rotation::hadamard(d)
        .unwrap()
        .rotate_rows(&mut want, false)
        .unwrap();
    let rot = CudaRotation::new(dev, &Rotation::hadamard(d).unwrap()).unwrap();
    let buf = upload::<f32>(dev, &ints);
    // SAFETY: as above.
    unsafe { rot.rotate_on(dev, &ds, &DeviceBuf::of(&buf), false, Some(0.5)) }.unwrap();
    let got = download(dev, &buf);
    let sqrt_n = (d as f64).sqrt();
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(f64::from(*g), (w * sqrt_n).round() * 0.5);
    }

    // Dequantize: the same values as the cudarc-buffer call, f16 and f32.
    let codec = CudaCodec::new(
        dev,
        KvFormat::Q4_0,
        d,
        Some(&Rotation::hadamard(d).unwrap()),
    )
    .unwrap();
    let mut cache = s.alloc_zeros::<u8>(rows * codec.row_bytes()).unwrap();
    codec
        .quantize(
            dev,
            &upload::<f32>(dev, &x),
            &mut cache,
            CacheTarget::contiguous(1, 0),
        )
        .unwrap();
    fn same<T: Elem>(
        dev: &Device,
        codec: &CudaCodec,
        cache: &cudarc::driver::CudaSlice<u8>,
        n: usize,
    ) {
        let mut want = upload::<T>(dev, &vec![f32::NAN; n]);
        codec.dequantize(dev, cache, &mut want).unwrap();
        let got = upload::<T>(dev, &vec![f32::NAN; n]);
        let s = DeviceStream::of(dev.stream());
        // SAFETY: the buffers live past the download below, which synchronises the stream.
        unsafe { codec.dequantize_on(dev, &s, &DeviceBuf::of(cache), &DeviceBuf::of(&got)) }
            .unwrap();
        assert_eq!(download(dev, &got), download(dev, &want));
    }
    same::<f16>(dev, &codec, &cache, rows * d);
    same::<f32>(dev, &codec, &cache, rows * d);
    // An explicit matrix's inverse runs in the same kernel.
    let m = RotationKind::Matrix.build(d, 3).unwrap();
    let matrix = CudaCodec::new(dev, KvFormat::Q8_0, d, Some(&m)).unwrap();
    let mut matrix_cache = s.alloc_zeros::<u8>(rows * matrix.row_bytes()).unwrap();
    matrix
        .quantize(
            dev,
            &upload::<f32>(dev, &x),
            &mut matrix_cache,
            CacheTarget::contiguous(1, 0),
        )
        .unwrap();
    same::<bf16>(dev, &matrix, &matrix_cache, rows * d);

    // Refusals: rows that are not whole, cache bytes of another row count, an output scale
    // for an explicit matrix (it has no normalization to replace).
    let short = upload::<f32>(dev, &x[..d - 1]);
    // SAFETY: refused before anything is queued.
    unsafe {
        assert!(rot
            .rotate_on(dev, &ds, &DeviceBuf::of(&short), false, None)
            .is_err());
        let out = upload::<f32>(dev, &x[..2 * d]);
        assert!(codec
            .dequantize_on(dev, &ds, &DeviceBuf::of(&cache), &DeviceBuf::of(&out))
            .is_err());
    }
    let mrot = CudaRotation::new(dev, &m).unwrap();
    let buf = upload::<f32>(dev, &x);
    // SAFETY: refused before anything is queued.
    let e =
        unsafe { mrot.rotate_on(dev, &ds, &DeviceBuf::of(&buf), false, Some(0.5)) }.unwrap_err();
    assert!(matches!(e, CudaError::Input(_)), "{e}");
}
