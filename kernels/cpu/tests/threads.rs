//! The CPU kernels' handles shared by 8 threads at once, each thread on its own fresh random
//! rows: every result follows the oracle (rotq-reference) and equals, bit for bit, what the
//! same call gives alone. Which handles may be shared is checked when this file compiles.

use proptest::prelude::*;
use rotq_cpu::{CacheCodec, CpuAttention, CpuRotation, Isa, KvCacheView};
use rotq_reference::tolerance::{tolerance, Op, Precision};
use rotq_reference::KvFormat;
use rotq_testkit::data::Rows;
use rotq_testkit::rotations::RotationKind;
use rotq_testkit::threads::at_once;

const THREADS: u64 = 8;

/// The kernels' handles hold no per-call state: each may move to another thread and be used
/// from several at once.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<CpuRotation>();
    shared::<CacheCodec>();
    shared::<CpuAttention>();
    shared::<KvCacheView<'static>>();
};

/// Rows that stress the kernels: magnitudes over 2⁻¹²..2¹², zeros, outliers and ties.
fn rows(len: usize, seed: u64) -> Vec<f32> {
    Rows::stress().f32s(len, seed)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// One `CpuRotation` shared by 8 threads, each rotating its own rows forward and back:
    /// each thread's rows follow the oracle's f64 rotation row by row, and equal the same call
    /// made alone.
    #[test]
    fn one_rotation_from_eight_threads_follows_the_oracle(
        dim in proptest::sample::select(vec![64usize, 96, 128, 256]),
        kind in proptest::sample::select(RotationKind::ROTATING.to_vec()),
        n_rows in 1usize..200,
        seed in any::<u64>(),
    ) {
        let r = kind.build(dim, seed).unwrap();
        let kernel = CpuRotation::new(&r, Isa::best());
        let input = |t: u64| rows(n_rows * dim, seed ^ (t + 1).wrapping_mul(0x9E37_79B9));
        let run = |t: u64| {
            let mut forward = input(t);
            kernel.forward_rows(&mut forward).unwrap();
            let mut inverse = input(t);
            kernel.inverse_rows(&mut inverse).unwrap();
            (forward, inverse)
        };
        let together = at_once(THREADS, run);
        let tol = tolerance(Op::Rotation, Precision::F32);
        for (t, got) in (0..THREADS).zip(&together) {
            prop_assert!(got == &run(t), "thread {t}: differs from the call made alone");
            for (inverse, out) in [(false, &got.0), (true, &got.1)] {
                let mut want = f64s(&input(t));
                r.rotate_rows(&mut want, inverse).unwrap();
                for (g, w) in f64s(out).chunks(dim).zip(want.chunks(dim)) {
                    if let Err(m) = tol.check(g, w) {
                        prop_assert!(false, "thread {t}, {r} (inverse {inverse}): {m}");
                    }
                }
            }
        }
    }

    /// One `CacheCodec` shared by 8 threads, each quantizing its own rows into its own cache
    /// at an offset and decoding them: the bytes are the oracle's encoding of the kernel's
    /// rotated rows (which follow the oracle's rotation), the decoded rows the oracle's
    /// decoding rotated back, and both equal the same calls made alone.
    #[test]
    fn one_codec_from_eight_threads_follows_the_oracle(
        dim in proptest::sample::select(vec![64usize, 96, 128, 256]),
        format in proptest::sample::select(KvFormat::ALL.to_vec()),
        kind in proptest::sample::select(RotationKind::ROTATING.to_vec()),
        n_rows in 1usize..100,
        seed in any::<u64>(),
    ) {
        let r = kind.build(dim, seed).unwrap();
        if format.check_row_len(dim).is_err() {
            // vLLM's keys take powers of two only: refused, nothing to run.
            prop_assert!(CacheCodec::new(format, dim, Some(&r), Isa::best()).is_err());
            return Ok(());
        }
        let codec = CacheCodec::new(format, dim, Some(&r), Isa::best()).unwrap();
        let rb = codec.row_bytes();
        let input = |t: u64| rows(n_rows * dim, seed ^ (t + 1).wrapping_mul(0x85EB_CA6B));
        // Row `t` of the cache is the first written: rows before it stay zero.
        let run = |t: u64| {
            let mut cache = vec![0u8; (t as usize + n_rows) * rb];
            codec.quantize(&input(t), &mut cache, t as usize).unwrap();
            let mut back = vec![0f32; n_rows * dim];
            codec.dequantize(&cache[t as usize * rb..], &mut back).unwrap();
            (cache, back)
        };
        let together = at_once(THREADS, run);
        let tol = tolerance(Op::Rotation, Precision::F32);
        let kernel = CpuRotation::new(&r, Isa::best());
        // Bit for bit: a row format's row whose norm overflows f16 decodes to ±∞, which the
        // inverse rotation turns into NaN.
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        for (t, (cache, back)) in (0..THREADS).zip(&together) {
            let alone = run(t);
            prop_assert!(
                cache == &alone.0 && bits(back) == bits(&alone.1),
                "thread {t}: differs from the call made alone"
            );
            let (zeros, bytes) = cache.split_at(t as usize * rb);
            prop_assert!(
                zeros.iter().all(|&b| b == 0),
                "thread {t}: rows before the offset written"
            );
            let mut rotated = input(t);
            kernel.forward_rows(&mut rotated).unwrap();
            let mut exact = f64s(&input(t));
            r.rotate_rows(&mut exact, false).unwrap();
            for (g, w) in f64s(&rotated).chunks(dim).zip(exact.chunks(dim)) {
                if let Err(m) = tol.check(g, w) {
                    prop_assert!(false, "thread {t}, {r}: rotation: {m}");
                }
            }
            prop_assert!(
                bytes == format.quantize_rows(&rotated, dim).unwrap().as_slice(),
                "thread {t}, {format} {r}: bytes"
            );
            let mut want = f64s(&format.dequantize_rows(bytes, dim).unwrap());
            r.rotate_rows(&mut want, true).unwrap();
            for (g, w) in f64s(back).chunks(dim).zip(want.chunks(dim)) {
                if let Err(m) = tol.check(g, w) {
                    prop_assert!(false, "thread {t}, {format} {r}: decoded: {m}");
                }
            }
        }
    }
}
